"""engine.smtp.client: reply parsing, EHLO capabilities and the Transaction machine.

Pure and in memory. The most valuable tests are at the bottom: the client's bytes drive
the real ServerSession, whose replies are parsed and fed back, and the server must
receive exactly the body the client was given.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.smtp.client import (
    QUIT,
    STARTTLS,
    Capabilities,
    ClientProtocolError,
    Envelope,
    Recipient,
    RemoteReply,
    ReplyParser,
    Transaction,
    auth_login,
    auth_plain,
    dot_stuff,
    greeting_bytes,
    helo_bytes,
    parse_ehlo,
    starttls_ready,
)
from engine.smtp.client_replies import MAX_REPLY_LINE, MAX_REPLY_LINES
from engine.smtp.commands import Mail, Rcpt
from engine.smtp.replies import Reply
from engine.smtp.server import CommandReceived, Event, ServerSession
from tests.unit.helpers import EHLO, commands, drive, messages, new_session, split_at, wire

OK = Reply(250, "2.0.0", "OK")
GO = Reply(354, "", "Go ahead")
NO_USER = Reply(550, "5.1.1", "No such user")
LATER = Reply(450, "4.2.1", "Try later")
BAD_SEQ = Reply(503, "5.5.1", "Bad sequence")
QUEUED = Reply(250, "2.0.0", "Queued as X")

PIPE = Capabilities(pipelining=True)
LOCK = Capabilities()
BODY = b"Subject: hi\r\n\r\n.leading dot\r\nline\r\n"
STUFFED = b"Subject: hi\r\n\r\n..leading dot\r\nline\r\n"


def env(*rcpts: str, body: bytes = BODY, **kw: object) -> Envelope:
    recipients = [Recipient(a) for a in (rcpts or ("r1@example.org",))]
    return Envelope("s@example.com", recipients, body, **kw)  # type: ignore[arg-type]


def parse_all(data: bytes) -> tuple[list[RemoteReply], Reply | None]:
    """Every reply in `data` and the error that stopped parsing (None if none)."""
    parser = ReplyParser()
    parser.feed(data)
    return drain(parser)


def drain(parser: ReplyParser, out: list[RemoteReply] | None = None) -> tuple[list[RemoteReply], Reply | None]:
    out = [] if out is None else out
    try:
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    except ClientProtocolError as err:
        return out, err.reply
    return out, None


def parse_bytewise(data: bytes) -> tuple[list[RemoteReply], Reply | None]:
    parser = ReplyParser()
    out: list[RemoteReply] = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        out, error = drain(parser, out)
        if error is not None:
            return out, error
    return out, None


def script(tx: Transaction, replies: Iterable[Reply]) -> list[bytes]:
    """Writes of a transaction answered by `replies` in order (initial write first)."""
    writes = [tx.initial_bytes()]
    for reply in replies:
        out = tx.on_reply(reply)
        if out is not None:
            writes.append(out)
    return writes


# --- reply parser -----------------------------------------------------------------
def test_single_line_with_enhanced_code() -> None:
    (reply,), error = parse_all(b"250 2.1.5 Recipient OK\r\n")
    assert error is None
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.1.5", "Recipient OK")
    assert reply.raw == ("250 2.1.5 Recipient OK",)
    assert isinstance(reply, Reply)


def test_multiline_strips_the_same_enhanced_code_only() -> None:
    (reply,), _ = parse_all(b"550-5.1.1 no such\r\n550-5.1.1 user here\r\n550 5.7.1 other\r\n")
    assert reply.enhanced == "5.1.1"
    assert reply.lines == ("no such", "user here", "5.7.1 other")
    assert reply.raw[2] == "550 5.7.1 other"


def test_no_enhanced_code_and_lookalikes() -> None:
    replies, _ = parse_all(b"220 mx.example ESMTP\r\n250 1.2.3 not a class\r\n250 2.0.0.1 nope\r\n250 2.0.0\r\n")
    assert [r.enhanced for r in replies] == ["", "", "", "2.0.0"]
    assert replies[1].text == "1.2.3 not a class"
    assert replies[3].text == ""


def test_bare_code_last_line_and_bare_lf() -> None:
    replies, error = parse_all(b"250\r\n250-a\n250 b\n354\n")
    assert error is None
    assert [(r.code, r.lines) for r in replies] == [(250, ("",)), (250, ("a", "b")), (354, ("",))]


def test_non_utf8_text_is_kept_escaped() -> None:
    (reply,), _ = parse_all(b"550 caf\xe9\r\n")
    assert reply.text == "caf\\xe9"


def test_partial_reply_waits_and_buffered_counts() -> None:
    parser = ReplyParser()
    parser.feed(b"250-one\r\n250-tw")
    assert parser.next_reply() is None
    assert parser.buffered == len(b"250-one\r\n250-tw")
    parser.feed(b"o\r\n250 three\r\n220 x\r\n")
    reply = parser.next_reply()
    assert reply is not None and reply.lines == ("one", "two", "three")
    assert parser.buffered == len(b"220 x\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n",
        b"abc\r\n",
        b"25\r\n",
        b"2500 x\r\n",
        b"250x\r\n",
        b"650 six\r\n",
        b"150 one\r\n",
        b"25a ok\r\n",
        b"250-a\r\n251 b\r\n",
        b"250-a\r\nfoo\r\n",
        b"2" * (MAX_REPLY_LINE - 1) + b"\r\n",
        b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n",
    ],
)
def test_malformed_replies_raise(data: bytes) -> None:
    replies, error = parse_all(data)
    assert replies == [] and error is not None
    assert error.code == 451 and error.enhanced == "4.5.0"


def test_limits_are_inclusive() -> None:
    longest = b"250 " + b"x" * (MAX_REPLY_LINE - 6) + b"\r\n"
    assert len(longest) == MAX_REPLY_LINE
    assert parse_all(longest)[1] is None
    most = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n"
    (reply,), error = parse_all(most)
    assert error is None and len(reply.lines) == MAX_REPLY_LINES


def test_overlong_line_fails_before_its_end_arrives() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * MAX_REPLY_LINE)
    with pytest.raises(ClientProtocolError):
        parser.next_reply()
    with pytest.raises(ClientProtocolError):  # sticky
        parser.next_reply()


def test_replies_before_an_error_are_delivered() -> None:
    replies, error = parse_all(b"250 ok\r\n251-x\r\n252 y\r\n250 z\r\n")
    assert [r.code for r in replies] == [250]
    assert error is not None


_REPLY_LINES = st.one_of(
    st.builds(
        lambda code, sep, text: b"%d%s%s\r\n" % (code, sep, text),
        st.sampled_from([220, 250, 354, 421, 451, 550, 250, 250]),
        st.sampled_from([b" ", b"-", b"-", b""]),
        st.sampled_from([b"", b"OK", b"2.1.5 OK", b"5.1.1 no", b"caf\xc3\xa9", b"\xff"]),
    ),
    st.binary(max_size=12),
    st.just(b"x" * 700),
)
REPLY_STREAMS = st.lists(_REPLY_LINES, max_size=20).map(b"".join)


@given(REPLY_STREAMS)
@settings(max_examples=300)
def test_byte_at_a_time_equals_all_at_once(data: bytes) -> None:
    assert parse_bytewise(data) == parse_all(data)


@given(st.binary(max_size=3000) | REPLY_STREAMS)
@settings(max_examples=300)
def test_any_bytes_give_replies_or_client_protocol_error(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    try:
        while (reply := parser.next_reply()) is not None:
            assert 200 <= reply.code <= 599
            assert len(reply.lines) <= MAX_REPLY_LINES
    except ClientProtocolError as err:
        assert err.reply.code == 451


# --- EHLO and helpers ---------------------------------------------------------------
EHLO_REPLY = (
    b"250-mx.example.org Hello\r\n250-pipelining\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n"
    b"250-AUTH PLAIN login\r\n250-AUTH=XOAUTH2\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n"
    b"250-SMTPUTF8\r\n250-DSN\r\n250-X-UNKNOWN foo\r\n250 STARTTLS\r\n"
)


def test_parse_ehlo_full() -> None:
    (reply,), _ = parse_all(EHLO_REPLY)
    assert parse_ehlo(reply) == Capabilities(
        pipelining=True,
        size=35882577,
        chunking=True,
        smtputf8=True,
        eightbitmime=True,
        starttls=True,
        dsn=True,
        enhancedstatuscodes=True,
        auth=frozenset({"PLAIN", "LOGIN", "XOAUTH2"}),
    )


@pytest.mark.parametrize(("line", "size"), [(b"SIZE", 0), (b"SIZE 0", 0), (b"SIZE junk", 0), (b"SIZE 1000", 1000)])
def test_parse_ehlo_size(line: bytes, size: int) -> None:
    (reply,), _ = parse_all(b"250-mx\r\n250 " + line + b"\r\n")
    assert parse_ehlo(reply).size == size


def test_parse_ehlo_greeting_only_and_refused() -> None:
    (reply,), _ = parse_all(b"250 mx.example.org\r\n")
    assert parse_ehlo(reply) == Capabilities()
    with pytest.raises(ValueError):
        parse_ehlo(Reply(502, "5.5.1", "EHLO not supported"))


def test_helpers() -> None:
    assert greeting_bytes("relay.example.com") == b"EHLO relay.example.com\r\n"
    assert helo_bytes("relay.example.com") == b"HELO relay.example.com\r\n"
    for bad in ("", "a b", "a\r\nMAIL"):
        with pytest.raises(ValueError):
            greeting_bytes(bad)
    assert STARTTLS == b"STARTTLS\r\n" and QUIT == b"QUIT\r\n"
    assert starttls_ready(Reply(220, "2.0.0", "Go")) and not starttls_ready(Reply(454, "4.7.0", "No"))
    line = auth_plain("user", "pässword")
    assert line.startswith(b"AUTH PLAIN ") and line.endswith(b"\r\n")
    assert base64.b64decode(line[11:-2]) == "\0user\0pässword".encode()
    assert base64.b64decode(auth_plain("u", "p", authzid="admin")[11:-2]) == b"admin\0u\0p"
    with pytest.raises(ValueError):
        auth_plain("u\0x", "p")
    assert auth_login("user", "") == (b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"\r\n")


# --- dot-stuffing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "stuffed"),
    [
        (b"", b""),
        (b"plain\r\n", b"plain\r\n"),
        (b".\r\n", b"..\r\n"),
        (b".first\r\nmid.dle\r\n..two\r\n.\r\n", b"..first\r\nmid.dle\r\n...two\r\n..\r\n"),
    ],
)
def test_dot_stuff(body: bytes, stuffed: bytes) -> None:
    assert dot_stuff(body) == stuffed


# --- Transaction, scripted replies --------------------------------------------------------
def test_pipelined_all_accepted() -> None:
    tx = Transaction(env("a@x.org", "b@x.org"), PIPE, first_on_connection=True)
    assert tx.precheck() is None and tx.phase is None
    first = tx.initial_bytes()
    assert first == (
        b"MAIL FROM:<s@example.com>\r\nRCPT TO:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n"
    )
    assert tx.pending_phases == ("mail", "rcpt", "rcpt", "data")
    assert tx.on_reply(OK) is None and tx.phase == "rcpt"
    assert tx.on_reply(OK) is None and tx.on_reply(OK) is None and tx.phase == "data"
    assert tx.on_reply(GO) == STUFFED + b".\r\n"
    assert tx.phase == "data_end" and not tx.done
    with pytest.raises(RuntimeError):
        _ = tx.outcomes
    assert tx.on_reply(QUEUED) is None
    assert tx.done and tx.clean and tx.outcomes == [QUEUED, QUEUED] and tx.phase is None


def test_lockstep_all_accepted() -> None:
    tx = Transaction(env("a@x.org", "b@x.org"), LOCK, first_on_connection=True)
    assert tx.initial_bytes() == b"MAIL FROM:<s@example.com>\r\n"
    assert tx.pending_phases == ("mail",)
    assert tx.on_reply(OK) == b"RCPT TO:<a@x.org>\r\n"
    assert tx.on_reply(OK) == b"RCPT TO:<b@x.org>\r\n"
    assert tx.on_reply(OK) == b"DATA\r\n" and tx.phase == "data"
    assert tx.on_reply(GO) == STUFFED + b".\r\n"
    assert tx.on_reply(QUEUED) is None
    assert tx.done and tx.clean and tx.outcomes == [QUEUED, QUEUED]


@pytest.mark.parametrize("caps", [PIPE, LOCK], ids=["pipelined", "lockstep"])
def test_some_rcpts_refused(caps: Capabilities) -> None:
    tx = Transaction(env("a@x.org", "b@x.org", "c@x.org"), caps, first_on_connection=True)
    writes = script(tx, [OK, NO_USER, OK, LATER, GO, QUEUED])
    assert writes[-1] == STUFFED + b".\r\n"
    assert tx.done and tx.clean and tx.outcomes == [NO_USER, QUEUED, LATER]


def test_pipelined_all_rcpts_refused_but_354_sends_lone_dot() -> None:
    tx = Transaction(env("a@x.org", "b@x.org"), PIPE, first_on_connection=True)
    writes = script(tx, [OK, NO_USER, LATER, GO])
    assert writes[-1] == b".\r\n"  # RFC 2920 §3.1
    assert tx.phase == "data_end"
    tx.on_reply(Reply(554, "5.5.1", "No valid recipients"))
    assert tx.done and tx.clean and tx.outcomes == [NO_USER, LATER]


def test_pipelined_all_rcpts_refused_data_refused_needs_rset() -> None:
    tx = Transaction(env("a@x.org"), PIPE, first_on_connection=True)
    script(tx, [OK, NO_USER, Reply(554, "5.5.1", "No valid recipients")])
    assert tx.done and not tx.clean and tx.outcomes == [NO_USER]


def test_lockstep_all_rcpts_refused_sends_no_data() -> None:
    tx = Transaction(env("a@x.org", "b@x.org"), LOCK, first_on_connection=True)
    writes = script(tx, [OK, NO_USER, LATER])
    assert writes == [b"MAIL FROM:<s@example.com>\r\n", b"RCPT TO:<a@x.org>\r\n", b"RCPT TO:<b@x.org>\r\n"]
    assert tx.done and not tx.clean and tx.outcomes == [NO_USER, LATER]


def test_mail_refused_pipelined_every_recipient_gets_mail_reply() -> None:
    refused = Reply(550, "5.7.1", "Sender blocked")
    tx = Transaction(env("a@x.org", "b@x.org"), PIPE, first_on_connection=True)
    script(tx, [refused, BAD_SEQ, BAD_SEQ, BAD_SEQ])
    assert tx.done and tx.clean and tx.outcomes == [refused, refused]


def test_mail_refused_pipelined_with_354_sends_lone_dot() -> None:
    refused = Reply(451, "4.3.0", "Try later")
    tx = Transaction(env("a@x.org"), PIPE, first_on_connection=True)
    writes = script(tx, [refused, OK, GO, OK])
    assert writes[-1] == b".\r\n"
    assert tx.done and tx.clean and tx.outcomes == [refused]


def test_mail_refused_lockstep_stops() -> None:
    refused = Reply(550, "5.7.1", "Sender blocked")
    tx = Transaction(env("a@x.org", "b@x.org"), LOCK, first_on_connection=True)
    assert script(tx, [refused]) == [b"MAIL FROM:<s@example.com>\r\n"]
    assert tx.done and tx.clean and tx.outcomes == [refused, refused]


@pytest.mark.parametrize("caps", [PIPE, LOCK], ids=["pipelined", "lockstep"])
def test_data_refused(caps: Capabilities) -> None:
    refused = Reply(451, "4.3.0", "Not now")
    tx = Transaction(env("a@x.org", "b@x.org"), caps, first_on_connection=True)
    script(tx, [OK, NO_USER, OK, refused])
    assert tx.done and not tx.clean and tx.outcomes == [NO_USER, refused]


@pytest.mark.parametrize("final", [Reply(451, "4.7.1", "Greylisted"), Reply(554, "5.7.1", "Spam")])
@pytest.mark.parametrize("caps", [PIPE, LOCK], ids=["pipelined", "lockstep"])
def test_final_reply_refused(caps: Capabilities, final: Reply) -> None:
    tx = Transaction(env("a@x.org", "b@x.org"), caps, first_on_connection=True)
    script(tx, [OK, OK, NO_USER, GO, final])
    assert tx.done and tx.clean and tx.outcomes == [final, NO_USER]


@pytest.mark.parametrize("pipelining", [True, False])
def test_chunking(pipelining: bool) -> None:
    caps = Capabilities(pipelining=pipelining, chunking=True)
    tx = Transaction(env("a@x.org", "b@x.org"), caps, first_on_connection=True)
    first = tx.initial_bytes()
    rcpts = b"RCPT TO:<a@x.org>\r\nRCPT TO:<b@x.org>\r\n"
    bdat = b"BDAT %d LAST\r\n" % len(BODY) + BODY  # no stuffing, no terminator (RFC 3030 §2)
    if pipelining:
        # RFC 3030 §4.2: BDAT and its chunk ride in the pipelined group.
        assert first == b"MAIL FROM:<s@example.com>\r\n" + rcpts + bdat
        assert tx.on_reply(OK) is None and tx.on_reply(OK) is None
        assert tx.on_reply(NO_USER) is None
    else:
        assert tx.on_reply(OK) == b"RCPT TO:<a@x.org>\r\n"
        assert tx.on_reply(OK) == b"RCPT TO:<b@x.org>\r\n"
        assert tx.on_reply(NO_USER) == bdat
    assert tx.phase == "data_end"
    tx.on_reply(QUEUED)
    assert tx.done and tx.clean and tx.outcomes == [QUEUED, NO_USER]


def test_chunking_refused_needs_rset_and_all_refused_keeps_refusals() -> None:
    caps = Capabilities(pipelining=True, chunking=True)
    tx = Transaction(env(), caps, first_on_connection=True)
    script(tx, [OK, OK, Reply(552, "5.3.4", "Too big")])
    assert tx.done and not tx.clean and tx.outcomes[0].code == 552
    # Every RCPT refused: the chunk was already sent; the server refuses the BDAT.
    tx = Transaction(env(), caps, first_on_connection=True)
    assert len(script(tx, [OK, NO_USER, Reply(554, "5.5.1", "No valid recipients")])) == 1
    assert tx.done and not tx.clean and tx.outcomes == [NO_USER]


def test_precheck_smtputf8() -> None:
    tx = Transaction(env("δ@x.org", needs_smtputf8=True), PIPE, first_on_connection=True)
    refusal = tx.precheck()
    assert refusal is not None and (refusal.code, refusal.enhanced) == (550, "5.6.7")
    assert tx.done and tx.clean and tx.outcomes == [refusal]
    with pytest.raises(RuntimeError):
        tx.initial_bytes()
    caps = Capabilities(pipelining=True, smtputf8=True)
    tx = Transaction(env("δ@x.org", needs_smtputf8=True), caps, first_on_connection=True)
    assert tx.precheck() is None
    assert tx.initial_bytes().startswith("MAIL FROM:<s@example.com> SMTPUTF8\r\nRCPT TO:<δ@x.org>".encode())


def test_precheck_size() -> None:
    body = b"x" * 98 + b"\r\n"
    for limit, refused in [(99, True), (100, False), (0, False)]:
        tx = Transaction(env(body=body), Capabilities(size=limit), first_on_connection=True)
        refusal = tx.precheck()
        assert (refusal is not None and (refusal.code, refusal.enhanced) == (552, "5.3.4")) is refused
        if not refused:
            assert tx.initial_bytes() == b"MAIL FROM:<s@example.com> SIZE=100\r\n"
    tx = Transaction(env(body=body, size=5000), Capabilities(size=1000), first_on_connection=True)
    assert tx.precheck() is not None  # the declared size counts


def test_8bit_body() -> None:
    body = "café\r\n".encode()
    tx = Transaction(env(body=body, body_8bit=True), LOCK, first_on_connection=True)
    refusal = tx.precheck()
    assert refusal is not None and (refusal.code, refusal.enhanced) == (554, "5.6.3")
    tx = Transaction(env(body=body, body_8bit=True), Capabilities(eightbitmime=True), first_on_connection=True)
    assert tx.initial_bytes() == b"MAIL FROM:<s@example.com> BODY=8BITMIME\r\n"


def test_dsn_params_only_when_advertised() -> None:
    envelope = Envelope(
        "s@example.com",
        [Recipient("a@x.org", notify=("FAILURE", "DELAY"), orcpt="rfc822;a@x.org"), Recipient("b@x.org")],
        BODY,
        ret="HDRS",
        envid="Q1+2",
    )
    plain = Transaction(envelope, PIPE, first_on_connection=True).initial_bytes()
    assert b"NOTIFY" not in plain and b"RET=" not in plain and b"ORCPT" not in plain
    with_dsn = Transaction(envelope, Capabilities(pipelining=True, dsn=True), first_on_connection=True)
    assert with_dsn.initial_bytes() == (
        b"MAIL FROM:<s@example.com> RET=HDRS ENVID=Q1+2B2\r\n"
        b"RCPT TO:<a@x.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a@x.org\r\nRCPT TO:<b@x.org>\r\nDATA\r\n"
    )


def test_body_without_final_crlf_gets_one() -> None:
    tx = Transaction(env(body=b".a\r\nb"), LOCK, first_on_connection=True)
    assert script(tx, [OK, OK, GO])[-1] == b"..a\r\nb\r\n.\r\n"
    tx = Transaction(env(body=b""), LOCK, first_on_connection=True)
    assert script(tx, [OK, OK, GO])[-1] == b".\r\n"


@pytest.mark.parametrize("caps", [PIPE, LOCK], ids=["pipelined", "lockstep"])
def test_rset_policy(caps: Capabilities) -> None:
    first = Transaction(env(), caps, first_on_connection=True, needs_rset=True)
    assert not first.initial_bytes().startswith(b"RSET")  # never before the first message
    clean = Transaction(env(), caps, first_on_connection=False)
    assert clean.initial_bytes().startswith(b"MAIL")
    tx = Transaction(env(), caps, first_on_connection=False, needs_rset=True)
    writes = script(tx, [OK, OK, OK, GO, QUEUED])
    if caps.pipelining:
        assert writes[0].startswith(b"RSET\r\nMAIL FROM:") and len(writes) == 2
    else:
        assert writes[:2] == [b"RSET\r\n", b"MAIL FROM:<s@example.com>\r\n"]
    assert tx.done and tx.clean and tx.outcomes == [QUEUED]


def test_rset_refused_defers_everyone() -> None:
    refused = Reply(502, "5.5.1", "RSET junk")
    tx = Transaction(env("a@x.org"), LOCK, first_on_connection=False, needs_rset=True)
    assert script(tx, [refused]) == [b"RSET\r\n"]
    assert tx.done and not tx.clean
    outcome = tx.outcomes[0]
    assert outcome.code == 451 and "RSET junk" in outcome.lines
    tx = Transaction(env("a@x.org"), PIPE, first_on_connection=False, needs_rset=True)
    assert script(tx, [refused, OK, OK, GO])[-1] == b".\r\n"  # nothing sent into a confused session
    tx.on_reply(OK)
    assert tx.done and not tx.clean and tx.outcomes[0].code == 451


def test_421_ends_the_transaction() -> None:
    bye = Reply(421, "4.3.2", "Shutting down")
    tx = Transaction(env("a@x.org", "b@x.org", "c@x.org"), PIPE, first_on_connection=True)
    script(tx, [OK, NO_USER, bye])
    assert tx.done and not tx.clean and tx.outcomes == [NO_USER, bye, bye]
    assert tx.phase is None


def test_unexpected_reply_class_is_a_protocol_error() -> None:
    tx = Transaction(env("a@x.org"), PIPE, first_on_connection=True)
    tx.initial_bytes()
    tx.on_reply(OK)
    tx.on_reply(OK)
    with pytest.raises(ClientProtocolError) as info:
        tx.on_reply(OK)  # 250 to DATA
    assert info.value.reply.code == 451
    assert tx.done and not tx.clean and tx.outcomes == [info.value.reply]
    with pytest.raises(ClientProtocolError):
        tx.on_reply(OK)  # nothing awaited


def test_abort() -> None:
    tx = Transaction(env("a@x.org", "b@x.org"), PIPE, first_on_connection=True)
    tx.initial_bytes()
    tx.on_reply(OK)
    tx.on_reply(NO_USER)
    timeout = Reply(451, "4.4.2", "Timeout waiting for RCPT reply")
    tx.abort(timeout)
    assert tx.done and not tx.clean and tx.outcomes == [NO_USER, timeout]
    tx.abort(OK)  # no-op once done
    assert tx.outcomes == [NO_USER, timeout]


def test_constructor_refuses_bad_envelopes() -> None:
    with pytest.raises(ValueError):
        Transaction(Envelope("s@x.org", [], BODY), PIPE, first_on_connection=True)
    with pytest.raises(ValueError):
        Transaction(env("a@x.org>\r\nRCPT TO:<evil@x.org"), PIPE, first_on_connection=True)
    with pytest.raises(ValueError):
        Transaction(env("a@x.org\nX"), PIPE, first_on_connection=True)


# --- client against the real server machine ----------------------------------------------
Decide = Callable[[Event], "Reply | None"]


def server_session() -> ServerSession:
    session = new_session(max_message_size=1_000_000)
    drive(session, EHLO)
    return session


def converse(
    server: ServerSession,
    txs: list[Transaction],
    *,
    decide: Decide | None = None,
    cuts: list[int] | None = None,
    chain: bool = False,
    bytewise_replies: bool = False,
) -> list[tuple[Event, bytes]]:
    """Run transactions against `server`, in order, until all are done; returns the
    server's (event, reply bytes) log.

    `cuts` split every client write; `bytewise_replies` feeds the server's replies to
    the parser one octet at a time; `chain` appends the next transaction's initial
    bytes to the previous one's end-of-data write (PIPELINING only), as the adapter may.
    """
    parser = ReplyParser()
    log: list[tuple[Event, bytes]] = []
    waiting = list(txs)
    active: list[Transaction] = []

    def start() -> bytes:
        tx = waiting.pop(0)
        active.append(tx)
        return tx.initial_bytes()

    def take_replies() -> bytes:
        out = b""
        while active and (reply := parser.next_reply()) is not None:
            tx = active[0]
            more = tx.on_reply(reply)
            if tx.done:
                active.pop(0)
            if more:
                out += more
                if chain and waiting and tx.phase == "data_end":
                    out += start()
        return out

    out = start()
    while active or waiting:
        if not out:
            assert not active, "the client waits for a reply the server will not send"
            out = start()
        before = len(log)
        for piece in split_at(out, cuts or []):
            log += drive(server, piece, decide)
        replies = wire(log[before:])
        out = b""
        if bytewise_replies:
            for i in range(len(replies)):
                parser.feed(replies[i : i + 1])
                out += take_replies()
        else:
            parser.feed(replies)
            out += take_replies()
    assert parser.buffered == 0
    return log


def refuse(addresses: set[str], mail: bool = False) -> Decide:
    def decide(event: Event) -> Reply | None:
        if isinstance(event, CommandReceived):
            command = event.command
            if isinstance(command, Rcpt) and command.address in addresses:
                return NO_USER
            if isinstance(command, Mail) and mail:
                return Reply(550, "5.7.1", "Sender refused")
        return None

    return decide


MODES = {
    "pipelined": Capabilities(pipelining=True, size=0, eightbitmime=True, dsn=True),
    "lockstep": Capabilities(eightbitmime=True),
    "bdat-pipelined": Capabilities(pipelining=True, chunking=True, eightbitmime=True),
    "bdat-lockstep": Capabilities(chunking=True),
}

_LINE = st.builds(
    lambda dots, text: b"." * dots + text,
    st.integers(0, 3),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
BODIES = st.lists(_LINE, max_size=30).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
ADDRESSES = [f"r{i}@example.org" for i in range(5)]


@pytest.mark.parametrize("mode", list(MODES))
@given(body=BODIES, cuts=st.lists(st.integers(0, 3000), max_size=4), bytewise=st.booleans())
@settings(max_examples=60, deadline=None)
def test_server_receives_exactly_the_body(mode: str, body: bytes, cuts: list[int], bytewise: bool) -> None:
    caps = MODES[mode]
    envelope = Envelope("s@example.com", [Recipient(a) for a in ADDRESSES[:2]], body, body_8bit=not body.isascii())
    tx = Transaction(envelope, caps, first_on_connection=True)
    if tx.precheck() is not None:  # 8-bit body, server without 8BITMIME
        assert not caps.eightbitmime and not body.isascii()
        return
    log = converse(server_session(), [tx], cuts=cuts, bytewise_replies=bytewise)
    (message,) = messages(log)
    assert message.content == body
    assert message.chunked is caps.chunking
    assert tx.done and tx.clean and [r.code for r in tx.outcomes] == [250, 250]
    mail = commands(log)[0]
    assert isinstance(mail, Mail) and mail.address == "s@example.com"
    assert mail.size == (len(body) if caps.size is not None else None)


@pytest.mark.parametrize("mode", list(MODES))
@given(refused=st.sets(st.sampled_from(ADDRESSES)), mail_refused=st.booleans())
@settings(max_examples=40, deadline=None)
def test_refusals_against_the_server(mode: str, refused: set[str], mail_refused: bool) -> None:
    caps = MODES[mode]
    envelope = Envelope("s@example.com", [Recipient(a) for a in ADDRESSES], BODY)
    server = server_session()
    tx = Transaction(envelope, caps, first_on_connection=True)
    log = converse(server, [tx], decide=refuse(refused, mail_refused))
    delivered = not mail_refused and len(refused) < len(ADDRESSES)
    assert [m.content for m in messages(log)] == ([BODY] if delivered else [])
    for address, outcome in zip(ADDRESSES, tx.outcomes):
        if mail_refused:
            assert outcome.code == 550 and outcome.enhanced == "5.7.1"
        elif address in refused:
            assert outcome.code == 550 and outcome.enhanced == "5.1.1"
        else:
            assert outcome.code == 250
    # The next transaction on the same session works, with RSET exactly when needed.
    nxt = Transaction(envelope, caps, first_on_connection=False, needs_rset=not tx.clean)
    log = converse(server, [nxt])
    assert [m.content for m in messages(log)] == [BODY]
    assert [r.code for r in nxt.outcomes] == [250] * len(ADDRESSES)


@pytest.mark.parametrize("mode", ["pipelined", "bdat-pipelined"])
@given(bodies=st.lists(BODIES, min_size=2, max_size=4), cuts=st.lists(st.integers(0, 2000), max_size=3))
@settings(max_examples=40, deadline=None)
def test_chained_transactions(mode: str, bodies: list[bytes], cuts: list[int]) -> None:
    caps = MODES[mode]
    txs = [
        Transaction(
            Envelope("s@example.com", [Recipient(ADDRESSES[0])], body, body_8bit=not body.isascii()),
            caps,
            first_on_connection=i == 0,
        )
        for i, body in enumerate(bodies)
    ]
    log = converse(server_session(), txs, chain=True, cuts=cuts)
    assert [m.content for m in messages(log)] == bodies
    assert all(tx.done and tx.clean and tx.outcomes[0].code == 250 for tx in txs)


def test_dsn_and_utf8_parameters_reach_the_server() -> None:
    caps = Capabilities(pipelining=True, dsn=True, smtputf8=True, eightbitmime=True, size=0)
    envelope = Envelope(
        "sé@example.com",
        [Recipient("δ@example.org", notify=("NEVER",), orcpt="rfc822;a+b@example.org")],
        "Subject: é\r\n\r\n.\r\n".encode(),
        needs_smtputf8=True,
        body_8bit=True,
        ret="FULL",
        envid="id 1",
    )
    tx = Transaction(envelope, caps, first_on_connection=True)
    log = converse(server_session(), [tx])
    mail, rcpt = commands(log)
    assert mail == Mail(
        "sé@example.com", size=len(envelope.body), body="8BITMIME", smtputf8=True, ret="FULL", envid="id 1"
    )
    assert rcpt == Rcpt("δ@example.org", notify=("NEVER",), orcpt="rfc822;a+b@example.org")
    assert [m.content for m in messages(log)] == [envelope.body]
