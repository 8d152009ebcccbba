"""The sans-I/O machine's out-of-order replies and HELP, command by command (the same
over sockets: tests/integration/test_smtp_replies_say_what.py)."""

from __future__ import annotations

import pytest

from engine.smtp.commands import Bdat, Data, Mail, Rcpt, parse_command
from engine.smtp.events import AutoReply, CommandReceived, State
from engine.smtp.replies import Reply
from engine.smtp.sequence import help_reply, sequence_reply
from engine.smtp.server import ServerSession


@pytest.mark.parametrize(("line", "state", "code", "says"), [
    (b"RCPT TO:<b@example.org>", State.READY, 503, "Need MAIL command first"),
    (b"DATA", State.READY, 503, "Need MAIL command first"),
    (b"BDAT 10 LAST", State.READY, 503, "Need MAIL command first"),
    (b"DATA", State.MAIL, 554, "need an accepted RCPT command first"),
    (b"BDAT 10", State.MAIL, 554, "need an accepted RCPT command first"),
    (b"DATA", State.BDAT_MORE, 503, "send BDAT LAST"),
    (b"RCPT TO:<b@example.org>", State.BDAT_MORE, 503, "send BDAT LAST"),
    (b"MAIL FROM:<a@example.com>", State.RCPT, 503, "Sender already given"),
])
def test_out_of_order_replies_say_what_is_missing(line: bytes, state: State, code: int, says: str) -> None:
    command = parse_command(line)
    assert isinstance(command, (Rcpt, Data, Bdat, Mail))
    reply = sequence_reply(command, state)
    assert reply.code == code and says in str(reply.text)


def _session_after(ehlo_reply: Reply | None) -> ServerSession:
    s = ServerSession(max_message_size=1000)
    s.send(Reply(220, "", "ready"))
    if ehlo_reply is not None:
        s.receive_data(b"EHLO client.test\r\n")
        event = s.next_event()
        assert isinstance(event, CommandReceived)
        s.send(ehlo_reply)
    return s


def _help_words(s: ServerSession) -> set[str]:
    s.receive_data(b"HELP\r\n")
    event = s.next_event()
    assert isinstance(event, AutoReply) and event.reply.code == 214
    s.send(event.reply)
    return set(str(event.reply.text).split("commands:")[1].split())


def test_help_follows_the_last_ehlo_reply() -> None:
    base = {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"}
    assert _help_words(_session_after(None)) == base
    plain = Reply(250, "", ("mx greets client.test", "PIPELINING", "CHUNKING"))
    assert _help_words(_session_after(plain)) == base | {"BDAT"}
    full = Reply(250, "", ("mx greets client.test", "STARTTLS", "AUTH PLAIN LOGIN"))
    assert _help_words(_session_after(full)) == base | {"STARTTLS", "AUTH"}
    assert help_reply(frozenset({"AUTH"})) is help_reply(frozenset({"AUTH"}))  # built once
