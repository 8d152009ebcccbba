"""Inbound SMTP protocol over real loopback sockets into a real LMDB queue:
EHLO capabilities, PIPELINING, DATA (dot-unstuffing, trace header, DSN and SMTPUTF8
envelope facts), BDAT, and the small commands. Every reply read is checked for an
enhanced status code (smtp_raw does it), except the greeting, EHLO/HELO and 3xx."""

from __future__ import annotations

import pytest

from engine.queue.ids import id_bytes
from tests.integration.smtp_raw import SMTP, RawClient, queue_id

EXPECTED_CAPS = {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"}


def _record(server, msg_id: str):
    return server.call(lambda: server.store.get(id_bytes(msg_id)))


def _body(server, msg_id: str) -> bytes:
    return server.call(lambda: server.store.get_body(id_bytes(msg_id)))


# --- EHLO ------------------------------------------------------------------------------
def test_ehlo_advertises_extensions_and_size(inbound):
    server = inbound({"limits": {"max_message_size": "123456"}})
    with RawClient(server.port) as c:
        assert c.banner.code == 220
        assert "mx.volley.test" in c.banner.lines[0]
        reply = c.ehlo("client.test")
        assert reply.lines[0] == "mx.volley.test greets client.test"
        caps = set(reply.lines[1:])
        assert EXPECTED_CAPS <= caps
        assert "SIZE 123456" in caps
        # Plain listener, no auth configured: neither STARTTLS nor AUTH.
        assert not any(c.startswith(("STARTTLS", "AUTH")) for c in caps), caps
        # HELO is a plain 250 with no extensions.
        helo = c.cmd("HELO other.test", enhanced=False)
        assert helo.code == 250 and len(helo.lines) == 1


def test_smtplib_sees_the_extensions(inbound):
    server = inbound()
    with SMTP(server.port) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "chunking", "dsn"):
            assert client.has_extn(ext), ext
        assert int(client.esmtp_features["size"]) == 25 * 1024**2
        assert not client.has_extn("starttls")
        assert not client.has_extn("auth")


# --- PIPELINING --------------------------------------------------------------------------
def test_pipelined_envelope_body_and_quit(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<r1@example.org>\r\n"
            b"RCPT TO:<r2@example.org>\r\n"
            b"RCPT TO:<r3@example.org>\r\n"
            b"DATA\r\n"
        )
        mail, r1, r2, r3, data = c.replies(5)
        assert (mail.code, mail.enhanced) == (250, "2.1.0")
        assert [(r.code, r.enhanced) for r in (r1, r2, r3)] == [(250, "2.1.5")] * 3
        assert data.code == 354
        c.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        done = c.reply()
        assert (done.code, done.enhanced) == (250, "2.0.0"), done
        bye = c.reply()
        assert (bye.code, bye.enhanced) == (221, "2.0.0")
        assert c.expect_closed() == b""
    msg_id = queue_id(done.text)
    record = _record(server, msg_id)
    assert [r.address for r in record.recipients] == ["r1@example.org", "r2@example.org", "r3@example.org"]
    assert _body(server, msg_id).endswith(b"\r\nSubject: pipelined\r\n\r\nhello\r\n")


def test_two_transactions_pipelined_back_to_back(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        # Everything in one send: the second MAIL directly after the first dot.
        c.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: one\r\n\r\nfirst\r\n.\r\n"
            b"MAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n"
            b"Subject: two\r\n\r\nsecond\r\n.\r\n"
            b"QUIT\r\n"
        )
        got = c.replies(9)
        assert [r.code for r in got] == [250, 250, 354, 250, 250, 250, 354, 250, 221], got
        assert c.expect_closed() == b""
    first, second = queue_id(got[3].text), queue_id(got[7].text)
    assert first != second
    assert server.queued() == 2
    assert _record(server, first).sender == "a@example.com"
    assert _record(server, second).sender == "c@example.com"
    assert _body(server, first).endswith(b"Subject: one\r\n\r\nfirst\r\n")
    assert _body(server, second).endswith(b"Subject: two\r\n\r\nsecond\r\n")


def test_pipelined_refusals_do_not_stop_the_batch(inbound):
    """A refused RCPT in the middle of a pipelined group answers alone; the rest runs."""
    server = inbound({"relay": {"networks": ["10.0.0.0/8"], "local_domains": ["local.test"]}})
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<x@elsewhere.test>\r\n"
            b"RCPT TO:<y@local.test>\r\n"
            b"DATA\r\n"
            b"Subject: p\r\n\r\nx\r\n.\r\n"
        )
        got = c.replies(5)
        assert [(r.code, r.enhanced) for r in got[:3]] == [(250, "2.1.0"), (554, "5.7.1"), (250, "2.1.5")]
        assert got[3].code == 354 and got[4].code == 250
    assert [r.address for r in _record(server, queue_id(got[4].text)).recipients] == ["y@local.test"]


# --- DATA --------------------------------------------------------------------------------
def test_data_dot_unstuffing_and_received_header(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo("sender.example")
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [r.code for r in c.replies(3)] == [250, 250, 354]
        # Lines starting with a dot arrive stuffed with one extra dot.
        c.send(
            b"Subject: dots\r\n\r\n"
            b"..leading dot\r\n"
            b"...\r\n"
            b"..\r\n"
            b"middle . dot\r\n"
            b".\r\n"
        )
        done = c.reply()
        assert done.code == 250, done
    msg_id = queue_id(done.text)
    body = _body(server, msg_id)
    head, sep, content = body.partition(b"\r\nSubject: dots\r\n")
    assert sep, body
    assert content == b"\r\n.leading dot\r\n..\r\n.\r\nmiddle . dot\r\n"
    # RFC 5321 §4.4 trace header prepended, naming the HELO, client IP, host and id.
    assert head.startswith(b"Received: from sender.example ([127.0.0.1])\r\n")
    assert f"by mx.volley.test (Volley) with ESMTP id {msg_id}".encode() in head
    assert b"for <b@example.org>;" in head
    for line in (head + b"\r\n").split(b"\r\n")[:-1]:
        assert len(line) <= 78
    record = _record(server, msg_id)
    assert record.client_ip == "127.0.0.1"
    assert record.helo == "sender.example"
    assert record.size == len(body)


def test_empty_message_body(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n.\r\n")
        got = c.replies(4)
        assert [r.code for r in got] == [250, 250, 354, 250], got
    msg_id = queue_id(got[3].text)
    assert _record(server, msg_id).sender == ""
    body = _body(server, msg_id)
    assert body.startswith(b"Received: ") and body.endswith(b"\r\n")


def test_dsn_parameters_are_stored(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<a@example.com> RET=HDRS ENVID=env+2Bid+3D42 BODY=8BITMIME\r\n"
            b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.org\r\n"
            b"RCPT TO:<c@example.org> NOTIFY=NEVER\r\n"
            b"RCPT TO:<d@example.org>\r\n"
            b"DATA\r\n"
        )
        got = c.replies(5)
        assert [r.code for r in got] == [250, 250, 250, 250, 354], got
        c.send(b"Subject: dsn\r\n\r\n8bit \xc3\xa9\r\n.\r\n")
        done = c.reply()
        assert done.code == 250
    record = _record(server, queue_id(done.text))
    assert record.ret == "HDRS"
    assert record.envid == "env+id=42"
    assert record.body_type == "8BITMIME"
    assert record.smtputf8 is False
    b, c_, d = record.recipients
    assert (b.address, b.notify, b.orcpt) == ("b@example.org", ("SUCCESS", "FAILURE"), "rfc822;b@example.org")
    assert (c_.notify, c_.orcpt) == (("NEVER",), None)
    assert (d.notify, d.orcpt) == (None, None)


def test_bad_dsn_parameters_are_refused(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@example.com> RET=ALL").code == 501
        assert c.cmd("MAIL FROM:<a@example.com> FOO=1").code == 555
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        assert c.cmd("RCPT TO:<b@example.org> NOTIFY=NEVER,SUCCESS").code == 501
        assert c.cmd("RCPT TO:<b@example.org> ORCPT=noseparator").code == 501
        assert c.cmd("RCPT TO:<b@example.org>").code == 250


def test_smtputf8_message_is_stored_with_utf8_envelope(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send("MAIL FROM:<jörg@exämple.com> SMTPUTF8\r\nRCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\nDATA\r\n".encode())
        got = c.replies(3)
        assert [r.code for r in got] == [250, 250, 354], got
        c.send("Subject: ünïcode\r\n\r\nhällo\r\n.\r\n".encode())
        done = c.reply()
        assert done.code == 250
    msg_id = queue_id(done.text)
    record = _record(server, msg_id)
    assert record.smtputf8 is True
    assert record.sender == "jörg@exämple.com"
    assert record.recipients[0].address == "δοκιμή@παράδειγμα.δοκιμή"
    body = _body(server, msg_id)
    assert b" with UTF8SMTP id " in body
    assert body.endswith("Subject: ünïcode\r\n\r\nhällo\r\n".encode())


def test_utf8_address_without_smtputf8_is_refused(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<jörg@example.com>".encode())
        assert (r.code, r.enhanced) == (553, "5.6.7"), r
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        # The transaction has no SMTPUTF8: a UTF-8 recipient is refused too.
        r = c.cmd("RCPT TO:<jörg@example.org>".encode())
        assert (r.code, r.enhanced) == (553, "5.6.7"), r


# --- BDAT (RFC 3030) -----------------------------------------------------------------------
def test_bdat_chunks_are_joined(inbound):
    server = inbound()
    part1 = b"Subject: chunked\r\n\r\nfirst part, "
    part2 = b"second part\r\n"
    part3 = b"third part\r\n"
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        assert [r.code for r in c.replies(2)] == [250, 250]
        c.send(b"BDAT %d\r\n" % len(part1) + part1)
        r = c.reply()
        assert (r.code, r.enhanced) == (250, "2.0.0") and f"{len(part1)} octets" in r.text, r
        # Chunk header and data pipelined with the LAST chunk.
        c.send(b"BDAT %d\r\n" % len(part2) + part2 + b"BDAT %d LAST\r\n" % len(part3) + part3)
        r2, last = c.replies(2)
        assert r2.code == 250 and f"{len(part1) + len(part2)} octets" in r2.text, r2
        assert last.code == 250 and "queued as" in last.text, last
        # The session is back to READY: a new transaction works.
        assert c.cmd("MAIL FROM:<x@example.com>").code == 250
    body = _body(server, queue_id(last.text))
    assert body.endswith(b"\r\n" + part1 + part2 + part3)
    assert server.queued() == 1


def test_bdat_content_with_dot_line_stays_one_message(inbound):
    server = inbound()
    content = (
        b"Subject: bdat\r\n\r\nline one\r\n.\r\n"
        b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
        b"..two dots stay two\r\n"
    )
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        assert [r.code for r in c.replies(2)] == [250, 250]
        c.send(b"BDAT %d LAST\r\n" % len(content) + content + b"NOOP\r\n")
        done, noop = c.replies(2)
        assert done.code == 250 and "queued as" in done.text, done
        assert (noop.code, noop.text) == (250, "2.0.0 OK")
    assert server.queued() == 1
    # BDAT content is not dot-stuffed: stored byte for byte.
    assert _body(server, queue_id(done.text)).endswith(b"\r\n" + content)


def test_bdat_without_final_crlf_gets_one(inbound):
    server = inbound()
    content = b"Subject: x\r\n\r\nno final newline"
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        c.replies(2)
        c.send(b"BDAT %d LAST\r\n" % len(content) + content)
        done = c.reply()
        assert done.code == 250
    assert _body(server, queue_id(done.text)).endswith(content + b"\r\n")


def test_bdat_out_of_sequence_swallows_its_chunk(inbound):
    """RFC 3030 §2: the chunk follows the command even when it is refused, and must
    not be read as commands."""
    server = inbound()
    chunk = b"QUIT\r\nQUIT\r\n"
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
        refused, noop = c.replies(2)
        assert (refused.code, refused.enhanced) == (503, "5.5.1"), refused
        assert (noop.code, noop.enhanced) == (250, "2.0.0"), noop
    assert server.queued() == 0


def test_bdat_with_bare_lf_is_refused(inbound):
    server = inbound()
    content = b"Subject: x\r\n\r\nbare\nlf\r\n"
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        c.replies(2)
        c.send(b"BDAT %d LAST\r\n" % len(content) + content)
        r = c.reply()
        assert (r.code, r.enhanced) == (550, "5.6.0"), r
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
    assert server.queued() == 0


# --- the small commands ------------------------------------------------------------------
def test_rset_noop_help_vrfy_quit(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        assert c.cmd("RCPT TO:<b@example.org>").code == 250
        r = c.cmd("RSET")
        assert (r.code, r.enhanced) == (250, "2.0.0")
        # RSET ended the transaction: RCPT now needs a MAIL first.
        r = c.cmd("RCPT TO:<b@example.org>")
        assert (r.code, r.enhanced) == (503, "5.5.1")
        r = c.cmd("NOOP")
        assert (r.code, r.enhanced) == (250, "2.0.0")
        assert c.cmd("NOOP with an ignored argument").code == 250
        r = c.cmd("HELP")
        assert (r.code, r.enhanced) == (214, "2.0.0")
        r = c.cmd("VRFY postmaster")
        assert (r.code, r.enhanced) == (252, "2.5.0")
        r = c.cmd("EXPN staff")
        assert (r.code, r.enhanced) == (502, "5.5.1")
        # Verbs are case-insensitive.
        assert c.cmd("noop").code == 250
        r = c.cmd("QUIT")
        assert (r.code, r.enhanced) == (221, "2.0.0")
        assert c.expect_closed() == b""
    assert server.queued() == 0


def test_unknown_and_out_of_sequence_commands(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        # Before EHLO: MAIL is out of sequence.
        r = c.cmd("MAIL FROM:<a@example.com>")
        assert (r.code, r.enhanced) == (503, "5.5.1"), r
        r = c.cmd("FROBNICATE now")
        assert (r.code, r.enhanced) == (500, "5.5.1"), r
        c.ehlo()
        for line in ("RCPT TO:<b@example.org>", "DATA", "BDAT 0 LAST"):
            r = c.cmd(line)
            assert (r.code, r.enhanced) == (503, "5.5.1"), (line, r)
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        r = c.cmd("MAIL FROM:<again@example.com>")
        assert (r.code, r.enhanced) == (503, "5.5.1"), r
        # MAIL accepted but no RCPT: DATA is 554 5.5.1 (no valid recipients).
        r = c.cmd("DATA")
        assert (r.code, r.enhanced) == (554, "5.5.1"), r
        # The refused DATA did not switch to reading content: commands still work.
        assert c.cmd("RCPT TO:<b@example.org>").code == 250
        r = c.cmd("DATA")
        assert r.code == 354
        c.send(b"Subject: x\r\n\r\nok\r\n.\r\n")
        assert c.reply().code == 250
        # "junk" has the shape of an ESMTP keyword: unknown parameter.
        r = c.cmd("MAIL FROM:<a@example.com> junk")
        assert (r.code, r.enhanced) == (555, "5.5.4"), r
        r = c.cmd("MAIL FROM:a@example.com")
        assert (r.code, r.enhanced) == (501, "5.5.4"), r
    assert server.queued() == 1


def test_data_with_all_rcpts_refused_is_554(inbound):
    server = inbound({"relay": {"networks": ["10.0.0.0/8"], "local_domains": ["local.test"]}})
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\nNOOP\r\n")
        mail, rcpt, data, noop = c.replies(4)
        assert mail.code == 250 and rcpt.code == 554
        assert (data.code, data.enhanced) == (554, "5.5.1"), data
        # No 354 was sent, so the pipelined NOOP is a command, not message content.
        assert noop.code == 250
    assert server.queued() == 0


def test_too_many_errors_closes_the_session(inbound):
    server = inbound({"limits": {"max_unknown_commands": 3}})
    with RawClient(server.port) as c:
        c.ehlo()
        got = [c.cmd("BOGUS") for _ in range(3)]
        assert all(r.code == 500 for r in got)
        r = c.cmd("BOGUS")
        assert (r.code, r.enhanced) == (421, "4.7.0"), r
        assert c.expect_closed() == b""


def test_helo_session_is_plain_smtp_in_received(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        assert c.cmd("HELO old.example", enhanced=False).code == 250
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [r.code for r in c.replies(3)] == [250, 250, 354]
        c.send(b"x\r\n.\r\n")
        done = c.reply()
    body = _body(server, queue_id(done.text))
    assert b"Received: from old.example ([127.0.0.1])" in body
    assert b" with SMTP id " in body


def test_client_half_close_still_gets_its_replies(inbound):
    """A client that pipelines a whole transaction and then shuts down its sending
    side (`nc -N`, scripted senders) must still get the 250 for the message it sent:
    the message is committed either way, and a missing 250 means a retry and a
    duplicate delivery (RFC 1047)."""
    import socket

    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: half\r\n\r\nclosed\r\n.\r\nQUIT\r\n"
        )
        c.sock.shutdown(socket.SHUT_WR)
        got = c.replies(5)
        assert [r.code for r in got] == [250, 250, 354, 250, 221], got
        assert c.expect_closed() == b""
    assert server.queued() == 1
    assert _record(server, queue_id(got[3].text)).sender == "a@example.com"


def test_client_half_close_without_quit(inbound):
    import socket

    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: half\r\n\r\nclosed\r\n.\r\n"
        )
        c.sock.shutdown(socket.SHUT_WR)
        got = c.replies(4)
        assert [r.code for r in got] == [250, 250, 354, 250], got
        assert c.expect_closed() == b""
    assert server.queued() == 1


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_end_of_data_split_across_sends(inbound, cut):
    """The terminator search resumes correctly when CRLF.CRLF arrives in pieces,
    and a dot-stuffed line split at its CRLF is still unstuffed."""
    server = inbound()
    end = b"\r\n.\r\n"
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [r.code for r in c.replies(3)] == [250, 250, 354]
        c.send(b"Subject: split\r\n\r\nline\r\n")
        c.send(b"..stuffed\r")
        c.send(b"\n.")
        c.send(b"x\r\nlast" + end[:cut])
        c.send(end[cut:])
        done = c.reply()
        assert done.code == 250, done
        assert c.cmd("NOOP").code == 250
    body = _body(server, queue_id(done.text))
    assert body.endswith(b"\r\nSubject: split\r\n\r\nline\r\n.stuffed\r\nx\r\nlast\r\n")


def test_too_many_hops_is_refused_as_a_loop(inbound):
    """RFC 5321 §6.3: a message with max_hops Received: headers is refused 554 5.4.6."""
    import smtplib

    server = inbound({"limits": {"max_hops": 5}})
    looping = b"".join(b"Received: from hop%d by x; date\r\n" % i for i in range(5))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("c.test")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        code, text = client.data(looping + b"Subject: x\r\n\r\nbody\r\n")
        assert (code, text[:5]) == (554, b"5.4.6")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        four = looping[: looping.index(b"Received: from hop4")]
        code, _ = client.data(four + b"Subject: x\r\n\r\nbody\r\n")
        assert code == 250  # four hops are fine
    assert server.queued() == 1
