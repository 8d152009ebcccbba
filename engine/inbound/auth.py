"""SMTP AUTH (RFC 4954): the PLAIN and LOGIN mechanisms and an scrypt users file.

Everything here is pure except `authenticate`, which moves the scrypt work to an
executor: one verification costs ~50 ms at the default cost and would stall every
session on the worker's event loop.

Users file: one ``user:hash`` per line; blank lines and lines starting with ``#``
are ignored. The hash names its own parameters, so the cost can be raised later
without invalidating existing entries::

    $scrypt$ln=14,r=8,p=1$<salt base64>$<hash base64>

Passwords never appear in exception messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from concurrent.futures import Executor
from typing import NamedTuple

from engine.errors import Permanent
from engine.smtp.replies import R501_AUTH_CANCELLED, R501_BAD_BASE64, Reply

__all__ = [
    "AuthCancelled",
    "AuthError",
    "AuthSyntaxError",
    "DEFAULT_LN",
    "LOGIN_PASSWORD_CHALLENGE",
    "LOGIN_USERNAME_CHALLENGE",
    "UserDb",
    "authenticate",
    "check_username",
    "decode_login_field",
    "decode_plain",
    "hash_password",
    "set_user",
    "verify_password",
]

# --- errors ------------------------------------------------------------------------


class AuthError(Permanent):
    """A client's AUTH exchange cannot go on; `reply` is what the session sends."""

    reply: Reply = R501_BAD_BASE64


class AuthSyntaxError(AuthError):
    """The client's response is not valid base64 or not a valid SASL message."""

    reply = R501_BAD_BASE64


class AuthCancelled(AuthError):
    """The client answered a challenge with "*" (RFC 4954 §4)."""

    reply = R501_AUTH_CANCELLED


# --- password hashing --------------------------------------------------------------

# 2**14 * r=8 * 128 bytes = 16 MiB and ~50 ms per verification: the scrypt paper's
# interactive-login cost, still cheap enough for a relay's AUTH rate.
DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
DKLEN = 32

# Bounds on what a stored hash may ask for: a hand-edited (or hostile) users file
# must not make one AUTH attempt allocate gigabytes or spin for minutes.
_MAX_LN = 20
_MAX_R = 32
_MAX_P = 16
_MAX_MEM = 256 * 1024**2

_HASH_RE = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})"
    r"\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})"
)


class _Scrypt(NamedTuple):
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _scrypt_memory(n: int, r: int, p: int) -> int:
    # OpenSSL's own estimate (crypto/evp/pbe_scrypt.c): B = 128*r*p, V = 128*r*(N+2).
    return 128 * r * p + 128 * r * (n + 2)


def _parse_hash(encoded: str) -> _Scrypt:
    """Split and bound-check an encoded hash.

    Raises:
        ValueError: the string is not a `$scrypt$` hash this module can verify. The
            message never quotes the input, which may be a mistyped password.
    """
    m = _HASH_RE.fullmatch(encoded)
    if m is None:
        raise ValueError("malformed password hash (expected $scrypt$ln=N,r=N,p=N$salt$hash)")
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError("password hash parameters out of range")
    if _scrypt_memory(2**ln, r, p) > _MAX_MEM:
        raise ValueError("password hash parameters need too much memory")
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except binascii.Error:
        raise ValueError("malformed base64 in password hash") from None
    if not salt or not 16 <= len(digest) <= 64:
        raise ValueError("password hash has a bad salt or digest length")
    return _Scrypt(ln, r, p, salt, digest)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 2**ln
    # hashlib's default maxmem (OpenSSL's 32 MiB) would refuse ln=15 at r=8; give it
    # what the parameters need, which _parse_hash has already bounded.
    maxmem = _scrypt_memory(n, r, p) + 1024**2
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def hash_password(
    password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash `password` (UTF-8) with scrypt and a fresh 16-byte salt.

    Tests pass a lower `ln` to stay fast; production callers keep the default.

    Raises:
        ValueError: `ln`, `r` or `p` are outside what `verify_password` accepts (a
            hash we could not verify later must not be written).
    """
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError("scrypt parameters out of range")
    if _scrypt_memory(2**ln, r, p) > _MAX_MEM:
        raise ValueError("scrypt parameters need too much memory")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, ln, r, p, DKLEN)
    b64 = base64.b64encode
    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches `encoded`; a malformed hash is simply False.

    The comparison is constant-time (hmac.compare_digest) so response timing does
    not leak how many leading bytes matched.
    """
    try:
        h = _parse_hash(encoded)
    except ValueError:
        return False
    try:
        candidate = _scrypt(password.encode("utf-8"), h.salt, h.ln, h.r, h.p, len(h.digest))
    except (ValueError, MemoryError, UnicodeEncodeError):
        # UnicodeEncodeError: a lone surrogate cannot be anyone's password.
        return False
    return hmac.compare_digest(candidate, h.digest)


def _dummy_hash(like: str | None) -> str:
    """A hash with the same cost as `like` (or the default) that matches nothing useful.

    Verifying an unknown user against it costs what a real verification costs.
    """
    ln, r, p, dklen = DEFAULT_LN, DEFAULT_R, DEFAULT_P, DKLEN
    if like is not None:
        try:
            h = _parse_hash(like)
            ln, r, p, dklen = h.ln, h.r, h.p, len(h.digest)
        except ValueError:
            pass
    salt = base64.b64encode(bytes(SALT_BYTES)).decode()
    digest = base64.b64encode(bytes(dklen)).decode()
    return f"$scrypt$ln={ln},r={r},p={p}${salt}${digest}"


# --- users file --------------------------------------------------------------------


def check_username(user: str) -> None:
    """Refuse names the users file (or a SASL authcid) cannot carry.

    Raises:
        ValueError: the name is empty, contains ':' (the field separator), whitespace
            or control characters, or starts with '#' (it would read as a comment).
    """
    if not user:
        raise ValueError("user name must not be empty")
    if ":" in user:
        raise ValueError("user name must not contain ':'")
    if any(ch.isspace() or not ch.isprintable() for ch in user):
        raise ValueError("user name must not contain whitespace or control characters")
    if user.startswith("#"):
        raise ValueError("user name must not start with '#'")


def _parse_line(line: str) -> tuple[str, str] | None:
    """One users-file line → (user, hash), or None for blank/comment lines.

    Raises:
        ValueError: the line is not `user:hash` with a valid name and hash.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    user, sep, encoded = stripped.partition(":")
    if not sep:
        raise ValueError("expected user:hash")
    check_username(user)
    _parse_hash(encoded)
    return user, encoded


class UserDb:
    """The users file, parsed: user name → encoded scrypt hash."""

    __slots__ = ("_users", "_dummy")

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self._users: dict[str, str] = dict(users or {})
        first = next(iter(self._users.values()), None)
        self._dummy = _dummy_hash(first)

    @classmethod
    def load(cls, path: str) -> UserDb:
        """Read a users file; an empty path or a missing file is an empty database.

        Raises:
            ValueError: a line is malformed or a user appears twice; the message reads
                `path:lineno: problem` (never the hash itself).
            OSError: the file exists but cannot be read.
        """
        if not path:
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return cls()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not valid UTF-8") from None
        users: dict[str, str] = {}
        for lineno, line in enumerate(lines, 1):
            try:
                entry = _parse_line(line)
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
            if entry is None:
                continue
            user, encoded = entry
            if user in users:
                # Refuse rather than pick one: which entry wins would be a guess.
                raise ValueError(f"{path}:{lineno}: duplicate user {user!r}")
            users[user] = encoded
        return cls(users)

    def lookup(self, user: str) -> str | None:
        """The encoded hash for `user`, or None if there is no such user."""
        return self._users.get(user)

    @property
    def dummy_hash(self) -> str:
        """A hash as costly as this database's entries, for unknown users."""
        return self._dummy

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def __repr__(self) -> str:
        return f"<UserDb {len(self._users)} users>"

    @staticmethod
    def set_user(path: str, user: str, password: str, *, ln: int = DEFAULT_LN) -> None:
        """Same as the module-level `set_user`."""
        set_user(path, user, password, ln=ln)


def set_user(path: str, user: str, password: str, *, ln: int = DEFAULT_LN) -> None:
    """Add `user` to the users file at `path`, or replace its password.

    Other lines (users, comments) are kept verbatim. The new file is written beside
    the old one with mode 0600, fsynced and renamed over it, so a crash leaves either
    the old or the new file, never a torn one, and the hashes are never world-readable.
    Two concurrent writers race: the last rename wins (the CLI is the only writer).

    Raises:
        ValueError: bad user name, empty password, or the existing file is malformed
            (`path:lineno: problem`; we do not rewrite a file we cannot parse).
        OSError: the directory or file cannot be written.
    """
    check_username(user)
    if not password:
        # RFC 4616 §2: passwd is 1*SAFE, so an empty password could never log in.
        raise ValueError("password must not be empty")
    UserDb.load(path)  # validates the existing file, naming the bad line
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    new_line = f"{user}:{hash_password(password, ln=ln)}"
    replaced = False
    out: list[str] = []
    for line in lines:
        entry = _parse_line(line)
        if entry is not None and entry[0] == user:
            out.append(new_line)
            replaced = True
        else:
            out.append(line)
    if not replaced:
        out.append(new_line)
    _atomic_write(path, "".join(f"{line}\n" for line in out).encode("utf-8"))


def _atomic_write(path: str, data: bytes) -> None:
    """Write-temp, fsync, rename, fsync the directory (so the rename itself survives).

    Raises:
        OSError: any step failed; the temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    # mkstemp creates the file 0600 already; fchmod makes it explicit under any umask.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".users.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- verification off the event loop ------------------------------------------------


async def authenticate(
    db: UserDb, user: str, password: str, executor: Executor | None = None
) -> bool:
    """Check `user`/`password` against `db` in `executor` (None: the loop's default).

    An unknown user still costs one scrypt run against a dummy hash of the same cost,
    so response timing does not reveal which user names exist.
    """
    loop = asyncio.get_running_loop()
    encoded = db.lookup(user)
    if encoded is None:
        await loop.run_in_executor(executor, verify_password, password, db.dummy_hash)
        return False
    return await loop.run_in_executor(executor, verify_password, password, encoded)


# --- SASL message decoding -----------------------------------------------------------

# draft-murchison-sasl-login-00 §2: the server's challenges are "Username:" and
# "Password:", base64-encoded.
LOGIN_USERNAME_CHALLENGE = "VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"

_CANCEL = "*"


def _b64decode(data: str | bytes) -> bytes:
    """Strict RFC 4648 §4 base64 (RFC 4954 §4 requires it), after a cancel check.

    Raises:
        AuthCancelled: the response is "*" (RFC 4954 §4).
        AuthSyntaxError: not base64 (bad alphabet, bad padding, non-ASCII).
    """
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    # The session hands us the line; tolerate the CRLF it may not have stripped.
    text = text.strip(" \t\r\n")
    if text == _CANCEL:
        raise AuthCancelled("client cancelled the AUTH exchange")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise AuthSyntaxError("response is not valid base64") from None


def _utf8(raw: bytes) -> str:
    """Raises AuthSyntaxError: RFC 4616 §2 and RFC 4954 §4 carry UTF-8 only."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthSyntaxError("response is not valid UTF-8") from None


def decode_plain(b64: str | bytes) -> tuple[str, str]:
    """Decode a PLAIN response (RFC 4616 §2): ``[authzid] NUL authcid NUL passwd``.

    Returns (authcid, passwd). We do not support acting as another identity, so an
    authzid must be empty or equal to the authcid.

    Raises:
        AuthCancelled: the response is "*" (RFC 4954 §4).
        AuthSyntaxError: bad base64, not exactly two NULs, empty authcid or passwd
            (both are 1*SAFE in RFC 4616 §2), invalid UTF-8, or an authzid that
            differs from the authcid. Its `reply` is 501 5.5.2.
    """
    raw = _b64decode(b64)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise AuthSyntaxError("PLAIN response must be authzid NUL authcid NUL passwd")
    authzid, authcid, passwd = (_utf8(p) for p in parts)
    if not authcid or not passwd:
        raise AuthSyntaxError("PLAIN response has an empty user name or password")
    if authzid and authzid != authcid:
        raise AuthSyntaxError("PLAIN authorization identity must match the user")
    return authcid, passwd


def decode_login_field(b64: str | bytes) -> str:
    """Decode one LOGIN response (the user name or the password).

    Raises:
        AuthCancelled: the response is "*" (RFC 4954 §4).
        AuthSyntaxError: bad base64 or invalid UTF-8; its `reply` is 501 5.5.2.
    """
    return _utf8(_b64decode(b64))
