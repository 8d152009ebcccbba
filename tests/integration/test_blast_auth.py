"""`volley blast --auth`: PLAIN or LOGIN, chosen from the server's EHLO (or forced with
--auth-mech), against `volley serve` (which offers both) and against a tiny server in
this file that offers exactly the mechanisms a test names (Volley's own always offers
PLAIN and LOGIN together)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.control.client import request
from engine.control.protocol import List, Show
from engine.lab.blast.auth import BlastAuth, offered_mechanisms
from engine.lab.blast.run import BlastOptions, Report, run
from tests.integration.harness import ServeProcess
from tests.integration.test_blast import _against_server, _run
from tests.integration.test_blast_cli import _blast, serve_starttls_auth


class TinyAuthServer:
    """An SMTP server offering `offer` (e.g. "LOGIN") as its only AUTH mechanisms; it
    answers PLAIN and LOGIN (334 "Username:" / "Password:" challenges), refuses MAIL
    before AUTH (530), and counts messages per authenticated user. Lines are read one at
    a time, so pipelined commands are answered in order as a real server would."""

    def __init__(self, offer: str, users: dict[str, str], pipelining: bool = True) -> None:
        self.offer = offer
        self.users = users
        self.pipelining = pipelining
        self.auth_commands: list[str] = []  # the AUTH lines as received
        self.logins: list[tuple[str, str]] = []  # (mechanism, user) per AUTH accepted
        self.messages: dict[str, int] = {}  # by authenticated user
        self.mails = 0  # MAIL commands seen (accepted or not)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TinyAuthServer:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 tiny ESMTP\r\n")
        user = ""
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                extra = "250-PIPELINING\r\n" if self.pipelining else ""
                writer.write(f"250-tiny\r\n{extra}250 AUTH {self.offer}\r\n".encode())
            elif verb == b"AUTH":
                self.auth_commands.append(line.decode().strip())
                user = await self._auth(line.split(), reader, writer)
            elif verb == b"MAIL":
                self.mails += 1
                writer.write(b"250 ok\r\n" if user else b"530 5.7.0 authentication required\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while await reader.readuntil(b"\r\n") != b".\r\n":
                    pass
                self.messages[user] = self.messages.get(user, 0) + 1
                writer.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:  # RCPT, RSET
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async def _auth(self, words: list[bytes], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> str:
        mech = words[1].upper().decode() if len(words) > 1 else ""
        if mech == "PLAIN" and len(words) == 3:
            _, user, password = base64.b64decode(words[2]).decode().split("\0")
        elif mech == "LOGIN" and len(words) == 2:
            writer.write(b"334 VXNlcm5hbWU6\r\n")
            user = base64.b64decode(await reader.readuntil(b"\r\n")).decode()
            writer.write(b"334 UGFzc3dvcmQ6\r\n")
            password = base64.b64decode(await reader.readuntil(b"\r\n")).decode()
        else:
            writer.write(b"504 5.5.4 unrecognized authentication mechanism\r\n")
            return ""
        if self.users.get(user) != password:
            writer.write(b"535 5.7.8 authentication credentials invalid\r\n")
            return ""
        self.logins.append((mech, user))
        writer.write(b"235 2.7.0 authentication successful\r\n")
        return user


def _against_tiny(offer: str, pipelining: bool = True, **options: object) -> tuple[TinyAuthServer, Report]:
    return _against_server(lambda: TinyAuthServer(offer, {"alice": "s3cret"}, pipelining).start(),
                           **options)


@pytest.mark.parametrize("pipelining", [True, False])
def test_login_chosen_when_only_login_is_offered(pipelining: bool) -> None:
    server, report = _against_tiny("LOGIN", pipelining=pipelining, messages=30, concurrency=2,
                                   messages_per_session=10, auth="alice:s3cret")
    assert report.ok and report.accepted == 30 and report.errors == {}
    assert server.auth_commands == ["AUTH LOGIN"] * 3  # once per connection, never PLAIN
    assert server.logins == [("LOGIN", "alice")] * 3
    assert server.messages == {"alice": 30}  # every message in an authenticated session


def test_plain_preferred_when_both_are_offered_and_login_when_forced() -> None:
    server, report = _against_tiny("LOGIN PLAIN", messages=4, concurrency=2, auth="alice:s3cret")
    assert report.accepted == 4 and {m for m, _ in server.logins} == {"PLAIN"}
    server, report = _against_tiny("LOGIN PLAIN", messages=4, concurrency=2, auth="alice:s3cret",
                                   auth_mech="login")
    assert report.accepted == 4 and {m for m, _ in server.logins} == {"LOGIN"}


@pytest.mark.parametrize(("offer", "mech", "error"), [
    ("CRAM-MD5 XOAUTH2", "", "AUTH PLAIN/LOGIN not offered"),
    ("LOGIN", "plain", "AUTH PLAIN not offered"),
])
def test_no_usable_mechanism_is_an_error_and_sends_nothing(offer: str, mech: str, error: str) -> None:
    server, report = _against_tiny(offer, messages=10, concurrency=1, auth="alice:s3cret",
                                   auth_mech=mech)
    assert report.errors == {error: 3} and report.stopped == "gave up"  # 3 connections tried
    assert (report.accepted, report.unsent, server.mails, server.auth_commands) == (0, 10, 0, [])
    assert f"errors ({error}: 3)" in report.summary()


def test_login_with_a_wrong_password_is_counted_under_535() -> None:
    server, report = _against_tiny("LOGIN", messages=10, concurrency=1, auth="alice:wrong")
    assert report.errors == {"auth 535": 3} and not report.ok
    assert server.auth_commands == ["AUTH LOGIN"] * 3 and server.logins == [] and server.mails == 0


def test_ehlo_auth_list_parsing() -> None:
    ehlo = b"250-mx.example greets you\r\n250-AUTH=LOGIN\r\n250-auth plain cram-md5\r\n250 SIZE=10"
    assert offered_mechanisms(ehlo) == {b"LOGIN", b"PLAIN", b"CRAM-MD5"}
    assert offered_mechanisms(b"250-mx\r\n250-AUTHX PLAIN\r\n250 PIPELINING") == frozenset()


def test_login_and_plain_against_volley_serve_with_starttls(
    serve: Callable[..., ServeProcess], tls_files: dict[str, str], tmp_path: Path
) -> None:
    server = serve_starttls_auth(serve, tls_files, tmp_path)
    accepted = 0
    for mode in (["--auth-mech", "login"], ["--auth-mech", "login", "--no-pipelining"], []):
        done = _blast(server.port, "-n", "20", "-c", "2", "-m", "10", "--tls", "--auth",
                      "alice:secret", "--json", *mode)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert (report["accepted"], report["errors"], report["connections"]) == (20, {}, 2), mode
        accepted += report["accepted"]

    # The server queued every message as alice's (the record keeps the session's AUTH user).
    socket = str(server.config_path.parent / "volley.sock")
    listed = request(socket, List(limit=100), 10)["messages"]
    assert len(listed) == accepted
    assert {request(socket, Show(id=m["id"]), 10)["message"]["auth_user"] for m in listed} == {"alice"}

    # A wrong password: each connection's LOGIN is refused with 535, and the summary says so.
    done = _blast(server.port, "-n", "10", "-c", "1", "--tls", "--auth", "alice:wrong",
                  "--auth-mech", "login")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "errors (auth 535: 3)" in done.stdout and "unsent 10" in done.stdout


def test_bad_auth_options_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="auth_mech"):
        BlastAuth("alice:s3cret", "cram-md5")
    with pytest.raises(ValueError, match="user:password"):
        BlastAuth("alice", "")
    with pytest.raises(ValueError, match="auth_mech needs auth"):
        _run(lambda: run(BlastOptions(port=9, auth_mech="login")))
