"""Hostile input on a real listener, beyond the core bad-input tests: each line gets a
correct reply, the session goes on, and nothing in it can change where mail goes (P7)
or smuggle a second command (P5, P8). The client is not in relay.networks here, so the
relay rules apply to it as to any stranger."""

from __future__ import annotations

import base64
import select
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.inbound.users import set_user
from engine.queue.ids import id_bytes
from tests.integration.harness import InboundServer, wait_until
from tests.integration.smtp_raw import RawClient


@pytest.fixture
def stranger(inbound: Callable[..., InboundServer], tmp_path: Path) -> InboundServer:
    users = tmp_path / "users"
    set_user(str(users), "alice", "secret")
    return inbound({
        "relay": {"networks": [], "local_domains": ["here.test"]},
        "auth": {"users_file": str(users)},
        "limits": {"auth_failure_delay": "0s"},
        "listeners": [{"address": "127.0.0.1:0", "auth": "optional", "allow_plaintext_auth": True}],
    })


def _recipients(server: InboundServer, reply_text: str) -> list[str]:
    msg_id = reply_text.rsplit(" ", 1)[1]
    record = server.call(lambda: server.store.get(id_bytes(msg_id)))
    return [r.address for r in record.recipients]


@pytest.mark.parametrize("line, code, enhanced", [
    (b"EHLO " + b"h" * 10_240, 500, "5.5.2"),  # a 10 KB HELO name: line too long
    (b"HELO " + b"h" * 10_240, 500, "5.5.2"),
    (b"MAIL FROM:<a@b.test> SIZE=1\rRCPT TO:<z@evil.test>", 500, "5.5.2"),  # bare CR: one line
    (b"MAIL FROM:<a@b.test>\x00RCPT TO:<z@evil.test>", 500, "5.5.2"),  # NUL
    (b"MAIL FROM:<a@b.test> ENVID=a+ZZ", 501, "5.5.4"),  # malformed xtext
    (b"MAIL FROM:<a@b.test> ENVID=a+2", 501, "5.5.4"),  # truncated xtext escape
    ("MAIL FROM:<jörg@b.test>".encode(), 553, "5.6.7"),  # UTF-8 mailbox without SMTPUTF8
])
def test_hostile_mail_lines_are_refused_and_the_session_goes_on(
        stranger: InboundServer, line: bytes, code: int, enhanced: str) -> None:
    with RawClient(stranger.port) as c:
        c.ehlo()
        r = c.cmd(line, enhanced=False)
        assert (r.code, r.enhanced) == (code, enhanced), r
        # Nothing of the line ran as a command: no transaction is open...
        assert c.cmd("RCPT TO:<x@here.test>").code == 503
        # ...and the session is whole.
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250


@pytest.mark.parametrize("line, code, enhanced", [
    (b"RCPT TO:<x@here.test> ORCPT=rfc822;a+ZZ", 501, "5.5.4"),
    (b"RCPT TO:<x@here.test> ORCPT=rfc822;a+", 501, "5.5.4"),
    (b"RCPT TO:<x@here.test> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
    (b"RCPT TO:<x@here.test>\rRCPT TO:<y@evil.test>", 500, "5.5.2"),
    ("RCPT TO:<jörg@here.test>".encode(), 553, "5.6.7"),
    (b"RCPT TO:<x@evil.test>", 554, "5.7.1"),  # a stranger may not relay
])
def test_hostile_rcpt_lines_are_refused(stranger: InboundServer, line: bytes, code: int, enhanced: str) -> None:
    with RawClient(stranger.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        r = c.cmd(line, enhanced=False)
        assert (r.code, r.enhanced) == (code, enhanced), r
        assert c.cmd("DATA").code == 554  # no valid recipient came of it


def test_quoted_local_parts_routes_and_percent_never_change_the_domain(stranger: InboundServer) -> None:
    """P7: only the domain after the last @ decides; what stands before it is data."""
    tricks = ['"x@evil.test"@here.test', '"a b"@here.test', "x%evil.test@here.test",
              "x!evil.test@here.test", "@evil.test:x@here.test"]
    with RawClient(stranger.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        for address in tricks:
            assert c.cmd(f"RCPT TO:<{address}>").code == 250, address
        assert c.cmd("DATA", enhanced=False).code == 354
        r = c.cmd("Subject: tricks\r\n\r\nbody\r\n.")
        assert r.code == 250, r
    queued = _recipients(stranger, r.text)
    assert all(a.rsplit("@", 1)[1] == "here.test" for a in queued), queued
    assert len(queued) == len(tricks)  # the source route is dropped, the mailbox kept


@pytest.mark.parametrize("payload", [
    b"\0alice\0secret\r\nMAIL FROM:<a@b.test>",  # CRLF smuggled inside the base64
    b"\0alice\0secret\0extra",  # an extra NUL field
    b"alice\0alice\0secret\0",
    b"\0al\x00ice\0secret",
])
def test_nul_and_crlf_inside_auth_payloads_do_not_authenticate(stranger: InboundServer, payload: bytes) -> None:
    with RawClient(stranger.port) as c:
        c.ehlo()
        r = c.cmd(f"AUTH PLAIN {base64.b64encode(payload).decode()}")
        assert r.code in (501, 535), r
        # Not authenticated, and nothing from inside the payload ran: still a stranger.
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        assert c.cmd("RCPT TO:<x@evil.test>").code == 554


def test_a_client_that_never_reads_is_dropped_at_the_deadline_and_frees_its_slot(
        inbound: Callable[..., InboundServer]) -> None:
    """P8: a client that pipelines commands and never reads a reply is ended at the
    command deadline even though its replies can never be flushed (a plain close would
    wait for the flush forever and hold the session, its per-IP slot and its buffer);
    the worker goes on serving others."""
    server = inbound({"limits": {"command_timeout": "1s", "max_junk_commands": 10**9,
                                 "max_connections_per_ip": 1}})
    ctx = server.runtime.ctx
    with RawClient(server.port) as c:
        c.ehlo()
        c.sock.setblocking(False)
        # Push until the server stops reading (its write buffer is full and paused).
        chunk = b"NOOP\r\n" * 10923
        while True:
            try:
                c.sock.send(chunk)
            except BlockingIOError:
                _, writable, _ = select.select([], [c.sock], [], 1.0)
                if not writable:
                    break
        assert server.call(lambda: max(p.transport.get_write_buffer_size() for p in ctx.sessions)) > 0
        # The socket stays open and unread; the server must still let go of it.
        wait_until(lambda: server.call(lambda: len(ctx.sessions)) == 0, timeout=20,
                   what="the non-reading session to be dropped")
        with RawClient(server.port) as other:  # the per-IP slot (limit 1) is free again
            assert other.cmd("NOOP").code == 250
