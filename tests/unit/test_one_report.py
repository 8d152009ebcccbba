"""One failure report per message and delivery pass (engine/delivery/onereport.py):
when failures are held in the record, when they go out, and that they survive the
record's encoding."""

from __future__ import annotations

import msgspec

from engine.delivery import outcome
from engine.delivery.onereport import failures_to_report
from engine.queue.records import (
    HeldFailure,
    MessageRecord,
    Recipient,
    decode_record,
    encode_record,
)
from engine.smtp.replies import Reply

NOW = 1_700_000_000.0
REFUSED = Reply(550, "5.1.1", "no such user")


def record(*addresses: str) -> MessageRecord:
    return MessageRecord(b"\x00" * 8, "s@home.test", [Recipient(a) for a in addresses], NOW - 5, 10)


def apply(rec: MessageRecord, results: dict[int, Reply]) -> outcome.Applied:
    return outcome.apply(rec, results, NOW, schedule=(60.0,), max_age=86400.0)


def test_failure_held_while_another_domain_is_due() -> None:
    applied = apply(record("a@x.test", "b@y.test"), {0: REFUSED})
    assert failures_to_report(applied, "mx.x.test", NOW) == []
    assert applied.record.held_failures == [
        HeldFailure(0, 550, "5.1.1", ("no such user",), "mx.x.test")]
    # The other unit's outcome ends the pass: one report with both failures.
    second = apply(applied.record, {1: Reply(550, "5.1.1", "gone")})
    out = failures_to_report(second, "mx.y.test", NOW)
    assert [(r.address, rep.code, a, m) for r, rep, a, m in out] == [
        ("a@x.test", 550, "failed", "mx.x.test"), ("b@y.test", 550, "failed", "mx.y.test")]
    assert second.record.held_failures == []


def test_other_domain_deferred_ends_the_pass() -> None:
    rec = record("a@x.test", "b@y.test")
    deferred = apply(rec, {1: Reply(451, "4.3.2", "later")})
    assert failures_to_report(deferred, "mx.y.test", NOW) == []
    applied = apply(deferred.record, {0: REFUSED})
    assert [r.address for r, _, _, _ in failures_to_report(applied, "mx.x.test", NOW)] == ["a@x.test"]


def test_held_failures_go_out_when_the_pending_recipient_defers() -> None:
    applied = apply(record("a@x.test", "b@y.test"), {0: REFUSED})
    failures_to_report(applied, "mx.x.test", NOW)
    deferred = apply(applied.record, {1: Reply(451, "4.3.2", "later")})
    out = failures_to_report(deferred, "mx.y.test", NOW)
    assert [r.address for r, _, _, _ in out] == ["a@x.test"]


def test_not_yet_due_recipient_does_not_hold() -> None:
    rec = record("a@x.test", "b@y.test")
    rec.recipients[1].next_attempt = NOW + 600  # waiting for a retry: a later pass
    applied = apply(rec, {0: REFUSED})
    assert len(failures_to_report(applied, "mx.x.test", NOW)) == 1


def test_recipient_at_a_suspended_domain_does_not_hold() -> None:
    applied = apply(record("a@x.test", "b@y.test"), {0: REFUSED})
    assert len(failures_to_report(applied, "mx.x.test", NOW, suspended=lambda d: d == "y.test")) == 1


def test_operator_bounce_reports_at_once() -> None:
    applied = apply(record("a@x.test", "b@y.test"), {0: REFUSED})
    assert len(failures_to_report(applied, "", NOW, hold=False)) == 1


def test_held_failures_survive_encoding_and_old_records_decode() -> None:
    rec = record("a@x.test", "b@y.test")
    rec.held_failures = [HeldFailure(0, 550, "5.1.1", ("line 1", "line 2"), "mx.x.test")]
    assert decode_record(encode_record(rec)) == rec
    rec.held_failures = []
    # A record written before held_failures (and the newsletter fields after it) were
    # appended: the same array without its last four elements.
    fields = msgspec.msgpack.decode(encode_record(rec))
    old = msgspec.msgpack.encode(fields[:-5])
    assert decode_record(old) == rec
