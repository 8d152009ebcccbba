"""Bounded everything (P8), storage trouble (P4) and graceful drain, on real sockets.

Timeouts are waited for with socket timeouts, never with sleeps: the server is
configured with short limits and the test blocks on the reply it must send."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from engine.queue.ids import id_bytes
from engine.queue.store import QueueStore
from tests.integration.smtp_raw import HOST, RawClient, queue_id


def _open_data(c: RawClient, rcpt: str = "b@example.org") -> None:
    c.send(f"MAIL FROM:<a@example.com>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    got = c.replies(3)
    assert [r.code for r in got] == [250, 250, 354], got


# --- recipients ------------------------------------------------------------------------
def test_max_recipients(inbound):
    server = inbound({"limits": {"max_recipients": 3}})
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\n" + b"".join(
            b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(5)))
        got = c.replies(6)
        assert [r.code for r in got] == [250, 250, 250, 250, 452, 452], got
        assert all(r.enhanced == "4.5.3" for r in got[4:])
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: many\r\n\r\nx\r\n.\r\n")
        done = c.reply()
        assert done.code == 250
        # The limit is per transaction: the next one starts from zero.
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r4@example.org>\r\n")
        assert [r.code for r in c.replies(2)] == [250, 250]
    record = server.call(lambda: server.store.get(id_bytes(queue_id(done.text))))
    assert [r.address for r in record.recipients] == ["r0@example.org", "r1@example.org", "r2@example.org"]


# --- SIZE (RFC 1870) ---------------------------------------------------------------------
def test_declared_size_over_limit_refused_at_mail(inbound):
    server = inbound({"limits": {"max_message_size": "10KiB"}})
    with RawClient(server.port) as c:
        assert "SIZE 10240" in c.ehlo().lines
        r = c.cmd("MAIL FROM:<a@example.com> SIZE=10241")
        assert (r.code, r.enhanced) == (552, "5.3.4"), r
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=10240").code == 250


def test_body_over_limit_refused_after_the_dot(inbound):
    server = inbound({"limits": {"max_message_size": "10KiB"}})
    line = b"z" * 98 + b"\r\n"
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        c.send(b"Subject: big\r\n\r\n" + line * 300 + b".\r\n")  # ~30 KB
        r = c.reply()
        assert (r.code, r.enhanced) == (552, "5.3.4"), r
        # Much bigger, in pieces: still one refusal after the dot.
        _open_data(c)
        for _ in range(20):
            c.send(line * 500)
        c.send(b".\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (552, "5.3.4"), r
        # The session survives; a message under the limit is queued.
        _open_data(c)
        c.send(b"Subject: small\r\n\r\n" + line * 50 + b".\r\n")
        r = c.reply()
        assert r.code == 250, r
    assert server.queued() == 1


def test_bdat_over_limit_refused(inbound):
    server = inbound({"limits": {"max_message_size": "10KiB"}})
    chunk = b"q" * 6000
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        c.replies(2)
        c.send(b"BDAT 6000\r\n" + chunk + b"BDAT 6000 LAST\r\n" + chunk)
        first, last = c.replies(2)
        assert first.code == 250
        assert (last.code, last.enhanced) == (552, "5.3.4"), last
        assert c.cmd("NOOP").code == 250
    assert server.queued() == 0


# --- pregreet ---------------------------------------------------------------------------
def test_pregreet_client_is_refused(inbound):
    server = inbound({"limits": {"greeting_delay": "2s"}})
    with RawClient(server.port, banner=False) as c:
        c.send(b"EHLO eager.client\r\n")
        r = c.reply()
        assert r.code == 554, r  # never a 220 first
        assert r.enhanced.startswith("5."), r
        assert c.expect_closed() == b""
    assert server.queued() == 0


def test_patient_client_is_served_after_greeting_delay(inbound):
    server = inbound({"limits": {"greeting_delay": "2s"}})
    with RawClient(server.port) as c:  # waits for the banner (up to 15 s)
        assert c.banner.code == 220
        c.ehlo()
        _open_data(c)
        c.send(b"Subject: patient\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250
    assert server.queued() == 1


# --- timeouts -----------------------------------------------------------------------------
def test_idle_client_times_out(inbound):
    server = inbound({"limits": {"command_timeout": "1s"}})
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.reply(timeout=15)
        assert (r.code, r.enhanced) == (421, "4.4.2"), r
        assert c.expect_closed() == b""


def test_partial_command_times_out(inbound):
    """A deadline per command, not per read: a half-sent line does not keep the
    session alive."""
    server = inbound({"limits": {"command_timeout": "1s"}})
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"NOOP")  # no CRLF, ever
        r = c.reply(timeout=15)
        assert (r.code, r.enhanced) == (421, "4.4.2"), r
        assert c.expect_closed() == b""


def test_half_sent_body_times_out(inbound):
    server = inbound({"limits": {"command_timeout": "1s", "data_timeout": "1s"}})
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        c.send(b"Subject: slow\r\n\r\nhalf a bo")
        r = c.reply(timeout=15)
        assert (r.code, r.enhanced) == (421, "4.4.2"), r
        assert c.expect_closed() == b""
    assert server.queued() == 0


# --- connection limits ------------------------------------------------------------------------
def test_max_connections(inbound):
    server = inbound({"limits": {"max_connections": 2}})
    c1 = RawClient(server.port)
    c2 = RawClient(server.port)
    try:
        assert c1.banner.code == 220 and c2.banner.code == 220
        c3 = RawClient(server.port, banner=False)
        with c3:
            r = c3.reply()
            assert (r.code, r.enhanced) == (421, "4.7.0"), r
            assert c3.expect_closed() == b""
        # The admitted sessions are unaffected.
        assert c1.cmd("NOOP").code == 250
        assert c2.cmd("NOOP").code == 250
        # Once one leaves, a slot frees up.
        assert c1.cmd("QUIT").code == 221
        c1.expect_closed()
        sessions = lambda: len(server.runtime.ctx.sessions)  # noqa: E731
        for _ in range(500):  # each call is a round trip through the server's loop
            if server.call(sessions) < 2:
                break
        assert server.call(sessions) < 2
        with RawClient(server.port) as c4:
            assert c4.banner.code == 220
            assert c4.ehlo().code == 250
    finally:
        c1.close()
        c2.close()


def test_max_connections_per_ip(inbound):
    server = inbound({"limits": {"max_connections_per_ip": 1}})
    with RawClient(server.port) as c1:
        with RawClient(server.port, banner=False) as c2:
            r = c2.reply()
            assert (r.code, r.enhanced) == (421, "4.7.0"), r
        assert c1.cmd("NOOP").code == 250


# --- P4: queue full -----------------------------------------------------------------------------
def test_queue_full_answers_452_and_keeps_serving(inbound):
    server = inbound({"queue": {"max_size": "1MiB"}})
    body = b"Subject: fill\r\n\r\n" + (b"f" * 98 + b"\r\n") * 1000  # ~100 KB
    accepted: list[str] = []
    refused = None
    with RawClient(server.port) as c:
        c.ehlo()
        for _ in range(40):
            _open_data(c)
            c.send(body + b".\r\n")
            r = c.reply()
            if r.code == 250:
                accepted.append(queue_id(r.text))
                continue
            refused = r
            break
        assert refused is not None, f"queue never filled; {len(accepted)} accepted"
        assert (refused.code, refused.enhanced) == (452, "4.3.1"), refused
        # The listener keeps answering on this session ...
        assert c.cmd("NOOP").code == 250
        # ... and a retry is refused the same way, never with a false 250.
        _open_data(c)
        c.send(body + b".\r\n")
        r = c.reply()
        assert r.code in (452, 451), r
    # ... and on new connections.
    with RawClient(server.port) as c2:
        assert c2.banner.code == 220
        assert c2.ehlo().code == 250
    print(f"queue full after {len(accepted)} messages")
    assert accepted, "not even one message fit"
    assert server.queued() == len(accepted)
    for msg_id in accepted:
        stored = server.call(lambda m=msg_id: server.store.get_body(id_bytes(m)))
        assert stored is not None and stored.endswith(body[-200:])


# --- graceful drain, real process --------------------------------------------------------------
def test_sigterm_lets_inflight_message_finish(serve, tmp_path: Path):
    proc = serve({"server": {"workers": 1, "shutdown_timeout": "20s"}})
    body_head = b"Subject: drain\r\n\r\n" + b"first half\r\n" * 100
    with RawClient(proc.port) as busy, RawClient(proc.port) as idle:
        busy.ehlo()
        idle.ehlo()
        _open_data(busy)
        busy.send(body_head)
        proc.signal(signal.SIGTERM)
        # The idle session is ended at once: proof that the worker is draining now.
        r = idle.reply(timeout=30)
        assert (r.code, r.enhanced) == (421, "4.3.2"), r
        assert idle.expect_closed() == b""
        # The session in DATA may finish its message and gets a real 250.
        busy.send(b"second half\r\n" * 100 + b".\r\n")
        done = busy.reply(timeout=30)
        assert done.code == 250, done
        msg_id = queue_id(done.text)
        # Then it is told the service is going away, or simply closed.
        rest = busy.expect_closed(timeout=30)
        assert rest in (b"", b"421 4.3.2 Service shutting down, closing connection\r\n"), rest
    assert proc.proc.wait(60) == 0
    # The acknowledged message is in the queue the process left behind.
    store = QueueStore(str(Path(proc.config_path).parent / "queue"), map_size=256 * 1024**2)
    try:
        assert store.count() == 1
        stored = store.get_body(id_bytes(msg_id))
        assert stored is not None and stored.endswith(b"second half\r\n")
    finally:
        store.close()
    # And nothing listens any more.
    s = socket.socket()
    s.settimeout(5)
    try:
        assert s.connect_ex((HOST, proc.port)) != 0
    finally:
        s.close()


def test_pregreet_flood_is_not_buffered_without_bound(inbound):
    """P8: a client that floods during the greeting delay is not read into memory
    without bound (the server has already decided it is a pregreeter)."""
    import select

    server = inbound({"limits": {"greeting_delay": "20s"}})
    chunk = b"EHLO flood\r\n" * 5462  # 64 KiB
    sent = 0
    with RawClient(server.port, banner=False) as c:
        c.sock.setblocking(False)
        while sent < 64 * 1024**2:
            try:
                sent += c.sock.send(chunk)
            except BlockingIOError:
                # Wait for the server to read more; if it stops reading, stop pushing.
                _, writable, _ = select.select([], [c.sock], [], 1.0)
                if not writable:
                    break
        ctx = server.runtime.ctx
        buffered = server.call(lambda: max((p.session.buffered for p in ctx.sessions), default=0))
        assert buffered <= 2 * 1024**2, f"{buffered} bytes buffered of {sent} sent before the greeting"


def _push(sock, chunk: bytes, limit: int) -> int:
    """Send `chunk` repeatedly without blocking until `limit` bytes went out or the
    server stops reading for a second; returns the bytes sent."""
    import select

    sock.setblocking(False)
    sent = 0
    while sent < limit:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 1.0)
            if not writable:
                break
    sock.settimeout(15)
    return sent


def _session_memory(server) -> int:
    """Input buffered plus output waiting in the transport, worst session."""
    ctx = server.runtime.ctx

    def worst() -> int:
        return max(
            (p.session.buffered + (p.transport.get_write_buffer_size() if p.transport else 0)
             for p in ctx.sessions),
            default=0,
        )

    return server.call(worst)


def test_reply_flood_from_a_client_that_never_reads(inbound):
    """P8: pipelined commands whose replies are never read stop being read once the
    output backs up; memory stays bounded. (The junk-command limit would end the
    session after 100 NOOPs; it is lifted here so only flow control is tested.)"""
    server = inbound({"limits": {"max_junk_commands": 10**9}})
    with RawClient(server.port) as c:
        c.ehlo()
        sent = _push(c.sock, b"NOOP\r\n" * 10923, 64 * 1024**2)
        memory = _session_memory(server)
        assert memory <= 8 * 1024**2, f"{memory} bytes held for a client that sent {sent}"
        assert sent < 64 * 1024**2, "the server kept reading although nobody read its replies"


def test_data_flood_without_terminator_is_bounded(inbound):
    """P8: content beyond the size limit is discarded while the terminator is still
    looked for; then one 552 and the session goes on."""
    server = inbound({"limits": {"max_message_size": "1MiB"}})
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        sent = _push(c.sock, (b"d" * 98 + b"\r\n") * 655, 48 * 1024**2)
        memory = _session_memory(server)
        assert memory <= 4 * 1024**2, f"{memory} bytes held after {sent} sent"
        c.send(b".\r\n")
        r = c.reply(timeout=30)
        assert (r.code, r.enhanced) == (552, "5.3.4"), r
        assert c.cmd("NOOP").code == 250
    assert server.queued() == 0


def _sessions_settle(server, want: int = 0, timeout: float = 10.0) -> int:
    """Live sessions on the server, polled (each poll a round trip through its loop)
    until `want` or the deadline: connection_lost runs a moment after the close."""
    import time

    ctx = server.runtime.ctx
    deadline = time.monotonic() + timeout
    while True:
        n = server.call(lambda: len(ctx.sessions))
        if n == want or time.monotonic() > deadline:
            return n


def _starttls_server(inbound, tls_files, **limits):
    return inbound({
        "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls"}],
        "limits": limits,
    })


def test_client_that_never_starts_the_tls_handshake_is_dropped(inbound, tls_files):
    server = _starttls_server(inbound, tls_files, command_timeout="1s")
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        rest = c.expect_closed(timeout=15)
        # A plaintext 421 may or may not make it out; nothing else may.
        assert rest in (b"", b"421 4.4.2 Timeout exceeded, closing connection\r\n"), rest
    # Whichever timer ended it (the sweeper or the handshake timeout), the session
    # no longer holds a connection slot.
    assert _sessions_settle(server) == 0


def test_session_timed_out_mid_handshake_frees_its_slot(inbound, tls_files):
    """The sweeper ending a session whose TLS handshake is pending must not leak it:
    a leaked session counts against max_connections forever. The sweeper's action is
    run at once (the handshake timeout is long, so it cannot win the race)."""
    server = _starttls_server(inbound, tls_files, command_timeout="60s", max_connections=1)
    ctx = server.runtime.ctx
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        server.call(lambda: [p.timed_out() for p in list(ctx.sessions)])
        assert c.expect_closed(timeout=15) in (b"", b"421 4.4.2 Timeout exceeded, closing connection\r\n")
    assert _sessions_settle(server) == 0
    # With max_connections = 1 the next client is served, not refused with 421.
    with RawClient(server.port) as c2:
        assert c2.banner.code == 220


def test_client_closing_mid_handshake_frees_its_slot(inbound, tls_files):
    server = _starttls_server(inbound, tls_files, max_connections=1)
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
    assert _sessions_settle(server) == 0
    with RawClient(server.port) as c2:
        assert c2.banner.code == 220


def test_implicit_tls_client_that_never_handshakes_is_dropped(inbound, tls_files):
    server = inbound({
        "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
        "listeners": [{"address": "127.0.0.1:0", "tls": "implicit"}],
        "limits": {"command_timeout": "1s"},
    })
    with RawClient(server.port, banner=False) as c:
        assert c.expect_closed(timeout=15) == b""
