"""Micro benchmark for the pure SMTP client: one pipelined transaction, 10 recipients, 1 KB body.

Measures what the delivery adapter pays per message in Python: building the MAIL/RCPT*/DATA
group, parsing the server's replies from bytes, feeding them to the Transaction, and
building the dot-stuffed body write.
"""

from __future__ import annotations

from engine.smtp.client import Capabilities, Envelope, Recipient, ReplyParser, Transaction

CAPS = Capabilities(pipelining=True, size=35_000_000, eightbitmime=True, dsn=True, enhancedstatuscodes=True)
BODY = (
    b"From: News <newsletter@lists.example.com>\r\nTo: jane.doe@example.org\r\n"
    b"Subject: Weekly\r\nMessage-ID: <1234@lists.example.com>\r\n\r\n"
)
BODY += b"".join(b"Line %04d of the body, plain text, nothing special here.\r\n" % i for i in range(16))
BODY = BODY[: 1024 - 2] + b"\r\n"
ENVELOPE = Envelope(
    "newsletter-bounces+1234@lists.example.com",
    [Recipient(f"user{i}@example.org", notify=("FAILURE",)) for i in range(10)],
    BODY,
)
GROUP_REPLIES = (
    b"250 2.1.0 Sender OK\r\n" + b"250 2.1.5 Recipient OK\r\n" * 10 + b"354 End data with <CR><LF>.<CR><LF>\r\n"
)
FINAL_REPLY = b"250 2.0.0 Ok: queued as 4BQ2Xk1Q3pz9rLx\r\n"


def one_transaction() -> int:
    parser = ReplyParser()
    tx = Transaction(ENVELOPE, CAPS, first_on_connection=True)
    written = len(tx.initial_bytes())
    parser.feed(GROUP_REPLIES)
    while (reply := parser.next_reply()) is not None:
        out = tx.on_reply(reply)
        if out is not None:
            written += len(out)
    parser.feed(FINAL_REPLY)
    reply = parser.next_reply()
    assert reply is not None
    tx.on_reply(reply)
    assert tx.done and tx.clean
    return written


def test_pipelined_transaction_10_rcpts_1k(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert len(BODY) == 1024
    assert benchmark(one_transaction) > 1024


def test_reply_parser_group(benchmark) -> None:  # type: ignore[no-untyped-def]
    def parse() -> int:
        parser = ReplyParser()
        parser.feed(GROUP_REPLIES)
        n = 0
        while parser.next_reply() is not None:
            n += 1
        return n

    assert benchmark(parse) == 12
