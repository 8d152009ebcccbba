"""Campaign counters on a real LMDB environment in tmp_path (no mocks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.queue import campaigns
from engine.queue.campaigns import CampaignCounts
from engine.queue.store import QueueStore, WriteTxn

pytestmark = pytest.mark.timeout(60)


def open_store(path: Path) -> QueueStore:
    return QueueStore(str(path / "q"), map_size=64 << 20, durability="batch")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def test_bump_creates_and_adds(store: QueueStore) -> None:
    store.write_one(lambda w: campaigns.bump(w, "acme", "spring", now=10.0, injected=5,
                                             suppressed=1))
    store.write_one(lambda w: campaigns.bump(w, "acme", "spring", now=20.0, delivered=3,
                                             deferred=2, bounced={"mailbox": 1, "policy": 1}))
    store.write_one(lambda w: campaigns.bump(w, "acme", "spring", now=15.0, complained=1,
                                             bounced={"mailbox": 2}))
    assert store.campaign("acme", "spring") == CampaignCounts(
        "acme", "spring", injected=5, delivered=3, deferred=2, bounced=4,
        bounced_by_class={"mailbox": 3, "policy": 1}, suppressed=1, complained=1,
        first_at=10.0, last_at=20.0)
    assert store.campaign("acme", "summer") is None
    assert store.campaign("", "spring") is None


def test_no_campaign_and_no_tenant_is_not_counted(store: QueueStore) -> None:
    store.write_one(lambda w: campaigns.bump(w, "", "", now=1.0, injected=1))
    assert store.campaigns() == []
    store.write_one(lambda w: campaigns.bump(w, "acme", "", now=1.0, injected=1))
    store.write_one(lambda w: campaigns.bump(w, "", "c", now=1.0, injected=1))
    assert {(c.tenant, c.campaign) for c in store.campaigns()} == {("acme", ""), ("", "c")}


def test_ops_of_one_batch_see_each_other(store: QueueStore) -> None:
    def op(w: WriteTxn) -> None:
        campaigns.bump(w, "t", "c", now=1.0, injected=1)

    res = store.write([op, op, op])
    assert res == [None, None, None]
    c = store.campaign("t", "c")
    assert c is not None and c.injected == 3


def test_a_failed_op_does_not_count(store: QueueStore) -> None:
    def good(w: WriteTxn) -> None:
        campaigns.bump(w, "t", "c", now=1.0, injected=1)

    def bad(w: WriteTxn) -> None:
        campaigns.bump(w, "t", "c", now=1.0, injected=100)
        raise RuntimeError("refused after counting")

    res = store.write([good, bad, good])
    assert isinstance(res[1], RuntimeError)
    c = store.campaign("t", "c")
    assert c is not None and c.injected == 2


def test_listing_is_newest_first_and_filters_tenants(store: QueueStore) -> None:
    for i, (tenant, name) in enumerate([("a", "x"), ("b", "y"), ("a", "z"), ("ab", "w")]):
        store.write_one(lambda w, t=tenant, n=name, at=float(i): campaigns.bump(
            w, t, n, now=at, injected=1))
    assert [c.campaign for c in store.campaigns()] == ["w", "z", "y", "x"]
    assert [c.campaign for c in store.campaigns(limit=2)] == ["w", "z"]
    # "a" does not match the tenant "ab": the separator ends the prefix
    assert [c.campaign for c in store.campaigns(tenant="a")] == ["z", "x"]
    assert store.campaigns(tenant="nobody") == []


def test_summarize_keeps_the_newest_and_sums_the_rest() -> None:
    cs = [CampaignCounts("t", f"c{i}", injected=i, bounced=1, bounced_by_class={"mailbox": 1},
                         last_at=float(i)) for i in range(5)]
    out = campaigns.summarize(cs, 2)
    assert [c.campaign for c in out] == ["c4", "c3", "other"]
    assert out[2].injected == 0 + 1 + 2 and out[2].bounced == 3
    assert out[2].bounced_by_class == {"mailbox": 3}
    assert campaigns.summarize(cs, 5) == sorted(cs, key=lambda c: -c.last_at)


def test_bad_names_are_refused(store: QueueStore) -> None:
    with pytest.raises(ValueError, match="campaign: .* holds NUL"):
        store.write_one(lambda w: campaigns.bump(w, "t", "a\0b", now=1.0, injected=1))
    with pytest.raises(ValueError, match="tenant: .* longer than"):
        store.write_one(lambda w: campaigns.bump(w, "t" * 300, "c", now=1.0, injected=1))


def test_counters_survive_reopen(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.write_one(lambda w: campaigns.bump(w, "t", "c", now=1.0, delivered=7))
    s.sync()
    s.close()
    s = open_store(tmp_path)
    try:
        c = s.campaign("t", "c")
        assert c is not None and c.delivered == 7
    finally:
        s.close()
