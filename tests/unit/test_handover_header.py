"""X-Volley-Handover (engine/inbound/handover.py): the record's facts SMTP cannot carry
survive render → take → apply; an untrusted client's field is removed and ignored."""

from __future__ import annotations

from engine.inbound import handover
from engine.queue.records import BOUNCED, PENDING, HeldFailure, MessageRecord, Recipient

BODY = b"Received: from a\r\n\tby origin\r\nSubject: hi\r\n\r\nbody\r\n"


def origin_record() -> MessageRecord:
    return MessageRecord(
        id=b"\x01" * 8, sender="s@home.test",
        recipients=[
            Recipient("gone@b.test", state=BOUNCED, attempts=1, last_reply="550 no"),
            Recipient("x@a.test", orcpt="rfc822;x@a.test", notify=("FAILURE",), attempts=3,
                      next_attempt=1234.5, last_reply="451 later", delay_warned=True),
            Recipient("y@a.test", attempts=1, next_attempt=99.0),
        ],
        received_at=1000.25, size=len(BODY), ret="HDRS", envid="E1", client_ip="10.1.2.3",
        helo="client.test", auth_user="alice",
        held_failures=[HeldFailure(0, 550, "5.1.1", ("no such user",), "mx.b.test")],
        campaign="spring", tenant="acme", priority=8, sign=True, egress_pool="warm")


def peer_record(rcpts: list[str]) -> MessageRecord:
    # What the peer's queue_record makes of the transaction: RCPTs in order, fresh state.
    return MessageRecord(id=b"\x02" * 8, sender="s@home.test",
                         recipients=[Recipient(a) for a in rcpts], received_at=5000.0,
                         size=1, client_ip="127.0.0.4", helo="origin")


def test_render_take_apply_keeps_the_history_and_removes_the_field():
    field = handover.render(handover.from_record(origin_record(), "origin.test", "0101"))
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    taken = handover.take(field + BODY, "127.0.0.4", trusted=True)
    assert taken.content == BODY
    assert taken.handover is not None and taken.handover.origin == "origin.test"
    rec = peer_record(["y@a.test", "x@a.test"])  # another order than the origin's
    handover.apply(rec, taken.handover)
    assert (rec.received_at, rec.campaign, rec.tenant, rec.priority, rec.sign, rec.egress_pool) == (
        1000.25, "spring", "acme", 8, True, "warm")
    assert (rec.client_ip, rec.helo, rec.auth_user) == ("10.1.2.3", "client.test", "alice")
    y, x, gone = rec.recipients
    assert (y.address, y.attempts, y.next_attempt, y.state) == ("y@a.test", 1, 99.0, PENDING)
    assert (x.attempts, x.next_attempt, x.last_reply, x.delay_warned) == (3, 1234.5, "451 later", True)
    # The held failure travels with its recipient, final, re-indexed into the new record.
    assert (gone.address, gone.state) == ("gone@b.test", BOUNCED)
    (held,) = rec.held_failures
    assert (held.index, held.code, held.text, held.remote_mta) == (2, 550, ("no such user",), "mx.b.test")


def test_untrusted_field_is_removed_and_ignored():
    field = handover.render(handover.from_record(origin_record(), "origin.test", "0101"))
    taken = handover.take(field + BODY, "192.0.2.7", trusted=False)
    assert taken.handover is None and taken.content == BODY


def test_garbage_field_is_removed_and_ignored_even_when_trusted():
    taken = handover.take(b"X-Volley-Handover: not*base64\r\n" + BODY, "127.0.0.4", trusted=True)
    assert taken.handover is None and taken.content == BODY


def test_a_message_without_the_field_is_unchanged():
    content = b"Subject: mentions x-volley-handover: in text\r\n\r\nx\r\n"
    assert handover.take(content, "127.0.0.4", trusted=True) == (None, content)
    assert handover.take(BODY, "127.0.0.4", trusted=True) == (None, BODY)
