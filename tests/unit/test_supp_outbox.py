"""The suppression outbox (issue 16) on a real LMDB environment in tmp_path: a local
change lands in the outbox in its own transaction only while the node is in a cluster,
the fleet's changes never do, and the drain deletes what was published."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.queue import supp_outbox, suppression
from engine.queue.store import QueueStore
from engine.queue.supp_outbox import Change
from engine.queue.suppression import Suppression

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="batch")
    yield s
    s.close()


def entry(value: str, tenant: str = "") -> Suppression:
    return suppression.make(value, "manual", source="test", created=2.0, tenant=tenant)


def join(store: QueueStore) -> bool:
    return store.write_one(lambda w: supp_outbox.set_on(w, True))


def test_alone_nothing_is_recorded(store: QueueStore) -> None:
    assert store.write_one(lambda w: suppression.add(w, [entry("a@x.test")])) == 1
    assert store.write_one(lambda w: suppression.remove(w, "a@x.test"))
    assert store.supp_outbox() == []
    assert store.supp_outbox_count() == 0


def test_in_a_cluster_adds_and_removes_queue_in_commit_order(store: QueueStore) -> None:
    assert join(store) is True
    assert join(store) is False  # already marked: no second seeding
    store.write_one(lambda w: suppression.add(w, [entry("B@X.test", "t1"), entry("y.test")]))
    store.write_one(lambda w: suppression.add(w, [entry("b@x.test", "t1")]))  # present: not again
    store.write_one(lambda w: suppression.remove(w, "y.test"))
    store.write_one(lambda w: suppression.remove(w, "never@x.test"))  # not there: nothing
    got = [c for _, c in store.supp_outbox()]
    assert got == [
        Change("add", "t1", "address", "b@x.test", "manual", "test", 2.0),
        Change("add", "", "domain", "y.test", "manual", "test", 2.0),
        Change("remove", "", "domain", "y.test"),
    ]
    assert store.supp_outbox_count() == 3


def test_a_rolled_back_op_leaves_no_outbox_entry(store: QueueStore) -> None:
    join(store)
    bad = Suppression("not an address@", "address", "manual")
    with pytest.raises(ValueError):
        store.write_one(lambda w: suppression.add(w, [entry("ok@x.test"), bad]))
    assert store.supp_outbox() == []
    assert store.suppressed("ok@x.test") is None


def test_remote_changes_apply_without_echo_and_save_the_position(store: QueueStore) -> None:
    join(store)
    changes = [Change("add", "", "address", "c@x.test", "bounce", "550", 3.0),
               Change("add", "", "address", "bad value@", "bounce"),  # skipped, not fatal
               Change("remove", "", "address", "c@x.test"),
               Change("add", "t", "domain", "z.test", "complaint")]
    added, removed = store.write_one(lambda w: suppression.apply_remote(
        w, changes, mark=b"pos", position=b"17-0"))
    assert (added, removed) == (2, 1)
    assert store.suppressed("c@x.test") is None
    assert store.suppressed("q@z.test", tenant="t") is not None
    assert store.supp_outbox() == []
    assert store.get_control(b"pos") == b"17-0"


def test_drain_deletes_exactly_what_was_published(store: QueueStore) -> None:
    join(store)
    store.write_one(lambda w: suppression.add(w, [entry(f"u{i}@x.test") for i in range(5)]))
    first = store.supp_outbox(limit=3)
    assert len(first) == 3
    assert store.write_one(supp_outbox.delete(k for k, _ in first)) == 3
    rest = [c.value for _, c in store.supp_outbox()]
    assert rest == ["u3@x.test", "u4@x.test"]


def test_seeding_copies_the_list_in_slices(store: QueueStore) -> None:
    store.write_one(lambda w: suppression.add(w, [entry(f"s{i}@x.test") for i in range(7)]))
    assert store.supp_outbox() == []  # alone: nothing recorded
    join(store)
    after = b""
    slices = 0
    while True:
        after = store.write_one(lambda w, a=after: suppression.seed_outbox(w, a, 3))
        if not after:
            break
        slices += 1
    assert slices == 3
    assert sorted(c.value for _, c in store.supp_outbox()) == sorted(f"s{i}@x.test" for i in range(7))
