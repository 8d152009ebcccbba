"""engine.smtp.server.ServerSession, driven in memory (no event loop, no clock)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.smtp.commands import Auth, Ehlo, Mail, Rcpt, StartTls
from engine.smtp.replies import (
    R220_READY_TLS,
    R235_AUTH_OK,
    R250_OK,
    R334_EMPTY,
    R421_TOO_MANY_ERRORS,
    R501_AUTH_CANCELLED,
    R535_AUTH_FAILED,
    R550_BARE_LINE_ENDING,
    R552_MESSAGE_TOO_BIG,
    R554_PREGREET,
    Reply,
)
from engine.smtp.server import (
    NEED_DATA,
    PAUSED,
    AuthResponse,
    AutoReply,
    CommandReceived,
    ConnectionClosed,
    MessageReceived,
    ServerSession,
    State,
)
from tests.unit.helpers import (
    EHLO,
    MAIL,
    RCPT,
    codes,
    commands,
    drive,
    drive_pieces,
    events,
    greet,
    messages,
    new_session,
    pump,
    session_in,
    split_at,
    well_formed,
    wire,
)

TXN = EHLO + MAIL + RCPT


def one(result: list) -> tuple:
    assert len(result) == 1, result
    return result[0]


def reply_of(result: list) -> tuple[int, str]:
    """(code, enhanced) of the single reply in `result`."""
    _, raw = one(result)
    head = raw.split(b"\r\n")[0].decode()
    m = re.match(r"[245]\.\d{1,3}\.\d{1,3}(?= |$)", head[4:])
    return int(head[:3]), m.group(0) if m else ""


# === sequencing: the whole (state, command) table =================================================
LINES = {
    "EHLO": b"EHLO c.example\r\n",
    "HELO": b"HELO c.example\r\n",
    "MAIL": b"MAIL FROM:<s@example.com>\r\n",
    "RCPT": b"RCPT TO:<r@example.com>\r\n",
    "DATA": b"DATA\r\n",
    "BDAT": b"BDAT 4\r\nRSET",  # the chunk must never be read as a command
    "RSET": b"RSET\r\n",
    "NOOP": b"NOOP\r\n",
    "QUIT": b"QUIT\r\n",
    "HELP": b"HELP\r\n",
    "VRFY": b"VRFY someone\r\n",
    "STARTTLS": b"STARTTLS\r\n",
    "AUTH": b"AUTH PLAIN\r\n",
    "EXPN": b"EXPN list\r\n",
    "UNKNOWN": b"XYZZY\r\n",
}
C, R = "command", "auto"  # CommandReceived (decided by the adapter) or AutoReply
S = State
# verb → state → (kind of event, code, enhanced, state after sending the default reply)
TABLE: dict[str, dict[State, tuple[str, int, str, State | None]]] = {
    "EHLO": {
        S.CONNECTED: (C, 250, "2.0.0", S.READY), S.READY: (C, 250, "2.0.0", S.READY),
        S.MAIL: (C, 250, "2.0.0", S.READY), S.RCPT: (C, 250, "2.0.0", S.READY),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "MAIL": {
        S.CONNECTED: (R, 503, "5.5.1", None), S.READY: (C, 250, "2.0.0", S.MAIL),
        S.MAIL: (R, 503, "5.5.1", None), S.RCPT: (R, 503, "5.5.1", None),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "RCPT": {
        S.CONNECTED: (R, 503, "5.5.1", None), S.READY: (R, 503, "5.5.1", None),
        S.MAIL: (C, 250, "2.0.0", S.RCPT), S.RCPT: (C, 250, "2.0.0", S.RCPT),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "DATA": {
        S.CONNECTED: (R, 503, "5.5.1", None), S.READY: (R, 503, "5.5.1", None),
        S.MAIL: (R, 554, "5.5.1", None), S.RCPT: (R, 354, "", S.DATA),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "BDAT": {
        S.CONNECTED: (R, 503, "5.5.1", None), S.READY: (R, 503, "5.5.1", None),
        S.MAIL: (R, 554, "5.5.1", None), S.RCPT: (R, 250, "2.0.0", S.BDAT_MORE),
        S.BDAT_MORE: (R, 250, "2.0.0", S.BDAT_MORE),
    },
    "RSET": {s: (R, 250, "2.0.0", S.CONNECTED if s is S.CONNECTED else S.READY) for s in S},
    "NOOP": {s: (R, 250, "2.0.0", None) for s in S},
    "QUIT": {s: (R, 221, "2.0.0", S.CLOSED) for s in S},
    "HELP": {s: (R, 214, "2.0.0", None) for s in S},
    "VRFY": {
        S.CONNECTED: (R, 252, "2.5.0", None), S.READY: (R, 252, "2.5.0", None),
        S.MAIL: (R, 252, "2.5.0", None), S.RCPT: (R, 252, "2.5.0", None),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "STARTTLS": {
        S.CONNECTED: (R, 503, "5.5.1", None), S.READY: (C, 250, "2.0.0", S.READY),
        S.MAIL: (R, 503, "5.5.1", None), S.RCPT: (R, 503, "5.5.1", None),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "AUTH": {
        S.CONNECTED: (R, 503, "5.5.1", None), S.READY: (C, 250, "2.0.0", S.READY),
        S.MAIL: (R, 503, "5.5.1", None), S.RCPT: (R, 503, "5.5.1", None),
        S.BDAT_MORE: (R, 503, "5.5.1", None),
    },
    "EXPN": {s: (R, 502, "5.5.1", None) for s in S},
    "UNKNOWN": {s: (R, 500, "5.5.1", None) for s in S},
}
TABLE["HELO"] = TABLE["EHLO"]
PAIR_STATES = [S.CONNECTED, S.READY, S.MAIL, S.RCPT, S.BDAT_MORE]
PAIRS = [(verb, state) for verb in LINES for state in PAIR_STATES]


@pytest.mark.parametrize(("verb", "state"), PAIRS, ids=[f"{v}-{s.name}" for v, s in PAIRS])
def test_state_command_table(verb: str, state: State) -> None:
    session = session_in(state)
    envelope_before = (session.envelope.mail, list(session.envelope.rcpts))
    kind, code, enhanced, after = TABLE[verb][state]
    result = drive(session, LINES[verb])
    event, _ = one(result)
    assert isinstance(event, CommandReceived if kind == C else AutoReply), event
    assert reply_of(result) == (code, enhanced)
    assert session.state is (after or state)
    if code >= 500:
        # A refused command leaves the transaction exactly as it was.
        assert (session.envelope.mail, session.envelope.rcpts) == envelope_before
    if verb == "BDAT":
        assert session.buffered == 0  # the chunk "RSET" was swallowed, never parsed


def test_table_covers_every_verb_the_parser_knows() -> None:
    assert set(LINES) == set(TABLE)
    assert all(set(PAIR_STATES) <= set(TABLE[v]) for v in TABLE)


def test_commands_before_the_banner_are_pregreet() -> None:
    session = new_session(greeted=False)
    assert session.state is State.GREETING
    assert session.next_event() is NEED_DATA  # nothing said yet: nothing to do
    session.receive_data(b"EHLO early.example\r\n")
    event = session.next_event()
    assert event == AutoReply(R554_PREGREET)
    assert session.next_event() is PAUSED
    assert session.send(event.reply).startswith(b"554 5.5.1 ")
    assert session.state is State.CLOSED
    # Nothing said after that is ever executed.
    assert drive(session, b"MAIL FROM:<a@b.example>\r\n") == []


def test_banner_moves_greeting_to_connected() -> None:
    session = new_session(greeted=False)
    assert greet(session) == b"220 mx.test.example ESMTP Volley\r\n"
    assert session.state is State.CONNECTED


def test_too_many_errors_is_421_and_closed() -> None:
    session = new_session(max_unknown_commands=3)
    result = drive(session, b"FOO\r\n" * 3 + b"BAR\r\nNOOP\r\n")
    assert codes(result) == [500, 500, 500, 421]
    assert result[-1][0] == AutoReply(R421_TOO_MANY_ERRORS)
    assert session.state is State.CLOSED
    assert drive(session, b"NOOP\r\n") == []


def test_bad_sequence_counts_as_an_error() -> None:
    session = new_session(max_unknown_commands=2)
    result = drive(session, b"DATA\r\nRCPT TO:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n")
    assert codes(result) == [503, 503, 421]
    assert session.state is State.CLOSED


def test_eof_is_connection_closed() -> None:
    session = session_in(State.RCPT)
    result = drive(session, b"")
    assert events(result) == [ConnectionClosed()]
    assert session.state is State.CLOSED
    assert session.next_event() is NEED_DATA


def test_eof_after_buffered_commands_answers_them_first() -> None:
    session = new_session()
    session.receive_data(b"EHLO c.example\r\nNOOP\r\n")
    result = drive(session, b"")
    assert [type(e) for e in events(result)] == [CommandReceived, AutoReply, ConnectionClosed]


def test_eof_inside_data_is_connection_closed_not_a_message() -> None:
    session = session_in(State.RCPT)
    result = drive(session, b"DATA\r\nhalf a message\r\n")
    assert codes(result) == [354]
    assert events(drive(session, b"")) == [ConnectionClosed()]


def test_quit_closes() -> None:
    session = session_in(State.RCPT)
    result = drive(session, b"QUIT\r\nNOOP\r\n")
    assert wire(result) == b"221 2.0.0 Bye\r\n"
    assert session.state is State.CLOSED


def test_refused_command_keeps_state() -> None:
    session = new_session()
    drive(session, EHLO)
    result = drive(session, MAIL, decide=lambda e: Reply(550, "5.7.1", "No"))
    assert codes(result) == [550]
    assert session.state is State.READY and session.envelope.mail is None
    drive(session, MAIL)
    result = drive(session, RCPT, decide=lambda e: Reply(550, "5.1.1", "No such user"))
    assert session.state is State.MAIL and session.envelope.rcpts == []


def test_ehlo_resets_the_transaction() -> None:
    session = session_in(State.RCPT)
    drive(session, EHLO)
    assert session.state is State.READY
    assert session.envelope.mail is None and session.envelope.rcpts == []
    assert session.helo == "client.test.example" and session.esmtp


def test_helo_is_not_esmtp() -> None:
    session = new_session()
    drive(session, b"HELO old.example\r\n")
    assert session.helo == "old.example" and not session.esmtp


def test_utf8_rcpt_only_after_smtputf8_mail() -> None:
    session = session_in(State.READY)
    rcpt = "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\n".encode()
    drive(session, MAIL)
    assert codes(drive(session, rcpt)) == [553]  # RFC 6531 §3.7.4.1: 553 5.6.7
    drive(session, b"RSET\r\n")
    drive(session, b"MAIL FROM:<s@example.com> SMTPUTF8\r\n")
    result = drive(session, rcpt)
    assert commands(result) == [Rcpt("δοκιμή@παράδειγμα.δοκιμή")]


# === hypothesis: random command walks ===============================================================
WALK_LINES = [
    *LINES.values(),
    b"MAIL FROM:<> SMTPUTF8\r\n",
    b"RCPT TO:<x@[192.0.2.1]> NOTIFY=NEVER\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 3 LAST\r\nabc",
    b"BDAT 2\r\n\r\n",
    b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\n",
    b"DATA\r\nbare\nLF\r\n.\r\n",
    b"DATA\r\n" + b"x" * 1200 + b"\r\n.\r\n",
    b"AUTH LOGIN\r\ndXNlcg==\r\n",
    b"*\r\n",
    b"NOOP " + b"A" * 600 + b"\r\n",
    b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n",
    b"RCPT TO:<\x00@b.example>\r\n",
    b"\r\n",
    b"\n",
    b"QUIT\r\n",
]
DECISIONS = [
    R250_OK,
    Reply(550, "5.7.1", "No"),
    Reply(451, "4.3.0", "Later"),
    R334_EMPTY,
    R235_AUTH_OK,
    R501_AUTH_CANCELLED,
    Reply(421, "4.3.2", "Bye"),
]
LEGAL = set(State) - {State.GREETING, State.TLS_HANDSHAKE}
DECIDED_EVENTS = (CommandReceived, MessageReceived, AuthResponse)


def check_invariants(session: ServerSession) -> None:
    assert session.state in LEGAL
    env = session.envelope
    if session.state in (State.CONNECTED, State.READY):
        assert env.mail is None and env.rcpts == []
    if session.state is State.MAIL:
        assert env.mail is not None and env.rcpts == []
    if session.state in (State.RCPT, State.BDAT_MORE):
        assert env.mail is not None and env.rcpts
    if session.state is State.AUTH:
        assert env.mail is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(WALK_LINES), max_size=25),
    st.lists(st.sampled_from(DECISIONS), min_size=1, max_size=10),
    st.integers(10, 2000),
)
def test_random_walks_only_ever_reply(lines: list[bytes], decisions: list[Reply], max_size: int) -> None:
    # Decisions never include 220 to STARTTLS (that hands the socket to TLS; tested below).
    picks = iter(decisions * 30)

    def decide(event: object) -> Reply:
        reply = next(picks, R250_OK)
        if isinstance(event, CommandReceived) and isinstance(event.command, StartTls):
            return Reply(454, "4.7.0", "TLS not available")
        return reply

    session = new_session(max_message_size=max_size, max_unknown_commands=10)
    for line in lines:
        result = drive(session, line, decide)
        for event, raw in result:
            assert isinstance(event, (*DECIDED_EVENTS, AutoReply, ConnectionClosed))
            if not isinstance(event, ConnectionClosed):
                assert well_formed(raw), raw
        assert session.next_event() in (NEED_DATA,)  # the driver consumed everything it could
        check_invariants(session)
        if session.state is State.CLOSED:
            assert drive(session, b"NOOP\r\n") == []
            break


# === PIPELINING ======================================================================================
def test_pipelined_group_in_one_receive() -> None:
    session = new_session()
    result = drive(
        session,
        b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.com>\r\n"
        b"RCPT TO:<b@example.com>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    )
    assert [type(e).__name__ for e in events(result)] == [
        "CommandReceived", "CommandReceived", "CommandReceived", "CommandReceived",
        "AutoReply", "MessageReceived", "AutoReply",
    ]
    assert commands(result)[1:] == [Mail("s@example.com"), Rcpt("a@example.com"), Rcpt("b@example.com")]
    assert codes(result) == [250, 250, 250, 250, 354, 250, 221]
    assert messages(result) == [MessageReceived(b"Subject: hi\r\n\r\nbody\r\n", chunked=False)]


def test_machine_never_runs_ahead_of_a_decision() -> None:
    session = new_session()
    session.receive_data(EHLO + MAIL + RCPT)
    event = session.next_event()
    assert isinstance(event, CommandReceived) and isinstance(event.command, Ehlo)
    assert session.next_event() is PAUSED
    assert session.next_event() is PAUSED
    session.send(R250_OK)
    event = session.next_event()
    assert isinstance(event.command, Mail)
    session.send(Reply(550, "5.7.1", "Sender refused"))
    # RCPT after a refused MAIL is a sequencing error, decided only now.
    assert reply_of(pump(session)) == (503, "5.5.1")


def test_receive_while_paused_keeps_every_byte() -> None:
    # An adapter may keep reading while an event waits for its reply (e.g. queue commit).
    session = session_in(State.RCPT)
    session.receive_data(b"DATA\r\n")
    event = session.next_event()
    assert event == AutoReply(event.reply) and event.reply.code == 354
    session.receive_data(b"body\r\n.\r\n")  # arrives before the 354 goes out
    session.send(event.reply)
    assert messages(pump(session)) == [MessageReceived(b"body\r\n", chunked=False)]

    session = session_in(State.RCPT)
    session.receive_data(b"DATA\r\nfirst\r\n.\r\n")
    pump_until_message = pump(session, decide=None)
    assert messages(pump_until_message) == [MessageReceived(b"first\r\n", chunked=False)]
    session.receive_data(MAIL)
    event = session.next_event()
    session.receive_data(RCPT + b"BDAT 3 LAST\r\nabc")
    session.send(R250_OK)
    assert messages(pump(session)) == [MessageReceived(b"abc", chunked=True)]


# --- byte-at-a-time ≡ all-at-once ----------------------------------------------------------------
line_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.encode)
body_lines = st.lists(
    st.one_of(line_text, line_text.map(lambda b: b"." + b), st.just(b"."), st.just(b"..")), max_size=8
)


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@st.composite
def transactions(draw: st.DrawFn) -> bytes:
    out = [MAIL, RCPT]
    body = b"".join(ln + b"\r\n" for ln in draw(body_lines))
    if draw(st.booleans()):
        out.append(b"DATA\r\n" + stuff(body.split(b"\r\n")[:-1]) + b".\r\n")
    else:
        cuts = draw(st.lists(st.integers(0, len(body)), max_size=3))
        chunks = split_at(body, cuts) or [b""]
        for i, chunk in enumerate(chunks):
            last = b" LAST" if i == len(chunks) - 1 else b""
            out.append(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
    out.append(draw(st.sampled_from([b"", b"NOOP\r\n", b"RSET\r\n", b"BOGUS\r\n", b"NOOP " + b"z" * 520 + b"\r\n"])))
    return b"".join(out)


@st.composite
def scripts(draw: st.DrawFn) -> bytes:
    return EHLO + b"".join(draw(st.lists(transactions(), min_size=1, max_size=3))) + b"QUIT\r\n"


@settings(max_examples=200, deadline=None)
@given(scripts(), st.data(), st.integers(0, 120))
def test_any_split_gives_the_same_events_and_replies(script: bytes, data: st.DataObject, max_size: int) -> None:
    whole = drive(new_session(max_message_size=max_size), script)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(script) - 1)), max_size=12))
    pieces = drive_pieces(new_session(max_message_size=max_size), split_at(script, cuts))
    assert pieces == whole


@settings(max_examples=60, deadline=None)
@given(scripts(), st.integers(0, 120))
def test_byte_at_a_time_gives_the_same_events_and_replies(script: bytes, max_size: int) -> None:
    whole = drive(new_session(max_message_size=max_size), script)
    bytewise = drive_pieces(new_session(max_message_size=max_size), [bytes([b]) for b in script])
    assert bytewise == whole


@settings(max_examples=200, deadline=None)
@given(body_lines, st.data())
def test_stuffed_data_and_bdat_deliver_the_original_content(lines: list[bytes], data: st.DataObject) -> None:
    body = b"".join(ln + b"\r\n" for ln in lines)
    stream = b"DATA\r\n" + stuff(lines) + b".\r\n" + MAIL + RCPT + b"BDAT %d LAST\r\n" % len(body) + body
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=6))
    result = drive_pieces(session_in(State.RCPT), split_at(stream, cuts))
    assert messages(result) == [MessageReceived(body, chunked=False), MessageReceived(body, chunked=True)]


@pytest.mark.parametrize("max_size", range(0, 24))
def test_size_limit_boundary_is_split_independent(max_size: int) -> None:
    # 13 content octets after unstuffing; the 552 must not depend on where reads end.
    script = TXN + b"DATA\r\n01234567\r\n..\r\n.\r\n" + b"NOOP\r\n"
    whole = drive(new_session(max_message_size=max_size), script)
    bytewise = drive_pieces(new_session(max_message_size=max_size), [bytes([b]) for b in script])
    assert bytewise == whole
    assert (250 if max_size >= 13 else 552) in codes(whole)


# === DATA ==============================================================================================
def data_message(content_on_wire: bytes, **kw: object) -> tuple[list, ServerSession]:
    session = session_in(State.RCPT, **kw)
    result = drive(session, b"DATA\r\n" + content_on_wire)
    return result, session


@pytest.mark.parametrize(
    ("wire_content", "content"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..leading\r\n.\r\n", b".leading\r\n"),
        (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"a\r\n..b\r\n...c\r\n.\r\n", b"a\r\n.b\r\n..c\r\n"),
        (b"x.\r\n. \r\n.\r\n", b"x.\r\n \r\n"),  # RFC 5321 §4.5.2: drop the first dot
        (b".x\r\n.\r\n", b"x\r\n"),
        (b"a.b\r\n.\r\n", b"a.b\r\n"),
    ],
)
def test_dot_unstuffing(wire_content: bytes, content: bytes) -> None:
    result, session = data_message(wire_content)
    assert messages(result) == [MessageReceived(content, chunked=False)]
    assert session.state is State.READY
    assert session.envelope.mail is None  # reset by the reply to MessageReceived


def test_terminator_split_at_every_position() -> None:
    content = b"Subject: t\r\n\r\nline\r\n..x\r\n"
    stream = b"DATA\r\n" + content + b".\r\n" + b"NOOP\r\n"
    for cut1 in range(1, len(stream)):
        for cut2 in (cut1 + 1, cut1 + 2, cut1 + 3):
            session = session_in(State.RCPT)
            result = drive_pieces(session, split_at(stream, [cut1, cut2]))
            assert codes(result) == [354, 250, 250], (cut1, cut2)
            assert messages(result) == [MessageReceived(b"Subject: t\r\n\r\nline\r\n.x\r\n", chunked=False)]


def test_message_too_big_is_552_after_the_terminator_and_session_survives() -> None:
    session = session_in(State.RCPT, max_message_size=100)
    result = drive(session, b"DATA\r\n" + b"x" * 80 + b"\r\n")
    assert codes(result) == [354]
    result = drive(session, (b"y" * 78 + b"\r\n") * 50)  # far beyond the limit, no terminator
    assert result == [] and session.state is State.DATA
    assert len(session._buf) < 400  # content beyond the limit is not kept (P8)
    result = drive(session, b".\r\n")
    assert one(result)[0] == AutoReply(R552_MESSAGE_TOO_BIG)
    assert reply_of(result) == (552, "5.3.4")
    assert session.state is State.READY and session.envelope.mail is None
    result = drive(session, MAIL + RCPT + b"DATA\r\nsmall\r\n.\r\n")
    assert codes(result) == [250, 250, 354, 250]
    assert messages(result) == [MessageReceived(b"small\r\n", chunked=False)]


def test_exactly_max_size_is_accepted() -> None:
    result, _ = data_message(b"x" * 8 + b"\r\n.\r\n", max_message_size=10)
    assert messages(result) == [MessageReceived(b"x" * 8 + b"\r\n", chunked=False)]
    result, _ = data_message(b"x" * 9 + b"\r\n.\r\n", max_message_size=10)
    assert codes(result) == [354, 552]


def test_size_counts_unstuffed_octets() -> None:
    # RFC 1870: doubled quoting dots do not count; 10 octets after unstuffing.
    for pieces in ([b"DATA\r\n..2345678\r\n.\r\n"], [b"DATA\r\n", b"..2345678", b"\r\n", b".\r\n"]):
        session = session_in(State.RCPT, max_message_size=10)
        result = drive_pieces(session, pieces)
        assert messages(result) == [MessageReceived(b".2345678\r\n", chunked=False)], pieces


@pytest.mark.parametrize("length", [998, 999, 1000, 5000])
def test_long_data_line(length: int) -> None:
    session = session_in(State.RCPT)
    result = drive(session, b"DATA\r\nshort\r\n" + b"L" * length + b"\r\nshort\r\n.\r\n")
    if length <= 998:
        assert len(messages(result)) == 1
        return
    assert reply_of(result[1:]) == (550, "5.5.2")
    assert messages(result) == []
    assert session.state is State.READY
    result = drive(session, MAIL + RCPT + b"DATA\r\nok\r\n.\r\n")
    assert codes(result) == [250, 250, 354, 250]
    assert messages(result) == [MessageReceived(b"ok\r\n", chunked=False)]


# === smuggling (P5) ===========================================================
SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nspoofed\r\n"


@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n"], ids=repr
)
@pytest.mark.parametrize("pieces", ["whole", "bytewise"])
def test_smuggling_yields_one_refused_message(fake_end: bytes, pieces: str) -> None:
    stream = b"DATA\r\nSubject: legit\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\nNOOP\r\n"
    session = session_in(State.RCPT)
    feed = [stream] if pieces == "whole" else [bytes([b]) for b in stream]
    result = drive_pieces(session, feed)
    assert messages(result) == []
    assert codes(result) == [354, 550, 250]  # DATA, the one outcome, NOOP
    assert result[1][0] == AutoReply(R550_BARE_LINE_ENDING)
    assert reply_of(result[1:2]) == (550, "5.6.0")
    assert commands(result) == []  # the smuggled MAIL/RCPT never surfaced
    assert session.state is State.READY and session.envelope.mail is None


@pytest.mark.parametrize("bare", [b"\r", b"\n"], ids=["CR", "LF"])
@pytest.mark.parametrize("where", ["middle", "end", "start"])
def test_bare_cr_or_lf_alone_is_refused(bare: bytes, where: str) -> None:
    content = {"middle": b"a" + bare + b"b\r\n", "end": b"ab" + bare + b"\r\n", "start": bare + b"ab\r\n"}[where]
    result, session = data_message(content + b".\r\n")
    assert messages(result) == []
    assert reply_of(result[1:]) == (550, "5.6.0")
    assert session.state is State.READY


@pytest.mark.parametrize("bare", [b"\r", b"\n"], ids=["CR", "LF"])
def test_bare_cr_or_lf_in_bdat_is_refused(bare: bytes) -> None:
    session = session_in(State.RCPT)
    chunk = b"a" + bare + b"b\r\n"
    result = drive(session, b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert messages(result) == []
    assert reply_of(result) == (550, "5.6.0")


# === overlong command lines ============================================
@pytest.mark.parametrize("tail", [b"BBBB\r\n", b"QUIT\r\n", b"MAIL FROM:<x@y.example>\r\n", b"\r\n"])
def test_overlong_line_tail_is_never_a_command(tail: bytes) -> None:
    session = session_in(State.READY)
    result = drive(session, b"NOOP " + b"A" * 70_000)
    assert result == []
    assert session.buffered <= 513  # discarded while reading, not accumulated (P8)
    result = drive(session, tail)
    assert one(result)[0].reply.code == 500
    assert reply_of(result) == (500, "5.5.2")
    assert session.state is State.READY
    assert codes(drive(session, b"NOOP\r\n")) == [250]


def test_overlong_line_split_across_many_receives() -> None:
    session = session_in(State.READY)
    for _ in range(200):
        assert drive(session, b"A" * 997) == []
    assert codes(drive(session, b"A\r")) == []
    assert codes(drive(session, b"\nQUIT\r\n")) == [500, 221]


@pytest.mark.parametrize("pieces", ["whole", "bytewise"])
def test_line_length_boundary(pieces: str) -> None:
    # 512 octets including CRLF is the most a command line may be (RFC 5321 §4.5.3.1.4).
    ok = b"NOOP " + b"a" * (510 - 5) + b"\r\n"
    too_long = b"NOOP " + b"a" * (511 - 5) + b"\r\n"
    assert len(ok) == 512 and len(too_long) == 513
    stream = ok + too_long + b"NOOP\r\n"
    session = session_in(State.READY)
    feed = [stream] if pieces == "whole" else [bytes([b]) for b in stream]
    assert codes(drive_pieces(session, feed)) == [250, 500, 250]


# === STARTTLS (P6) ======================================================
def starttls_session(pipelined: bytes = b"") -> tuple[ServerSession, CommandReceived]:
    session = session_in(State.READY)
    session.receive_data(b"STARTTLS\r\n" + pipelined)
    event = session.next_event()
    assert isinstance(event, CommandReceived) and event.command == StartTls()
    return session, event


def test_starttls_discards_pipelined_plaintext() -> None:
    injected = b"RSET\r\nMAIL FROM:<x@y.example>\r\n"
    session, _ = starttls_session(injected)
    assert session.send(R220_READY_TLS) == b"220 2.0.0 Ready to start TLS\r\n"
    assert session.state is State.TLS_HANDSHAKE
    assert session.discarded_at_starttls == len(injected)
    assert session.next_event() is NEED_DATA
    session.receive_data(b"QUIT\r\n")  # plaintext during the handshake: dropped too
    assert session.discarded_at_starttls == len(injected) + 6
    assert session.next_event() is NEED_DATA
    session.tls_established()
    assert session.tls_active
    assert session.next_event() is NEED_DATA  # the RSET/MAIL/QUIT never surface


def test_after_tls_the_session_starts_over() -> None:
    session, _ = starttls_session()
    session.send(R220_READY_TLS)
    session.tls_established()
    assert session.state is State.CONNECTED
    assert session.helo is None and not session.esmtp and session.auth_user is None
    assert reply_of(drive(session, MAIL)) == (503, "5.5.1")
    result = drive(session, EHLO + MAIL)
    assert codes(result) == [250, 250]
    assert session.state is State.MAIL


def test_after_tls_authentication_is_forgotten() -> None:
    session = session_in(State.READY)
    session.authenticated("user")
    session.receive_data(b"STARTTLS\r\n")
    session.next_event()
    session.send(R220_READY_TLS)
    session.tls_established()
    drive(session, EHLO)
    assert session.auth_user is None
    assert isinstance(one(drive(session, b"AUTH PLAIN\r\n"))[0], CommandReceived)


def test_starttls_refused_keeps_the_pipeline() -> None:
    session, _ = starttls_session(b"NOOP\r\n")
    session.send(Reply(454, "4.7.0", "TLS not available"))
    assert session.state is State.READY and session.discarded_at_starttls == 0
    assert codes(pump(session)) == [250]


def test_eof_during_tls_handshake() -> None:
    session, _ = starttls_session()
    session.send(R220_READY_TLS)
    assert events(drive(session, b"")) == [ConnectionClosed()]


# === BDAT (RFC 3030) ============================================================================
def test_bdat_chunks_then_last() -> None:
    session = session_in(State.RCPT)
    result = drive(session, b"BDAT 5\r\nhello")
    assert wire(result) == b"250 2.0.0 5 octets received\r\n"
    assert session.state is State.BDAT_MORE
    result = drive(session, b"BDAT 7\r\n, world")
    assert wire(result) == b"250 2.0.0 12 octets received\r\n"
    result = drive(session, b"BDAT 2 LAST\r\n\r\n")
    assert messages(result) == [MessageReceived(b"hello, world\r\n", chunked=True)]
    assert session.state is State.READY and session.envelope.mail is None


def test_bdat_content_is_not_unstuffed_or_scanned_for_commands() -> None:
    chunk = b".\r\n..\r\nQUIT\r\n"
    session = session_in(State.RCPT)
    result = drive(session, b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert messages(result) == [MessageReceived(chunk, chunked=True)]
    assert codes(result) == [250, 250]
    assert session.state is State.READY


def test_bdat_zero_last_ends_the_message() -> None:
    session = session_in(State.RCPT)
    result = drive(session, b"BDAT 3\r\nabcBDAT 0 LAST\r\n")
    assert codes(result) == [250, 250]
    assert messages(result) == [MessageReceived(b"abc", chunked=True)]


def test_bdat_chunk_split_across_receives() -> None:
    session = session_in(State.RCPT)
    assert drive(session, b"BDAT 10 LAST\r\nabc") == []
    assert session.state is State.BDAT
    assert drive(session, b"defg") == []
    result = drive(session, b"hijNOOP\r\n")
    assert messages(result) == [MessageReceived(b"abcdefghij", chunked=True)]
    assert codes(result) == [250, 250]


@pytest.mark.parametrize(("state", "code"), [(State.READY, 503), (State.MAIL, 554), (State.CONNECTED, 503)])
def test_bdat_without_rcpt_swallows_its_chunk(state: State, code: int) -> None:
    session = session_in(state)
    chunk = b"QUIT\r\nMAIL FROM:<x@y.example>\r\n"
    result = drive(session, b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert codes(result) == [code, 250]
    assert commands(result) == [] and messages(result) == []
    assert session.state is state


def test_bdat_without_rcpt_chunk_arriving_later() -> None:
    session = session_in(State.READY)
    assert drive(session, b"BDAT 6\r\nQUI") == []
    assert codes(drive(session, b"T\r\nNOOP\r\n")) == [503, 250]
    assert session.state is State.READY


def test_bdat_size_limit_across_chunks() -> None:
    session = session_in(State.RCPT, max_message_size=10)
    assert codes(drive(session, b"BDAT 6\r\nabcdef")) == [250]
    result = drive(session, b"BDAT 6\r\nghijkl")
    assert reply_of(result) == (552, "5.3.4")
    assert session.state is State.BDAT_MORE
    result = drive(session, b"BDAT 2 LAST\r\nmn")
    assert reply_of(result) == (552, "5.3.4")
    assert messages(result) == []
    assert session.state is State.READY and session.envelope.mail is None
    result = drive(session, MAIL + RCPT + b"BDAT 10 LAST\r\n0123456789")
    assert messages(result) == [MessageReceived(b"0123456789", chunked=True)]


def test_data_after_bdat_chunk_is_503() -> None:
    session = session_in(State.BDAT_MORE)
    result = drive(session, b"DATA\r\n")
    assert reply_of(result) == (503, "5.5.1")
    assert session.state is State.BDAT_MORE
    result = drive(session, b"BDAT 1 LAST\r\nd")
    assert messages(result) == [MessageReceived(b"abcd", chunked=True)]


def test_rset_abandons_a_chunked_message() -> None:
    session = session_in(State.BDAT_MORE)
    assert codes(drive(session, b"RSET\r\n")) == [250]
    assert session.state is State.READY and session.envelope.mail is None
    result = drive(session, MAIL + RCPT + b"BDAT 1 LAST\r\nz")
    assert messages(result) == [MessageReceived(b"z", chunked=True)]


def test_bdat_long_line_is_refused() -> None:
    session = session_in(State.RCPT)
    chunk = b"x" * 1200 + b"\r\n"
    result = drive(session, b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert reply_of(result) == (550, "5.5.2")


# === AUTH (RFC 4954) =============================================================================
def auth_decide(event: object) -> Reply | None:
    if isinstance(event, CommandReceived) and isinstance(event.command, Auth):
        return R334_EMPTY
    return None  # default: 235 to the AuthResponse


def test_auth_continuation() -> None:
    session = session_in(State.READY)
    result = drive(session, b"AUTH PLAIN\r\n", auth_decide)
    assert wire(result) == b"334 \r\n"
    assert session.state is State.AUTH
    result = drive(session, b"AHVzZXIAcGFzcw==\r\n", auth_decide)
    assert events(result) == [AuthResponse("AHVzZXIAcGFzcw==")]
    assert wire(result).startswith(b"235 2.7.0 ")
    assert session.state is State.READY
    session.authenticated("user")
    result = drive(session, b"AUTH PLAIN\r\n", auth_decide)
    assert reply_of(result) == (503, "5.5.1")
    assert session.state is State.READY


def test_auth_lines_are_not_commands() -> None:
    session = session_in(State.READY)
    drive(session, b"AUTH LOGIN\r\n", auth_decide)
    result = drive(session, b"QUIT\r\n", lambda e: R334_EMPTY)
    assert events(result) == [AuthResponse("QUIT")]
    assert session.state is State.AUTH
    result = drive(session, b"*\r\n", lambda e: R501_AUTH_CANCELLED)
    assert events(result) == [AuthResponse("*")]
    assert session.state is State.READY and session.auth_user is None


def test_auth_failure_returns_to_ready() -> None:
    session = session_in(State.READY)
    drive(session, b"AUTH PLAIN\r\n", auth_decide)
    drive(session, b"Zm9v\r\n", lambda e: R535_AUTH_FAILED)
    assert session.state is State.READY
    assert codes(drive(session, MAIL)) == [250]


def test_auth_with_initial_response_needs_no_continuation() -> None:
    session = session_in(State.READY)
    result = drive(session, b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n", lambda e: R235_AUTH_OK)
    assert commands(result) == [Auth("PLAIN", "AHVzZXIAcGFzcw==")]
    assert session.state is State.READY


def test_auth_line_may_be_long_but_bounded() -> None:
    session = session_in(State.READY)
    drive(session, b"AUTH PLAIN\r\n", auth_decide)
    long_ok = b"A" * 12_000 + b"\r\n"
    assert events(drive(session, long_ok, lambda e: R334_EMPTY)) == [AuthResponse("A" * 12_000)]
    result = drive(session, b"B" * 20_000 + b"\r\n")
    assert reply_of(result) == (500, "5.5.2")
    # The 5xx ended the exchange for the client; its next line is a command again.
    assert session.state is State.READY
    assert codes(drive(session, b"NOOP\r\n")) == [250]


def test_auth_pipelined_after_the_continuation() -> None:
    session = session_in(State.READY)
    result = drive(session, b"AUTH PLAIN\r\nAHVzZXIAcGFzcw==\r\nMAIL FROM:<a@b.example>\r\n", auth_decide)
    assert [type(e) for e in events(result)] == [CommandReceived, AuthResponse, CommandReceived]
    assert session.state is State.MAIL


def test_junk_command_limit_closes_session():
    """P8: a session that only NOOPs gets 421 after max_junk_commands."""
    from engine.smtp.server import ServerSession, State
    from tests.unit.helpers import drive, greet

    session = ServerSession(max_message_size=1000, max_junk_commands=3)
    greet(session)
    results = drive(session, b"EHLO x\r\n" + b"NOOP\r\n" * 5)
    codes = [reply[:3] for _, reply in results if reply]
    assert codes == [b"250", b"250", b"250", b"250", b"421"]
    assert session.state is State.CLOSED
