"""Micro benchmarks for the pure SMTP core: command parsing and one in-memory transaction."""

from __future__ import annotations

from engine.smtp.commands import Mail, Rcpt, parse_command
from engine.smtp.replies import R250_OK, Reply
from engine.smtp.server import NEED_DATA, AutoReply, MessageReceived, ServerSession, State

MAIL_LINE = b"MAIL FROM:<newsletter-bounces+1234@lists.example.com> SIZE=24576 BODY=8BITMIME"
RCPT_LINE = b"RCPT TO:<jane.doe@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;jane.doe@example.org"

BODY = (
    b"From: News <newsletter@lists.example.com>\r\nTo: jane.doe@example.org\r\n"
    b"Subject: Weekly\r\nMessage-ID: <1234@lists.example.com>\r\n\r\n"
)
BODY += b"".join(b"Line %04d of the body, plain text, nothing special here.\r\n" % i for i in range(16))
BODY = BODY[:1024 - 2] + b"\r\n"
TRANSACTION = (
    b"MAIL FROM:<newsletter@lists.example.com> SIZE=1024\r\n"
    b"RCPT TO:<jane.doe@example.org>\r\nDATA\r\n" + BODY + b".\r\n"
)
BANNER = Reply(220, "", "bench ESMTP")


def run(session: ServerSession, data: bytes) -> int:
    """The adapter's loop; returns how many messages were received."""
    session.receive_data(data)
    received = 0
    while True:
        event = session.next_event()
        if event is NEED_DATA:
            return received
        if isinstance(event, AutoReply):
            session.send(event.reply)
        else:
            received += isinstance(event, MessageReceived)
            session.send(R250_OK)


def test_parse_mail(benchmark) -> None:
    result = benchmark(parse_command, MAIL_LINE)
    assert isinstance(result, Mail) and result.size == 24576


def test_parse_rcpt(benchmark) -> None:
    result = benchmark(parse_command, RCPT_LINE)
    assert isinstance(result, Rcpt) and result.notify == ("FAILURE", "DELAY")


def test_session_transaction(benchmark) -> None:
    assert len(BODY) == 1024
    session = ServerSession(max_message_size=10_000_000)
    session.send(BANNER)
    run(session, b"EHLO client.example\r\n")
    assert session.state is State.READY

    def one_transaction() -> int:
        return run(session, TRANSACTION)

    assert benchmark(one_transaction) == 1
    assert session.state is State.READY
