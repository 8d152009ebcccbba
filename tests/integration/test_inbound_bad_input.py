"""Hostile and broken input on real sockets (P5, P6, P8):
overlong lines, bare CR/LF smuggling, NUL and 8-bit bytes, STARTTLS injection."""

from __future__ import annotations

import pytest

from engine.queue.ids import id_bytes
from tests.integration.smtp_raw import RawClient, client_tls_context, queue_id

SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n"


def _open_data(c: RawClient) -> None:
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    got = c.replies(3)
    assert [r.code for r in got] == [250, 250, 354], got


def _send_ok_message(c: RawClient, subject: bytes = b"ok") -> str:
    _open_data(c)
    c.send(b"Subject: " + subject + b"\r\n\r\nfine\r\n.\r\n")
    r = c.reply()
    assert r.code == 250, r
    return queue_id(r.text)


# --- finding 2: overlong command lines -------------------------------------------------
def test_overlong_command_line_answered_once_and_tail_not_executed(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"NOOP " + b"A" * 70_000)
        # The tail of the same logical line, in a later send: if the framer lost
        # track of the line, "QUIT" would run as a command of its own (221 + close).
        c.send(b"QUIT\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (500, "5.5.2"), r
        r = c.cmd("NOOP")
        assert (r.code, r.enhanced) == (250, "2.0.0"), r
        assert c.pending() == b""


def test_command_line_limit_is_512_octets(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        # 510 octets + CRLF = 512: legal. One more octet: too long.
        assert c.cmd(b"NOOP " + b"x" * 505).code == 250
        r = c.cmd(b"NOOP " + b"x" * 506)
        assert (r.code, r.enhanced) == (500, "5.5.2"), r
        # An overlong MAIL is refused whole; the session still works.
        r = c.cmd(b"MAIL FROM:<" + b"a" * 600 + b"@example.com>")
        assert r.code == 500, r
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250


def test_overlong_line_in_one_segment_with_pipelined_commands(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"NOOP " + b"B" * 5000 + b"QUIT\r\nNOOP\r\nRSET\r\n")
        long_, noop, rset = c.replies(3)
        assert (long_.code, long_.enhanced) == (500, "5.5.2")
        assert noop.code == 250 and rset.code == 250 and "Reset" in rset.text


# --- DATA line length (RFC 5321 §4.5.3.1.6) ----------------------------------------------
def test_data_line_over_1000_octets_refuses_the_message(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        c.send(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\nshort\r\n.\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (550, "5.5.2"), r
        # Exactly 998 octets + CRLF is legal.
        _open_data(c)
        c.send(b"Subject: max\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n")
        r = c.reply()
        assert r.code == 250, r
        msg_id = queue_id(r.text)
    assert server.queued() == 1
    assert server.call(lambda: server.store.get_body(id_bytes(msg_id))).endswith(b"y" * 998 + b"\r\n")


def test_huge_data_line_with_fake_terminator_tail(inbound):
    """Finding 2 inside DATA: a 70 000-octet line whose tail, sent later, looks like
    an end of data plus a command. Only CRLF.CRLF ends the message, and the message
    is refused as one."""
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        c.send(b"Subject: huge\r\n\r\n" + b"A" * 70_000)
        c.send(b".\r\n" + SMUGGLED)
        c.send(b"\r\n.\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (550, "5.5.2"), r
        r = c.cmd("NOOP")
        assert (r.code, r.enhanced) == (250, "2.0.0"), r
        # The session survives: the next transaction is queued.
        _send_ok_message(c)
    assert server.queued() == 1


# --- finding 3 / P5: bare CR and LF, SMTP smuggling ------------------------------------------
@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\n..\r\n"],
    ids=["LF.LF", "LF.CRLF", "CR.CRLF", "CRLF.CR", "CRLF.LF", "LF..CRLF"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-send", "split"])
def test_smuggling_variants_never_queue_a_second_message(inbound, fake_end, split):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        parts = [b"Subject: innocent\r\n\r\nhello", fake_end + SMUGGLED, b"\r\n.\r\n"]
        if split:
            for p in parts:
                c.send(p)
        else:
            c.send(b"".join(parts))
        r = c.reply()
        assert (r.code, r.enhanced) == (550, "5.6.0"), r
        # Exactly one reply for the whole thing: the next one answers our NOOP.
        r = c.cmd("NOOP")
        assert (r.code, r.text) == (250, "2.0.0 OK"), r
        assert c.pending() == b""
    assert server.queued() == 0


@pytest.mark.parametrize("body", [b"bare\nLF\r\n", b"bare\rCR\r\n", b"ends with CR\r\r\n"])
def test_bare_line_endings_are_refused(inbound, body):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        _open_data(c)
        c.send(b"Subject: x\r\n\r\n" + body + b".\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (550, "5.6.0"), r
        # The session survives and the next clean message is queued.
        _send_ok_message(c)
    assert server.queued() == 1


# --- NUL and 8-bit bytes in commands -----------------------------------------------------------
@pytest.mark.parametrize(
    "line",
    [b"NOOP\x00", b"NO\x00OP", b"HELP \xff\xfe", b"MAIL FROM:<a\x00b@example.com>",
     b"MAIL FROM:<\xe9t\xe9@example.com>", b"RSET\x80"],
)
def test_nul_and_8bit_bytes_in_commands(inbound, line):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd(line)
        assert (r.code, r.enhanced) == (500, "5.5.2"), r
        # Nothing was executed: still no transaction, so RCPT needs MAIL.
        assert c.cmd("RCPT TO:<b@example.org>").code == 503
        assert c.cmd("NOOP").code == 250


def test_utf8_address_with_smtputf8_is_accepted(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<usér@exämple.test> SMTPUTF8".encode())
        assert (r.code, r.enhanced) == (250, "2.1.0"), r
        r = c.cmd("RCPT TO:<ñame@example.org>".encode())
        assert r.code == 250, r


# --- finding 1 / P6: STARTTLS injection (CVE-2011-0411) -----------------------------------------
@pytest.fixture
def starttls_server(inbound, tls_files):
    return inbound({
        "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls"}],
    })


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"MAIL FROM:<x@y.test>\r\n", b"MAIL FROM:<x@y.test>\r\nRCPT TO:<v@z.test>\r\nDATA\r\n"],
    ids=["RSET", "MAIL", "envelope"],
)
def test_starttls_pipelined_plaintext_is_not_executed(starttls_server, tls_files, injected):
    server = starttls_server
    with RawClient(server.port) as c:
        ehlo = c.ehlo()
        assert "STARTTLS" in ehlo.lines
        c.send(b"STARTTLS\r\n" + injected)
        r = c.reply()
        assert (r.code, r.enhanced) == (220, "2.0.0"), r
        # No plaintext reply to the injected command may follow the 220.
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        # Before a new EHLO, MAIL is out of sequence: the session state was reset
        # and the injected MAIL (if any) did not open a transaction.
        r = c.cmd("MAIL FROM:<a@example.com>")
        assert (r.code, r.enhanced) == (503, "5.5.1"), r
        ehlo = c.ehlo()
        # The first reply after the handshake answered what we sent after it.
        assert ehlo.lines[0] == "mx.volley.test greets client.test"
        assert "STARTTLS" not in ehlo.lines
        r = c.cmd("NOOP")
        assert (r.code, r.text) == (250, "2.0.0 OK"), r
        assert c.pending() == b""
        # A fresh transaction works and nothing injected reached it.
        r = c.cmd("MAIL FROM:<a@example.com>")
        assert r.code == 250
        assert c.cmd("RCPT TO:<b@example.org>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: tls\r\n\r\nsecure\r\n.\r\n")
        done = c.reply()
        assert done.code == 250
    assert server.queued() == 1
    record = server.call(lambda: server.store.get(id_bytes(queue_id(done.text))))
    assert record.sender == "a@example.com"
    assert [r.address for r in record.recipients] == ["b@example.org"]
    body = server.call(lambda: server.store.get_body(id_bytes(queue_id(done.text))))
    assert b" with ESMTPS id " in body


def test_starttls_refused_where_not_offered(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd("STARTTLS")
        assert (r.code, r.enhanced) == (502, "5.5.1"), r
        # Plaintext goes on.
        assert c.cmd("NOOP").code == 250


def test_starttls_twice_and_with_argument(starttls_server, tls_files):
    with RawClient(starttls_server.port) as c:
        c.ehlo()
        r = c.cmd("STARTTLS now")
        assert (r.code, r.enhanced) == (501, "5.5.4"), r
        assert c.cmd("STARTTLS").code == 220
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        c.ehlo()
        r = c.cmd("STARTTLS")
        assert r.code in (454, 503), r
        assert c.cmd("NOOP").code == 250


def test_failed_tls_handshake_closes_only_that_session(starttls_server):
    server = starttls_server
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        # Garbage instead of a ClientHello: the server ends the session.
        c.send(b"this is not TLS\r\n" * 20)
        c.expect_closed()
    with RawClient(server.port) as c2:
        c2.ehlo()
        assert c2.cmd("NOOP").code == 250


@pytest.mark.parametrize("tls_max", ["TLSv1_3", "TLSv1_2"])
def test_command_in_same_segment_as_client_finished_is_served(starttls_server, tls_files, tls_max):
    """The other side of the boundary: a client whose first command after the
    handshake shares a segment with its Finished message must be answered, not
    discarded as if it were pre-TLS plaintext."""
    import ssl

    ctx = client_tls_context(tls_files["ca_file"])
    ctx.maximum_version = getattr(ssl.TLSVersion, tls_max)
    with RawClient(starttls_server.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        c.starttls_handshake_with(ctx, b"EHLO after.tls\r\nNOOP\r\n")
        ehlo = c.reply(enhanced=False)
        assert ehlo.code == 250 and ehlo.lines[0] == "mx.volley.test greets after.tls", ehlo
        assert c.reply().code == 250
        assert c.sock.version() == tls_max.replace("_", ".")
