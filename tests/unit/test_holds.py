"""The holds table: its two encodings, when a suspension is in force, which have ended,
and the throttle's effect on pool settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import orjson
import pytest

from engine.delivery.holds import (
    HOLDS_KEY,
    PARK,
    Holds,
    Suspension,
    Throttle,
    decode_holds,
    encode_holds,
    holds_from_builtins,
    holds_to_builtins,
    park_op,
)
from engine.delivery.job import PoolSettings
from engine.delivery.routing import throttled
from engine.queue.ids import IdAllocator
from engine.queue.records import DELIVERED, MessageRecord, Recipient
from engine.queue.store import QueueStore

NOW = 1_800_000_000.0


def table() -> Holds:
    return Holds(
        {"a.test": Suspension("a.test", since=NOW - 10, until=NOW + 60, reason="abuse desk"),
         "b.test": Suspension("b.test", since=NOW - 10, until=None, reason="", by="admin"),
         "c.test": Suspension("c.test", since=NOW - 100, until=NOW - 1, reason="old")},
        {"d.test": Throttle("d.test", max_connections=1, rate=None, since=NOW),
         "e.test": Throttle("e.test", max_connections=None, rate=2.5, since=NOW)},
    )


def test_msgpack_round_trip_keeps_every_field() -> None:
    h = table()
    assert decode_holds(encode_holds(h)) == h


def test_builtins_round_trip_through_json() -> None:
    h = table()
    wire = orjson.dumps(holds_to_builtins(h))  # what the control pipe carries
    back = holds_from_builtins(orjson.loads(wire))
    assert back == h
    assert back.suspensions["b.test"].by == "admin" and back.suspensions["b.test"].until is None


def test_malformed_table_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        holds_from_builtins({"suspensions": {"a.test": {"domain": "a.test"}}, "throttles": {}})
    with pytest.raises(msgspec.DecodeError):
        decode_holds(b"\xc1 not msgpack")


def test_domains_are_normalised() -> None:
    h = Holds({"Mixed.TEST.": Suspension("mixed.test", since=NOW, until=None, reason="")}, {})
    assert list(h.suspensions) == ["mixed.test"]
    assert h.suspended("MIXED.test", NOW) is not None
    assert h.suspended("sub.mixed.test", NOW) is None  # exact domains only


def test_suspended_until_future_past_and_open_ended() -> None:
    h = table()
    assert h.suspended("a.test", NOW) is h.suspensions["a.test"]  # until in the future
    assert h.suspended("a.test", NOW + 60) is None  # the boundary: it has ended
    assert h.suspended("b.test", NOW + 10**9) is h.suspensions["b.test"]  # until None
    assert h.suspended("c.test", NOW) is None  # until in the past
    assert h.suspended("d.test", NOW) is None  # throttled, not suspended


def test_expired_lists_only_timed_suspensions_that_ended() -> None:
    h = table()
    assert h.expired(NOW) == ["c.test"]
    assert sorted(h.expired(NOW + 61)) == ["a.test", "c.test"]
    assert Holds().expired(NOW) == []


def test_throttle_gives_the_domain_its_own_limited_pool() -> None:
    base = PoolSettings(max_connections=20)
    t = throttled(base, Throttle("d.test", max_connections=1, rate=None, since=NOW))
    assert (t.max_connections, t.rate, t.only_domain) == (1, 0.0, "d.test")
    r = throttled(base, Throttle("e.test", max_connections=None, rate=2.5, since=NOW))
    assert (r.max_connections, r.rate, r.only_domain) == (20, 2.5, "e.test")
    assert base.only_domain == "" and base.rate == 0.0


# --- parking, against a real store -----------------------------------------------------

MAX_AGE = 5 * 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(str(tmp_path / "q"), map_size=16 << 20, durability="memory")
    yield s
    s.close()


def queue(store: QueueStore, ids: IdAllocator, rcpts: list[Recipient], received: float) -> bytes:
    rec = MessageRecord(ids.next(), "s@src.test", rcpts, received_at=received, size=10)
    store.write_one(lambda w: w.put_message(rec, b"body\r\n"))
    return rec.id


def test_park_redates_the_domains_pending_recipients_only(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    store.put_control(HOLDS_KEY, encode_holds(table()))
    msg = queue(store, ids, [Recipient("x@a.test"), Recipient("y@a.test", next_attempt=NOW + 999),
                             Recipient("z@a.test", state=DELIVERED), Recipient("w@b.test")],
                NOW - 5)
    res = store.write_one(park_op([(msg, "a.test")], NOW, MAX_AGE))
    assert (res.parked, res.released, res.expired) == (1, [], [])
    rec = store.get(msg)
    assert rec is not None
    assert [r.next_attempt for r in rec.recipients] == [NOW + 60, NOW + 999, 0.0, 0.0]
    due = store.due_entries(0, int((NOW + 30) * 1000), 10)
    assert [(d[1], d[2]) for d in due] == [(msg, "b.test")]  # a.test left the scan's way


def test_park_open_ended_and_capped_at_expiry(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    store.put_control(HOLDS_KEY, encode_holds(table()))
    fresh = queue(store, ids, [Recipient("x@b.test")], NOW - 5)
    old = queue(store, ids, [Recipient("x@b.test")], NOW - MAX_AGE + 100)
    store.write_one(park_op([(fresh, "b.test"), (old, "b.test")], NOW, MAX_AGE))
    assert store.get(fresh).recipients[0].next_attempt == NOW + PARK  # type: ignore[union-attr]
    # Held mail still expires on time: parked no later than its max_age.
    assert store.get(old).recipients[0].next_attempt == NOW + 100  # type: ignore[union-attr]


def test_park_follows_the_stored_table_not_the_callers(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    resumed = table()
    del resumed.suspensions["a.test"]  # saved after the worker's scan chose to park
    store.put_control(HOLDS_KEY, encode_holds(resumed))
    msg = queue(store, ids, [Recipient("x@a.test")], NOW - 5)
    expired = queue(store, ids, [Recipient("x@b.test")], NOW - MAX_AGE)
    gone = b"\0" * 8
    res = store.write_one(park_op([(msg, "a.test"), (expired, "b.test"), (gone, "b.test")],
                                  NOW, MAX_AGE))
    assert (res.parked, res.released, res.expired) == (0, [(msg, "a.test")], [(expired, "b.test")])
    assert store.get(msg).recipients[0].next_attempt == 0.0  # type: ignore[union-attr]


def test_park_without_a_stored_table_releases(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    msg = queue(store, ids, [Recipient("x@a.test")], NOW - 5)
    assert store.write_one(park_op([(msg, "a.test")], NOW, MAX_AGE)).released == [(msg, "a.test")]
