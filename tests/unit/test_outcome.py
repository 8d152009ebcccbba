"""delivery/outcome: classification, local failures, apply, expiry, backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config import parse_schedule
from engine.delivery.outcome import (
    TRANSIENT_KINDS,
    Verdict,
    apply,
    classify,
    expire_pending,
    reply_summary,
    transient_failure,
)
from engine.queue.records import BOUNCED, DELIVERED, EXPIRED, PENDING, MessageRecord, Recipient
from engine.smtp.replies import Reply

SCHEDULE = parse_schedule("1m, 5m, 15m, 30m, 1h, 2h, 4h")
MAX_AGE = 5 * 86400.0
T0 = 1_700_000_000.0

OK = Reply(250, "2.0.0", "Ok: queued as ABC")
BUSY = Reply(451, "4.2.0", "mailbox busy, try later")
UNKNOWN = Reply(550, "5.1.1", "user unknown")
R421 = Reply(421, "4.7.0", "too many connections")


def rec(n: int = 3, received: float = T0) -> MessageRecord:
    recipients = [Recipient(f"r{i}@example.com") for i in range(n)]
    return MessageRecord(b"\x01\x02", "sender@example.org", recipients, received, 100)


@pytest.mark.parametrize(
    "code, verdict",
    [
        (250, Verdict.DELIVERED),
        (251, Verdict.DELIVERED),
        (421, Verdict.DEFERRED),
        (450, Verdict.DEFERRED),
        (452, Verdict.DEFERRED),
        (550, Verdict.BOUNCED),
        (554, Verdict.BOUNCED),
        (354, Verdict.DEFERRED),  # not a final reply: protocol error → retry
        (199, Verdict.DEFERRED),
        (999, Verdict.DEFERRED),
        (0, Verdict.DEFERRED),
    ],
)
def test_classify(code: int, verdict: Verdict) -> None:
    assert classify(Reply(code, "", "x")) is verdict


@pytest.mark.parametrize(
    "kind, code, enhanced",
    [
        ("refused", 421, "4.4.1"),
        ("timeout", 421, "4.4.1"),
        ("lost", 451, "4.4.2"),
        ("dns", 451, "4.4.3"),
        ("route", 451, "4.4.4"),
        ("tls_required", 454, "4.7.4"),
        ("tls_failed", 454, "4.7.5"),
        ("local", 451, "4.3.0"),
    ],
)
def test_transient_failure(kind: str, code: int, enhanced: str) -> None:
    r = transient_failure(kind, "connect to mx.example.com[192.0.2.1]:25: Connection refused")
    assert (r.code, r.enhanced) == (code, enhanced)
    assert r.text == "connect to mx.example.com[192.0.2.1]:25: Connection refused"
    assert classify(r) is Verdict.DEFERRED


def test_transient_failure_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown transient failure kind"):
        transient_failure("nope", "x")
    assert set(TRANSIENT_KINDS) >= {"refused", "timeout", "dns", "tls_required"}


def test_reply_summary_multiline() -> None:
    assert reply_summary(Reply(550, "5.7.1", ("one", "two"))) == "550 5.7.1 one two"
    assert reply_summary(Reply(451, "", "x")) == "451 x"


def test_all_delivered_done() -> None:
    r = rec()
    a = apply(r, {0: OK, 1: OK, 2: OK}, T0 + 5, schedule=SCHEDULE, max_age=MAX_AGE)
    assert a.done and a.delivered == [0, 1, 2] and a.deferred == [] and a.bounced == []
    assert all(x.state == DELIVERED and x.attempts == 1 for x in a.record.recipients)
    assert a.record.recipients[0].last_reply == "250 2.0.0 Ok: queued as ABC"
    assert not a.backoff
    # the input is never mutated
    assert all(x.state == PENDING and x.attempts == 0 for x in r.recipients)


def test_mixed_keeps_only_pending() -> None:
    r = rec(4)
    a = apply(r, {0: OK, 1: BUSY, 2: UNKNOWN}, T0 + 10, schedule=SCHEDULE, max_age=MAX_AGE)
    states = [x.state for x in a.record.recipients]
    assert states == [DELIVERED, PENDING, BOUNCED, PENDING]  # 3 was not attempted
    assert (a.delivered, a.deferred, a.bounced, a.done) == ([0], [1], [2], False)
    assert a.record.recipients[1].next_attempt == T0 + 10 + 60.0
    assert a.record.recipients[1].last_reply == "451 4.2.0 mailbox busy, try later"
    assert a.record.recipients[3].attempts == 0
    assert a.dsn_entries() == [(a.record.recipients[2], UNKNOWN, "failed")]


def test_all_5xx_bounce() -> None:
    a = apply(rec(2), {0: UNKNOWN, 1: Reply(554, "5.7.1", "rejected")}, T0, schedule=SCHEDULE, max_age=MAX_AGE)
    assert a.done and a.bounced == [0, 1]
    assert [x.state for x in a.record.recipients] == [BOUNCED, BOUNCED]


def test_deferred_then_expiry_keeps_last_reply() -> None:
    r = rec(1)
    a = apply(r, {0: BUSY}, T0 + 60, schedule=SCHEDULE, max_age=MAX_AGE)
    assert a.deferred == [0] and not a.done
    late = T0 + MAX_AGE + 1
    b = apply(a.record, {0: Reply(452, "4.2.2", "mailbox full")}, late, schedule=SCHEDULE, max_age=MAX_AGE)
    x = b.record.recipients[0]
    assert x.state == EXPIRED and x.attempts == 2
    assert b.bounced == [0] and b.done
    final = b.replies[0]
    assert (final.code // 100, final.enhanced) == (5, "5.4.7")
    assert final.text == "delivery time expired; last reply: 452 4.2.2 mailbox full"
    assert x.last_reply == "554 5.4.7 delivery time expired; last reply: 452 4.2.2 mailbox full"


def test_final_replies_win_over_age() -> None:
    late = T0 + MAX_AGE * 2
    a = apply(rec(2), {0: OK, 1: UNKNOWN}, late, schedule=SCHEDULE, max_age=MAX_AGE)
    assert [x.state for x in a.record.recipients] == [DELIVERED, BOUNCED]
    assert a.replies[1] == UNKNOWN


def test_retry_clamped_to_deadline() -> None:
    now = T0 + MAX_AGE - 30  # next retry (1m) would land after the deadline
    a = apply(rec(1), {0: BUSY}, now, schedule=SCHEDULE, max_age=MAX_AGE)
    assert a.record.recipients[0].next_attempt == T0 + MAX_AGE
    e = expire_pending(a.record, T0 + MAX_AGE, MAX_AGE)
    assert e.bounced == [0] and e.done


@pytest.mark.parametrize(
    "replies, destination_failed, backoff",
    [
        ({0: R421}, False, True),
        ({0: OK, 1: R421}, False, True),
        ({0: transient_failure("refused", "Connection refused")}, False, True),
        ({0: transient_failure("dns", "SERVFAIL")}, False, False),
        ({0: BUSY}, False, False),
        ({0: BUSY}, True, True),
        ({}, True, True),
    ],
)
def test_backoff(replies: dict[int, Reply], destination_failed: bool, backoff: bool) -> None:
    a = apply(rec(2), replies, T0, schedule=SCHEDULE, max_age=MAX_AGE, destination_failed=destination_failed)
    assert a.backoff is backoff


def test_non_pending_never_downgraded() -> None:
    a = apply(rec(1), {0: OK}, T0, schedule=SCHEDULE, max_age=MAX_AGE)
    b = apply(a.record, {0: UNKNOWN}, T0 + 1, schedule=SCHEDULE, max_age=MAX_AGE)
    assert b.record.recipients[0].state == DELIVERED and b.record.recipients[0].attempts == 1
    assert b.bounced == [] and b.done


def test_bad_index() -> None:
    with pytest.raises(IndexError):
        apply(rec(1), {3: OK}, T0, schedule=SCHEDULE, max_age=MAX_AGE)


def test_jittered_deferral_within_bounds() -> None:
    a = apply(rec(1), {0: BUSY}, T0, schedule=SCHEDULE, max_age=MAX_AGE, rng=random.Random(1))
    assert T0 + 54 <= a.record.recipients[0].next_attempt <= T0 + 66


def test_expire_pending() -> None:
    r = rec(3)
    r.recipients[0].state = DELIVERED
    r.recipients[1].attempts, r.recipients[1].last_reply = 3, "451 4.2.0 busy"
    young = expire_pending(r, T0 + MAX_AGE - 1, MAX_AGE)
    assert young.bounced == [] and not young.done and young.record == r
    old = expire_pending(r, T0 + MAX_AGE, MAX_AGE)
    assert old.bounced == [1, 2] and old.done and not old.backoff
    assert [x.state for x in old.record.recipients] == [DELIVERED, EXPIRED, EXPIRED]
    assert old.replies[1].text == "delivery time expired; last reply: 451 4.2.0 busy"
    assert old.replies[2].text == "delivery time expired"  # never attempted
    assert all(old.replies[i].enhanced == "5.4.7" for i in (1, 2))
    assert r.recipients[1].state == PENDING  # input untouched


codes = st.sampled_from([250, 251, 421, 450, 451, 452, 550, 551, 552, 553, 554])


@given(st.lists(codes, min_size=1, max_size=8), st.floats(0, 10 * 86400))
def test_apply_partitions(code_list: list[int], age: float) -> None:
    r = rec(len(code_list))
    a = apply(r, {i: Reply(c, "", "x") for i, c in enumerate(code_list)}, T0 + age, schedule=SCHEDULE, max_age=MAX_AGE)
    assert sorted(a.delivered + a.deferred + a.bounced) == list(range(len(code_list)))
    assert a.done == (not a.deferred)
    for i in a.deferred:
        x = a.record.recipients[i]
        assert x.state == PENDING and T0 + age < x.next_attempt <= T0 + MAX_AGE
    assert a.backoff == (421 in code_list)
