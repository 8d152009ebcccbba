"""SMTP AUTH's parts: scrypt hashes (passwords), the users file (users), SASL PLAIN/LOGIN
decoding (sasl)."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.inbound import passwords
from engine.inbound.passwords import hash_password, verify_password
from engine.inbound.sasl import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USERNAME_CHALLENGE,
    AuthCancelled,
    AuthSyntaxError,
    decode_login_field,
    decode_plain,
)
from engine.inbound.users import UserDb, authenticate, set_user
from engine.smtp.replies import R501_AUTH_CANCELLED, R501_BAD_BASE64

# ln=10 is 1 MiB and a few ms: fast tests, same code path as the default ln=14.
LN = 10


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- hashing -------------------------------------------------------------------------


def test_hash_verify_round_trip() -> None:
    encoded = hash_password("correct horse", ln=LN)
    assert encoded.startswith(f"$scrypt$ln={LN},r=8,p=1$")
    assert verify_password("correct horse", encoded)


def test_wrong_password_fails() -> None:
    encoded = hash_password("correct horse", ln=LN)
    assert not verify_password("correct horsE", encoded)
    assert not verify_password("", encoded)


def test_salt_is_fresh_each_time() -> None:
    assert hash_password("pw", ln=LN) != hash_password("pw", ln=LN)


def test_non_ascii_password() -> None:
    encoded = hash_password("pässwörd✓", ln=LN)
    assert verify_password("pässwörd✓", encoded)
    assert not verify_password("passwort", encoded)


def test_default_cost_is_ln14() -> None:
    assert passwords.DEFAULT_LN == 14
    encoded = hash_password("pw")
    assert encoded.startswith("$scrypt$ln=14,r=8,p=1$")
    assert verify_password("pw", encoded)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plaintext",
        "$scrypt$",
        "$bcrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$" + b64(bytes(32)),
        "$scrypt$ln=10,r=8$AAAAAAAAAAAAAAAAAAAAAA==$" + b64(bytes(32)),
        "$scrypt$ln=10,r=8,p=1$!!!!$" + b64(bytes(32)),
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAA",  # bad padding
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$" + b64(bytes(4)),  # short digest
        "$scrypt$ln=0,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$" + b64(bytes(32)),
        "$scrypt$ln=40,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$" + b64(bytes(32)),  # huge cost
        "$scrypt$ln=20,r=32,p=1$AAAAAAAAAAAAAAAAAAAAAA==$" + b64(bytes(32)),  # 4 GiB
    ],
)
def test_malformed_hash_is_false(encoded: str) -> None:
    assert verify_password("pw", encoded) is False


def test_hash_password_refuses_unverifiable_parameters() -> None:
    with pytest.raises(ValueError):
        hash_password("pw", ln=40)


def test_parameters_come_from_the_hash() -> None:
    # A hash written with other parameters still verifies: the format is self-describing.
    encoded = hash_password("pw", ln=9, r=4, p=2)
    assert encoded.startswith("$scrypt$ln=9,r=4,p=2$")
    assert verify_password("pw", encoded)


# --- authenticate ----------------------------------------------------------------------


def _db(tmp_path: Path, **users: str) -> UserDb:
    path = tmp_path / "users"
    path.write_text("".join(f"{u}:{hash_password(p, ln=LN)}\n" for u, p in users.items()))
    return UserDb.load(str(path))


def test_authenticate_known_user(tmp_path: Path) -> None:
    db = _db(tmp_path, alice="secret")
    assert asyncio.run(authenticate(db, "alice", "secret")) is True
    assert asyncio.run(authenticate(db, "alice", "wrong")) is False


def test_authenticate_unknown_user_spends_a_scrypt(tmp_path: Path) -> None:
    db = _db(tmp_path, alice="secret")
    # The dummy hash copies the database's cost, so both paths run the same scrypt.
    assert db.dummy_hash.startswith(f"$scrypt$ln={LN},r=8,p=1$")
    calls: list[tuple[str, str]] = []
    real = passwords.verify_password

    class CountingExecutor(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            if fn is real:
                calls.append(args)
            return super().submit(fn, *args, **kwargs)

    async def run() -> bool:
        with CountingExecutor(max_workers=1) as pool:
            return await authenticate(db, "mallory", "secret", pool)

    assert asyncio.run(run()) is False
    assert calls == [("secret", db.dummy_hash)]


def test_authenticate_unknown_user_in_empty_db_costs_default_scrypt() -> None:
    db = UserDb.load("")
    assert db.dummy_hash.startswith("$scrypt$ln=14,r=8,p=1$")
    start = time.perf_counter()
    assert asyncio.run(authenticate(db, "anyone", "pw")) is False
    # Not a benchmark: only that real scrypt work happened (ln=14 is tens of ms).
    assert time.perf_counter() - start > 0.005


def test_authenticate_does_not_block_the_loop(tmp_path: Path) -> None:
    db = _db(tmp_path, alice="secret")

    async def run() -> tuple[bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        ok = await authenticate(db, "alice", "secret")
        t.cancel()
        return ok, ticks

    ok, ticks = asyncio.run(run())
    assert ok and ticks > 1


# --- users file ----------------------------------------------------------------------


def test_load_missing_or_empty_path_is_empty(tmp_path: Path) -> None:
    assert len(UserDb.load("")) == 0
    assert len(UserDb.load(str(tmp_path / "nope"))) == 0


def test_load_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    h = hash_password("pw", ln=LN)
    path = tmp_path / "users"
    path.write_text(f"# operators\n\nalice:{h}\n   \n  # indented comment\nbob:{h}\n")
    db = UserDb.load(str(path))
    assert len(db) == 2
    assert db.lookup("alice") == h
    assert db.lookup("carol") is None
    assert "bob" in db


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alice", "expected user:hash"),
        (":$scrypt$", "user name must not be empty"),
        ("alice:notahash", "malformed password hash"),
        ("al ice:HASH", "whitespace"),
    ],
)
def test_load_error_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    good = f"bob:{hash_password('pw', ln=LN)}"
    path = tmp_path / "users"
    path.write_text(f"# comment\n{good}\n{line.replace('HASH', good[4:])}\n")
    with pytest.raises(ValueError) as info:
        UserDb.load(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message


def test_load_refuses_duplicate_user(tmp_path: Path) -> None:
    h = hash_password("pw", ln=LN)
    path = tmp_path / "users"
    path.write_text(f"alice:{h}\nalice:{h}\n")
    with pytest.raises(ValueError, match=r":2: duplicate user 'alice'"):
        UserDb.load(str(path))


def test_load_error_does_not_quote_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice:hunter2\n")  # someone pasted a password instead of a hash
    with pytest.raises(ValueError) as info:
        UserDb.load(str(path))
    assert "hunter2" not in str(info.value)


def test_set_user_creates_file_0600(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    set_user(path, "alice", "secret", ln=LN)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = UserDb.load(path)
    encoded = db.lookup("alice")
    assert encoded is not None and verify_password("secret", encoded)


def test_set_user_replaces_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob = f"bob:{hash_password('bobpw', ln=LN)}"
    path.write_text(f"# keep me\n{bob}\n\nalice:{hash_password('old', ln=LN)}\n")
    os.chmod(path, 0o644)
    before = path.read_text()
    # Holding the old file open keeps its inode from being reused by the new one.
    with open(path) as old:
        set_user(str(path), "alice", "new", ln=LN)
        set_user(str(path), "carol", "carolpw", ln=LN)
        # Rename, not rewrite in place: the old inode is untouched.
        assert os.fstat(old.fileno()).st_ino != os.stat(path).st_ino
        assert old.read() == before
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# keep me", bob, ""]
    assert lines[3].startswith("alice:") and lines[4].startswith("carol:")
    # The rewrite tightens the mode to 0600 whatever the old file had.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = UserDb.load(str(path))
    assert len(db) == 3
    assert verify_password("new", db.lookup("alice") or "")
    assert not verify_password("old", db.lookup("alice") or "")
    assert verify_password("bobpw", db.lookup("bob") or "")
    # No temporary files left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


@pytest.mark.parametrize("user", ["", "a:b", "a b", "a\tb", "#alice", "a\x00b"])
def test_set_user_refuses_bad_names(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError):
        set_user(str(tmp_path / "users"), user, "pw", ln=LN)
    assert not (tmp_path / "users").exists()


def test_set_user_refuses_empty_password(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        set_user(str(tmp_path / "users"), "alice", "", ln=LN)


def test_set_user_will_not_rewrite_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("garbage\n")
    with pytest.raises(ValueError, match=r":1: "):
        set_user(str(path), "alice", "pw", ln=LN)
    assert path.read_text() == "garbage\n"


# --- SASL PLAIN (RFC 4616) -----------------------------------------------------------


def test_plain_valid() -> None:
    assert decode_plain(b64(b"\0alice\0secret")) == ("alice", "secret")


def test_plain_authzid_equal_to_authcid() -> None:
    assert decode_plain(b64(b"alice\0alice\0secret")) == ("alice", "secret")


def test_plain_utf8_and_bytes_input() -> None:
    raw = "\0jörg\0pä ss".encode()
    assert decode_plain(b64(raw)) == ("jörg", "pä ss")
    assert decode_plain(b64(raw).encode() + b"\r\n") == ("jörg", "pä ss")


@pytest.mark.parametrize(
    "response",
    [
        "not base64!",
        "AAA",  # bad padding
        "ä",
        b64(b"alice secret"),  # no NULs
        b64(b"\0alicesecret"),  # one NUL
        b64(b"\0alice\0sec\0ret"),  # three
        b64(b"\0\0secret"),  # empty authcid
        b64(b"\0alice\0"),  # empty password
        b64(b"\0alice\0\xff\xfe"),  # not UTF-8
        "=",  # RFC 4954 empty initial response: no credentials at all
        "",
    ],
)
def test_plain_syntax_errors(response: str) -> None:
    with pytest.raises(AuthSyntaxError) as info:
        decode_plain(response)
    assert info.value.reply == R501_BAD_BASE64


def test_plain_authzid_mismatch() -> None:
    with pytest.raises(AuthSyntaxError) as info:
        decode_plain(b64(b"admin\0alice\0secret"))
    assert info.value.reply == R501_BAD_BASE64


def test_plain_cancel() -> None:
    with pytest.raises(AuthCancelled) as info:
        decode_plain("*")
    assert info.value.reply == R501_AUTH_CANCELLED


def test_errors_never_quote_the_password() -> None:
    for response in (b64(b"admin\0alice\0hunter2"), b64(b"\0alice\0hunter2\0")):
        with pytest.raises(AuthSyntaxError) as info:
            decode_plain(response)
        assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)


safe_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
    min_size=1,
    max_size=40,
)


@given(user=safe_text, password=safe_text, same_authzid=st.booleans())
def test_plain_round_trip(user: str, password: str, same_authzid: bool) -> None:
    authzid = user if same_authzid else ""
    raw = f"{authzid}\0{user}\0{password}".encode()
    assert decode_plain(b64(raw)) == (user, password)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=64).map(b64), st.text(max_size=64)))
def test_plain_fails_only_with_auth_errors(response: str) -> None:
    try:
        decode_plain(response)
    except (AuthSyntaxError, AuthCancelled):
        pass


# --- SASL LOGIN ----------------------------------------------------------------------


def test_login_challenges() -> None:
    assert base64.b64decode(LOGIN_USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(LOGIN_PASSWORD_CHALLENGE) == b"Password:"


def test_login_field() -> None:
    assert decode_login_field(b64(b"alice")) == "alice"
    assert decode_login_field(b64("pä*ss".encode())) == "pä*ss"
    assert decode_login_field("") == ""


def test_login_field_errors() -> None:
    with pytest.raises(AuthCancelled):
        decode_login_field("*")
    with pytest.raises(AuthCancelled):
        decode_login_field("*\r\n")
    with pytest.raises(AuthSyntaxError):
        decode_login_field("@@@")
    with pytest.raises(AuthSyntaxError):
        decode_login_field(b64(b"\xc3"))
