"""Priority lanes of the due index (engine/queue/layout.py, store_views.due_scan), the
rebuild of an older queue's index at open, and the scheduler's scan budget
(engine/delivery/scan_plan.py), on a real LMDB queue."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.delivery.scan_plan import SCAN_BATCH, ScanPlan, priority_room
from engine.queue.ids import IdAllocator
from engine.queue.layout import DEFAULT_LANE, PRIORITIES, key_id, lane_of, owner_of, stable_shard
from engine.queue.records import MessageRecord, Recipient
from engine.queue.store import FORMAT, QueueStore, WriteTxn

T0 = 1_700_000_000.0
FOREVER = 10**15


class Q:
    def __init__(self, path: Path, shards: int = 1) -> None:
        self.store = QueueStore(str(path), map_size=64 << 20, durability="memory", shards=shards)
        self.ids = IdAllocator(self.store.next_boot())

    def add(self, priority: int, due: float, *rcpts: str) -> MessageRecord:
        rec = MessageRecord(self.ids.next(), "s@x.org",
                            [Recipient(r, next_attempt=due) for r in rcpts or ("a@d.test",)],
                            T0, 3, priority=priority)
        self.store.write_one(lambda w: w.put_message(rec, b"abc"))
        return rec


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Q]:
    queue = Q(tmp_path / "q")
    yield queue
    queue.store.close()


def ms(t: float) -> int:
    return int(t * 1000)


def test_lanes_run_highest_priority_first_then_by_due(q: Q) -> None:
    news = [q.add(5, T0 + i) for i in range(5)]
    low = q.add(0, T0)  # the earliest due of all, but the lowest priority
    reset = q.add(9, T0 + 100)  # queued after everything else
    nine = q.add(9, T0 + 50)
    seven = q.add(7, T0 + 200)
    got = q.store.due_entries(0, FOREVER, 100)
    assert [mid for _, mid, _ in got] == [nine.id, reset.id, seven.id, *(r.id for r in news), low.id]
    assert got[0] == (ms(T0 + 50), nine.id, "d.test")
    # the scheduler's view names the lane of each entry
    lanes = [lane for lane, *_ in q.store.due_scan(0, FOREVER, [100] * 10, [0] * 10)]
    assert lanes == [0, 0, 2, 4, 4, 4, 4, 4, 9]
    assert [lane_of(p) for p in (9, 5, 0, -3, 12)] == [0, DEFAULT_LANE, 9, 9, 0]


def test_caps_are_running_totals_per_lane(q: Q) -> None:
    for i in range(4):
        q.add(5, T0 + i)
    hi = [q.add(8, T0 + 10 + i) for i in range(3)]
    # in-flight set full: only the lanes above the default may take anything
    caps = [2] * DEFAULT_LANE + [0] * (PRIORITIES - DEFAULT_LANE)
    got = q.store.due_scan(0, FOREVER, caps, [0] * PRIORITIES)
    assert [e[2] for e in got] == [hi[0].id, hi[1].id]
    # room for 4 in all: the priority entries come first and count toward it
    caps = [10] * DEFAULT_LANE + [4] * (PRIORITIES - DEFAULT_LANE)
    got = q.store.due_scan(0, FOREVER, caps, [0] * PRIORITIES)
    assert [e[0] for e in got] == [1, 1, 1, 4]


def test_each_lane_resumes_from_its_own_point_and_skips_in_flight(q: Q) -> None:
    old_news = q.add(5, T0)
    new_news = q.add(5, T0 + 60)
    early = q.add(9, T0 - 60)
    since = [0] * PRIORITIES
    since[DEFAULT_LANE] = ms(T0 + 30)  # the default lane resumes past old_news ...
    got = q.store.due_scan(0, FOREVER, [10] * PRIORITIES, since)
    assert [e[2] for e in got] == [early.id, new_news.id]  # ... lane 0 does not
    excluded = {(early.id, "d.test"), (new_news.id, "d.test")}
    got = q.store.due_scan(0, FOREVER, [1] * PRIORITIES, [0] * PRIORITIES, exclude=excluded)
    assert [e[2] for e in got] == [old_news.id]  # passed over entries do not count
    # not yet due: nothing, in any lane
    assert q.store.due_entries(0, ms(T0 - 61), 10) == []
    assert [e[1] for e in q.store.due_entries(0, ms(T0), 10)] == [early.id, old_news.id]


def test_owners_do_not_see_each_others_lanes(tmp_path: Path) -> None:
    queue = Q(tmp_path / "q", shards=3)
    domains = [f"d{i}.test" for i in range(12)]
    ids = {d: queue.add(i % 10, T0 + i, f"u@{d}").id for i, d in enumerate(domains)}
    for owner in range(3):
        mine = [e for e in queue.store.due_scan(owner, FOREVER, [100] * 10, [0] * 10)]
        assert {e[3] for e in mine} == {d for d in domains if owner_of(d, ids[d], 3) == owner}
        assert [e[0] for e in mine] == sorted(e[0] for e in mine)
    queue.store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 20)), max_size=40),
       caps=st.lists(st.integers(0, 12), min_size=10, max_size=10),
       since=st.lists(st.integers(0, 22), min_size=10, max_size=10),
       until=st.integers(0, 22), skip=st.sets(st.integers(0, 39)))
def test_scan_matches_a_model(tmp_path_factory: pytest.TempPathFactory,
                              entries: list[tuple[int, int]], caps: list[int], since: list[int],
                              until: int, skip: set[int]) -> None:
    queue = Q(tmp_path_factory.mktemp("q"))
    try:
        recs = [queue.add(p, T0 + due) for p, due in entries]
        excluded = {(recs[i].id, "d.test") for i in skip if i < len(recs)}
        got = queue.store.due_scan(0, ms(T0 + until), caps, [ms(T0 + s) for s in since],
                                   exclude=excluded)
        model: list[tuple[int, int, bytes, str]] = []
        for lane in range(PRIORITIES):
            runs = sorted((ms(T0 + due), r.id) for (p, due), r in zip(entries, recs)
                          if lane_of(p) == lane)
            for due_ms, mid in runs:
                if len(model) >= caps[lane]:
                    break
                if ms(T0 + since[lane]) <= due_ms <= ms(T0 + until) and (mid, "d.test") not in excluded:
                    model.append((lane, due_ms, mid, "d.test"))
        assert got == model
    finally:
        queue.store.close()


def test_older_queue_gets_lanes_at_open(tmp_path: Path) -> None:
    """A format-2 queue (keys owner | due | id | domain) is rebuilt at open."""
    queue = Q(tmp_path / "q", shards=2)
    recs = [queue.add(p, T0 + i, f"u@d{i}.test") for i, p in enumerate((5, 9, 0, 5, 9))]
    store = queue.store

    def downgrade(w: WriteTxn) -> None:
        txn = w.txn
        txn.drop(store._due, delete=False)
        for r in recs:
            for d, t in ((r.recipients[0].address.split("@")[1], r.recipients[0].next_attempt),):
                old = struct.pack(">HQ", stable_shard(d, 2), ms(t)) + r.id + d.encode()
                txn.put(old, struct.pack(">I", int(T0)), db=store._due)
        txn.put(b"format", bytes([2]), db=store._meta)

    store.write_one(downgrade)
    store.close()
    reopened = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="memory", shards=2)
    try:
        assert reopened.get_control(b"x") is None
        got = [e for o in range(2) for e in reopened.due_scan(o, FOREVER, [10] * 10, [0] * 10)]
        assert sorted((e[0], e[2]) for e in got) == sorted(
            (lane_of(r.priority), r.id) for r in recs)
        assert len(reopened.scan_due_keys(b"", 100)) == 5
        assert {key_id(k) for k in reopened.scan_due_keys(b"", 100)} == {r.id for r in recs}
        assert reopened._read(lambda t: t.get(b"format", db=reopened._meta)) == bytes([FORMAT])
    finally:
        reopened.close()


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    queue = Q(tmp_path / "q")
    store = queue.store
    store.write_one(lambda w: w.txn.put(b"format", bytes([FORMAT + 1]), db=store._meta))
    store.close()
    with pytest.raises(Exception, match="newer than this engine"):
        QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="memory")


# --- the scheduler's budget ------------------------------------------------------------------
def test_plan_budget_and_headroom() -> None:
    plan = ScanPlan()
    caps, since = plan.next(max_ready=100, inflight=0, mono=1000.0) or ([], [])
    assert caps == [110] * DEFAULT_LANE + [100] * (PRIORITIES - DEFAULT_LANE)
    assert since == [0] * PRIORITIES
    # full of newsletter units: the priority lanes still get the headroom, the rest none
    caps, _ = plan.next(max_ready=100, inflight=100, mono=1000.1) or ([], [])
    assert caps == [priority_room(100)] * DEFAULT_LANE + [0] * (PRIORITIES - DEFAULT_LANE)
    assert priority_room(100) == 10 and priority_room(5) == 1
    assert plan.next(max_ready=100, inflight=110, mono=1000.2) is None
    caps, _ = plan.next(max_ready=20_000, inflight=0, mono=1000.3) or ([], [])
    assert max(caps) == SCAN_BATCH


def test_plan_resume_points_per_lane_and_full_scans() -> None:
    plan = ScanPlan()
    plan.next(100, 0, mono=1000.0)  # the first scan is a full one
    plan.saw(0, 50_000)
    plan.saw(DEFAULT_LANE, 90_000)
    plan.saw(DEFAULT_LANE, 80_000)  # resume points only move forward
    _, since = plan.next(100, 0, mono=1001.0) or ([], [])
    assert since[0] == 49_000 and since[DEFAULT_LANE] == 89_000 and since[9] == 0
    # a scan with no room below the priority lanes does not spend the safety-net full scan
    _, since = plan.next(100, 100, mono=1010.0) or ([], [])
    assert since[DEFAULT_LANE] == 89_000
    _, since = plan.next(100, 0, mono=1010.1) or ([], [])
    assert since == [0] * PRIORITIES
    plan.forget()
    _, since = plan.next(100, 0, mono=1010.2) or ([], [])
    assert since == [0] * PRIORITIES
