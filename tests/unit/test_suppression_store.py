"""The suppression list on a real LMDB environment in tmp_path (no mocks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import StorageError
from engine.queue import suppression
from engine.queue.store import QueueStore, WriteTxn
from engine.queue.suppression import Suppression

pytestmark = pytest.mark.timeout(120)


def open_store(path: Path) -> QueueStore:
    return QueueStore(str(path / "q"), map_size=256 << 20, durability="batch")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


def add(store: QueueStore, *entries: Suppression) -> int:
    return store.write_one(lambda w: suppression.add(w, entries))


def entry(value: str, tenant: str = "", reason: str = "manual") -> Suppression:
    return suppression.make(value, reason, source="test", created=1.0, tenant=tenant)


def test_address_entry_suppresses_that_address_only(store: QueueStore) -> None:
    assert add(store, entry("bob@example.com")) == 1
    hit = store.suppressed("bob@example.com")
    assert hit == Suppression("bob@example.com", "address", "manual", "test", 1.0, "")
    assert store.suppressed("alice@example.com") is None
    assert store.suppressed("bob@example.org") is None


def test_case_is_folded_on_add_and_lookup(store: QueueStore) -> None:
    # Local parts too: every large receiver treats them case-insensitively.
    add(store, Suppression("Bob@Example.COM", "address", "manual"))
    assert [e.value for e in store.suppression_list()] == ["bob@example.com"]
    assert store.suppressed("BOB@example.com") is not None
    assert store.suppressed(" bob@EXAMPLE.com ") is not None


def test_domain_entry_suppresses_every_address_of_the_domain(store: QueueStore) -> None:
    add(store, entry("Example.NET"))
    for a in ("a@example.net", "Zed.Q@EXAMPLE.net", '"x y"@example.net'):
        hit = store.suppressed(a)
        assert hit is not None and hit.kind == "domain" and hit.value == "example.net"
    # exactly that domain: not a subdomain, not a longer name
    assert store.suppressed("a@mail.example.net") is None
    assert store.suppressed("a@example.network") is None


def test_tenants_do_not_leak(store: QueueStore) -> None:
    add(store, entry("a@x.example", tenant="acme"), entry("y.example", tenant="acme"))
    assert store.suppressed("a@x.example", "acme") is not None
    assert store.suppressed("b@y.example", "acme") is not None
    for other in ("", "globex"):
        assert store.suppressed("a@x.example", other) is None
        assert store.suppressed("b@y.example", other) is None


def test_shared_entries_apply_to_every_tenant(store: QueueStore) -> None:
    add(store, entry("a@x.example"), entry("z.example"))
    for tenant in ("", "acme", "globex"):
        assert store.suppressed("a@x.example", tenant) is not None
        assert store.suppressed("q@z.example", tenant) is not None


def test_the_most_specific_entry_answers(store: QueueStore) -> None:
    add(store, entry("x.example", reason="manual"), entry("a@x.example", tenant="t", reason="bounce"),
        entry("a@x.example", reason="complaint"))
    hit = store.suppressed("a@x.example", "t")
    assert hit is not None and (hit.reason, hit.tenant) == ("bounce", "t")
    hit = store.suppressed("a@x.example")
    assert hit is not None and hit.reason == "complaint"
    hit = store.suppressed("b@x.example", "t")
    assert hit is not None and hit.kind == "domain"


def test_add_counts_new_and_keeps_the_first_cause(store: QueueStore) -> None:
    assert add(store, entry("a@x.example", reason="bounce"), entry("b@x.example")) == 2
    assert add(store, entry("A@x.example", reason="complaint"), entry("c@x.example")) == 1
    hit = store.suppressed("a@x.example")
    assert hit is not None and hit.reason == "bounce"
    assert store.suppression_count() == 3


def test_same_batch_sees_earlier_ops(store: QueueStore) -> None:
    def first(w: WriteTxn) -> int:
        return suppression.add(w, [entry("a@x.example")])

    def second(w: WriteTxn) -> object:
        return suppression.lookup_in(w, "A@X.example")

    res = store.write([first, second])
    assert res[0] == 1 and isinstance(res[1], Suppression)


def test_remove(store: QueueStore) -> None:
    add(store, entry("a@x.example"), entry("a@x.example", tenant="t"), entry("x.example"))
    assert store.write_one(lambda w: suppression.remove(w, "A@x.example")) is True
    assert store.write_one(lambda w: suppression.remove(w, "a@x.example")) is False
    # only that tenant's entry goes
    assert store.suppressed("a@x.example", "t") is not None
    assert store.write_one(lambda w: suppression.remove(w, "X.EXAMPLE")) is True
    assert store.suppressed("b@x.example") is None
    assert store.suppression_count() == 1


@pytest.mark.parametrize(("value", "problem"), [
    ("", "empty value"), ("@x.example", "empty local part"), ("a@", "empty domain"),
    ("a@b c", "not a domain"), ("a\x01@x", "control character"), ("a@.x", "not a domain"),
    ("x" * 400 + "@y", "longer than"), ("a b@x.example", "space in the local part"),
])
def test_bad_values_are_refused_by_name(store: QueueStore, value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        suppression.make(value, "manual")
    with pytest.raises(ValueError, match=problem):
        add(store, Suppression(value, "address", "manual"))
    assert store.suppression_count() == 0


def test_bad_kind_reason_and_tenant_are_refused(store: QueueStore) -> None:
    with pytest.raises(ValueError, match="kind 'address', but it is an domain"):
        add(store, Suppression("x.example", "address", "manual"))
    with pytest.raises(ValueError, match="reason: expected one of"):
        add(store, Suppression("x.example", "domain", "because"))
    with pytest.raises(ValueError, match="tenant:"):
        add(store, Suppression("x.example", "domain", "manual", tenant="a b"))
    # the failed op is rolled back whole, even its valid entries
    with pytest.raises(ValueError):
        add(store, entry("ok@x.example"), Suppression("bad", "address", "manual"))
    assert store.suppression_count() == 0


def test_suppressed_many(store: QueueStore) -> None:
    add(store, entry("a@x.example"), entry("y.example"), entry("t@z.example", tenant="t"))
    asked = ["A@x.example", "b@x.example", "c@Y.example", "t@z.example", "nobody"]
    got = store.suppressed_many(asked, "t")
    assert sorted(got) == ["A@x.example", "c@Y.example", "t@z.example"]
    assert got["c@Y.example"].kind == "domain"
    assert store.suppressed_many(asked).keys() == {"A@x.example", "c@Y.example"}
    assert store.suppressed_many([]) == {}


def test_list_order_filter_and_paging(store: QueueStore) -> None:
    add(store, entry("b@x.example"), entry("a@x.example"), entry("x.example"),
        entry("c@x.example", tenant="t"), entry("t.example", tenant="t"))
    everything = store.suppression_list()
    assert [(e.tenant, e.value) for e in everything] == [
        ("", "a@x.example"), ("", "b@x.example"), ("", "x.example"),
        ("t", "c@x.example"), ("t", "t.example")]
    assert [e.value for e in store.suppression_list(tenant="t")] == ["c@x.example", "t.example"]
    assert [e.value for e in store.suppression_list(tenant="")] == [
        "a@x.example", "b@x.example", "x.example"]
    assert [e.value for e in store.suppression_list(tenant="", limit=2)] == [
        "a@x.example", "b@x.example"]
    assert [e.value for e in store.suppression_list("b@x.example", tenant="")] == ["x.example"]
    assert [e.value for e in store.suppression_list("x.example", 10, None)] == [
        "c@x.example", "t.example"]
    got = store.suppression_list("c@x.example", 10, None, after_tenant="t")
    assert [e.value for e in got] == ["t.example"]
    assert store.suppression_list(tenant="nobody") == []


def test_paging_through_a_large_list_sees_each_entry_once(store: QueueStore) -> None:
    values = [f"user{i:05d}@d{i % 7}.example" for i in range(100_000)]
    for i in range(0, len(values), 10_000):
        chunk = [entry(v, reason="import") for v in values[i:i + 10_000]]
        assert add(store, *chunk) == len(chunk)
    seen: list[str] = []
    after = ""
    while page := store.suppression_list(after, 7_777, ""):
        seen.extend(e.value for e in page)
        after = page[-1].value
    assert sorted(seen) == sorted(values) and len(seen) == len(set(seen))
    assert store.suppression_count() == 100_000
    assert store.suppressed("USER99999@d4.example") is not None


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    add(s, entry("a@x.example", tenant="t"), entry("y.example"))
    s.sync()
    s.close()
    s = open_store(tmp_path)
    try:
        assert s.suppressed("a@x.example", "t") is not None
        assert s.suppressed("q@y.example", "t") is not None
        assert s.suppression_count() == 2
    finally:
        s.close()


def test_closed_store_reads_raise_storage_errors(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.close()
    with pytest.raises(StorageError):
        add(s, entry("a@x.example"))


def test_an_import_stops_at_the_high_water_mark_but_automatic_entries_still_fit(
        tmp_path: Path) -> None:
    from engine.errors import QueueFull

    s = QueueStore(str(tmp_path / "q"), map_size=4 << 20, durability="batch",
                   reserve=1 << 20)
    try:
        added = 0
        with pytest.raises(QueueFull, match="reserved"):
            for chunk in range(1000):
                batch = [entry(f"u{chunk}.{i}@x.example", reason="import") for i in range(1000)]
                added += s.write_one(lambda w, b=batch: suppression.add(w, b, headroom=False))
        assert 10_000 < added == s.suppression_count()  # the refused chunk left nothing
        # a bounce's automatic entry rides on an outcome and uses the reserve (P4)
        assert s.write_one(lambda w: suppression.add(w, [entry("late@x.example", reason="bounce")])) == 1
    finally:
        s.close()
