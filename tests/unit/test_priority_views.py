"""The operator's views of a queue whose mail has several priorities: the due index runs
by (owner, lane), and the summary, the totals and the selection by domain of `volley
ctl` still count every unit once, split ready/deferred right, and find every lane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from engine.control import bulk
from engine.control import queue_view as qv
from engine.queue.ids import IdAllocator
from engine.queue.records import MessageRecord, Recipient
from engine.queue.store import QueueStore

NOW = 1_800_000_000.0


class Q:
    def __init__(self, path: Path) -> None:
        self.store = QueueStore(str(path), map_size=64 << 20, durability="memory", shards=3)
        self.ids = IdAllocator(self.store.next_boot())

    def add(self, address: str, *, priority: int = 5, wait: float = 0.0) -> bytes:
        rcpt = Recipient(address, next_attempt=NOW + wait if wait else 0.0,
                         attempts=1 if wait else 0)
        rec = MessageRecord(self.ids.next(), "s@x.org", [rcpt], NOW - 60, 10, priority=priority)
        self.store.write_one(lambda w: w.put_message(rec, b"Subject: x\r\n\r\nbody\r\n"))
        return rec.id


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Q]:
    queue = Q(tmp_path / "q")
    yield queue
    queue.store.close()


def test_summary_and_totals_across_lanes(q: Q) -> None:
    for i in range(3):
        q.add(f"n{i}@p.test")  # ready, default lane
    q.add("retry@p.test", wait=120)  # the earliest retry, in the default lane ...
    q.add("reset@p.test", priority=9, wait=700)  # ... read after lane 0's first deferred
    q.add("bulk@p.test", priority=0, wait=600)
    q.add("now@p.test", priority=9)
    q.add("o@other.test", priority=2, wait=30)
    reply = msgspec.to_builtins(qv.summary(q.store, now=NOW, suspended={}))
    row = {r["key"]: r for r in reply["rows"]}["p.test"]
    assert (row["total"], row["ready"], row["deferred"]) == (7, 4, 3)
    assert row["next_attempt"] == NOW + 120  # the least of the lanes' first deferred keys
    assert reply["totals"] == {"units": 8, "ready": 4, "deferred": 4, "suspended": 0,
                               "domains": 2}
    counts = msgspec.to_builtins(qv.totals(q.store, NOW, {}))
    assert (counts["units"], counts["ready"], counts["deferred"]) == (8, 4, 4)
    held = msgspec.to_builtins(qv.totals(q.store, NOW, {"p.test": object()}))
    assert (held["ready"], held["deferred"], held["suspended"]) == (0, 1, 7)  # p.test held
    ages = msgspec.to_builtins(qv.summary(q.store, by="age", now=NOW, suspended={}))
    assert ages["totals"]["ready"] == 4


def test_totals_skip_deferred_runs_lane_by_lane(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qv, "WALK_CHUNK", 2)  # pages end inside runs
    for p in (9, 5, 5, 1):
        for i in range(3):
            q.add(f"u{p}{i}@d{i}.test", priority=p, wait=100 * (i % 2))
    counts = msgspec.to_builtins(qv.totals(q.store, NOW, {}))
    assert (counts["units"], counts["ready"]) == (12, 8)


def test_selection_by_domain_finds_every_priority(q: Q) -> None:
    ids = sorted([q.add("a@sel.test", priority=p) for p in (0, 5, 9)])
    q.add("b@other.test", priority=9)
    chunks = list(bulk.select(q.store, domain="sel.test", now=NOW + 1, suspended={}))
    assert [mid for chunk in chunks for mid in chunk] == ids
