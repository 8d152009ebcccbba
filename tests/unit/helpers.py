"""In-memory driver for the sans-I/O ServerSession: what an adapter does, minus the I/O.

`drive` feeds bytes and loops next_event/send exactly like engine/inbound/protocol.py:
AutoReply is sent back as decided, CommandReceived/MessageReceived/AuthResponse get a
Reply from `decide` (250/250/235 by default), and the loop stops at NEED_DATA, PAUSED
or ConnectionClosed. Every result is (event, wire bytes of the reply sent for it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from engine.smtp.replies import R235_AUTH_OK, R250_OK, Reply
from engine.smtp.server import (
    NEED_DATA,
    PAUSED,
    AuthResponse,
    AutoReply,
    CommandReceived,
    ConnectionClosed,
    Event,
    MessageReceived,
    ServerSession,
    State,
)

BANNER = Reply(220, "", "mx.test.example ESMTP Volley")

# A decision function returns the Reply for a decision event, or None for the default.
Decide = Callable[[Event], "Reply | None"]
Result = list[tuple[Event, bytes]]

_REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][^\r\n]*\r\n")


def default_reply(event: Event) -> Reply:
    if isinstance(event, AutoReply):
        return event.reply
    if isinstance(event, AuthResponse):
        return R235_AUTH_OK
    return R250_OK  # CommandReceived, MessageReceived


def greet(session: ServerSession, banner: Reply = BANNER) -> bytes:
    """Send the banner (the adapter's first write); GREETING → CONNECTED."""
    return session.send(banner)


def new_session(*, max_message_size: int = 10_000, greeted: bool = True, **kw: object) -> ServerSession:
    session = ServerSession(max_message_size=max_message_size, **kw)  # type: ignore[arg-type]
    if greeted:
        greet(session)
    return session


def pump(session: ServerSession, decide: Decide | None = None) -> Result:
    """Run next_event/send until the machine needs input (or is paused/closed)."""
    out: Result = []
    while True:
        event = session.next_event()
        if event is NEED_DATA or event is PAUSED:
            return out
        if isinstance(event, ConnectionClosed):
            out.append((event, b""))
            return out
        reply = None
        if decide is not None and not isinstance(event, AutoReply):
            reply = decide(event)
        out.append((event, session.send(reply if reply is not None else default_reply(event))))


def drive(session: ServerSession, data: bytes, decide: Decide | None = None) -> Result:
    """Feed `data` (b"" = EOF) and pump; returns [(event, reply bytes)]."""
    session.receive_data(data)
    return pump(session, decide)


def drive_pieces(session: ServerSession, pieces: Iterable[bytes], decide: Decide | None = None) -> Result:
    out: Result = []
    for piece in pieces:
        if piece:
            out += drive(session, piece, decide)
    return out


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def wire(result: Result) -> bytes:
    return b"".join(reply for _, reply in result)


def codes(result: Result) -> list[int]:
    return [int(reply[:3]) for _, reply in result if reply]


def events(result: Result) -> list[Event]:
    return [event for event, _ in result]


def messages(result: Result) -> list[MessageReceived]:
    return [e for e, _ in result if isinstance(e, MessageReceived)]


def commands(result: Result) -> list[object]:
    return [e.command for e, _ in result if isinstance(e, CommandReceived)]


def well_formed(reply_bytes: bytes) -> bool:
    """Every line "ddd-…CRLF" or "ddd …CRLF", the last with a space, one code throughout."""
    lines = _REPLY_LINE.findall(reply_bytes)
    if not lines or b"".join(lines) != reply_bytes:
        return False
    if any(line[:3] != lines[0][:3] for line in lines):
        return False
    return all(line[3:4] == b"-" for line in lines[:-1]) and lines[-1][3:4] == b" "


# --- sessions parked in a given state ----------------------------------------------------
EHLO = b"EHLO client.test.example\r\n"
MAIL = b"MAIL FROM:<sender@test.example>\r\n"
RCPT = b"RCPT TO:<rcpt@test.example>\r\n"

_TO_STATE: dict[State, bytes] = {
    State.CONNECTED: b"",
    State.READY: EHLO,
    State.MAIL: EHLO + MAIL,
    State.RCPT: EHLO + MAIL + RCPT,
    State.BDAT_MORE: EHLO + MAIL + RCPT + b"BDAT 3\r\nabc",
}


def session_in(state: State, **kw: object) -> ServerSession:
    session = new_session(**kw)  # type: ignore[arg-type]
    if _TO_STATE[state]:
        drive(session, _TO_STATE[state])
    assert session.state is state, (session.state, state)
    return session
