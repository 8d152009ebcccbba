"""Queue views of the control socket (summary, totals, list, show) on a real LMDB queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from engine.control import message_view as mv
from engine.control import queue_view as qv
from engine.queue.ids import IdAllocator, id_text
from engine.queue.layout import DUE_VALUE, key_id
from engine.queue.records import DELIVERED, PENDING, MessageRecord, Recipient
from engine.queue.store import QueueStore

NOW = 1_800_000_000.0
BODY = b"Subject: hello\r\n\tworld\r\nFrom: A <a@x.org>\r\nX-Long: one\r\n two\r\n\r\nbody\r\n"


class Q:
    """A small real queue and a way to add messages to it."""

    def __init__(self, path: Path, shards: int = 3) -> None:
        self.store = QueueStore(str(path), map_size=64 << 20, durability="batch", shards=shards)
        self.ids = IdAllocator(self.store.next_boot())

    def add(self, *rcpts: str | Recipient, sender: str = "s@x.org", age: float = 0.0,
            body: bytes = BODY) -> MessageRecord:
        rs = [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts]
        rec = MessageRecord(self.ids.next(), sender, rs, NOW - age, len(body))
        self.store.write_one(lambda w: w.put_message(rec, body))
        return rec


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Q]:
    queue = Q(tmp_path / "q")
    yield queue
    queue.store.close()


def later(address: str, seconds: float, attempts: int = 1, reply: str = "451 4.0.0 busy") -> Recipient:
    return Recipient(address, attempts=attempts, next_attempt=NOW + seconds, last_reply=reply)


def rows_by_key(reply: dict) -> dict:
    return {r["key"]: r for r in reply["rows"]}


# The views build the socket's reply Structs; the tests read them as the client does.
def summary(store: QueueStore, **kw: Any) -> dict[str, Any]:
    return msgspec.to_builtins(qv.summary(store, **kw))


def totals(store: QueueStore, now: float, suspended: dict[str, object]) -> dict[str, Any]:
    return msgspec.to_builtins(qv.totals(store, now, suspended))


def list_messages(store: QueueStore, **kw: Any) -> dict[str, Any]:
    return msgspec.to_builtins(qv.list_messages(store, **kw))


def show(store: QueueStore, msg_id: bytes, **kw: Any) -> dict[str, Any] | None:
    return msgspec.to_builtins(qv.show(store, msg_id, **kw))


# --- summary by domain ----------------------------------------------------------------
def test_bucket_edges(q: Q) -> None:
    # Bucket "m" holds ages up to m minutes inclusive; one second more is the next one.
    for minutes in qv.BUCKET_MINUTES:
        q.add("a@edge.test", age=minutes * 60)
        q.add("b@edge.test", age=minutes * 60 + 1)
    q.add("c@edge.test", age=0)
    q.add("d@edge.test", age=-30)  # arrival in the future (clock step): youngest bucket
    row = rows_by_key(summary(q.store, now=NOW, suspended={}))["edge.test"]
    assert qv.BUCKETS == ["5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert row["ages"] == [3, 2, 2, 2, 2, 2, 2, 2, 2, 1]
    assert row["total"] == 20
    assert row["oldest"] == int(NOW) - 1280 * 60 - 1


def test_ready_deferred_split_next_attempt_and_state(q: Q) -> None:
    q.add("a@mixed.test", age=60)  # never tried: due at arrival
    q.add(later("b@mixed.test", -5))  # retry already due
    q.add(later("c@mixed.test", 300))
    q.add(later("d@mixed.test", 120))
    q.add(later("e@wait.test", 600), later("f@wait.test", 900))  # one unit: earliest recipient
    q.add("g@held.test")
    reply = summary(q.store, now=NOW, suspended={"held.test": object()})
    rows = rows_by_key(reply)
    mixed = rows["mixed.test"]
    assert (mixed["total"], mixed["ready"], mixed["deferred"]) == (4, 2, 2)
    assert mixed["next_attempt"] == NOW + 120 and mixed["state"] == "active"
    wait = rows["wait.test"]
    assert (wait["total"], wait["ready"], wait["next_attempt"], wait["state"]) == (1, 0, NOW + 600, "deferred")
    assert rows["held.test"]["state"] == "suspended" and rows["held.test"]["next_attempt"] is None
    # held.test's ready unit counts as suspended only
    assert reply["totals"] == {"units": 6, "ready": 2, "deferred": 3, "suspended": 1, "domains": 3}
    assert reply["by"] == "domain" and reply["rows_total"] == 3


def test_delivered_recipients_are_not_counted(q: Q) -> None:
    q.add(Recipient("a@done.test", state=DELIVERED), "b@open.test")
    rows = rows_by_key(summary(q.store, now=NOW, suspended={}))
    assert set(rows) == {"open.test"}


def test_rows_sorted_by_total_then_name_and_cut_to_limit(q: Q) -> None:
    for domain, n in [("b.test", 2), ("a.test", 2), ("c.test", 5), ("d.test", 1)]:
        for i in range(n):
            q.add(f"u{i}@{domain}")
    reply = summary(q.store, now=NOW, suspended={}, limit=3)
    assert [(r["key"], r["total"]) for r in reply["rows"]] == [("c.test", 5), ("a.test", 2), ("b.test", 2)]
    assert reply["rows_total"] == 4 and reply["totals"]["units"] == 10


def test_empty_queue(q: Q) -> None:
    reply = summary(q.store, now=NOW, suspended={})
    assert reply["rows"] == [] and reply["totals"]["units"] == 0


def test_walk_spans_pages_and_owners(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qv, "WALK_CHUNK", 3)  # many pages, some across owner boundaries
    for i in range(40):
        q.add(f"u@d{i % 7}.test", later(f"v@e{i % 5}.test", 10 + i), age=i * 100)
    full = summary(q.store, now=NOW, suspended={})
    assert sum(r["total"] for r in full["rows"]) == 80
    e0 = rows_by_key(full)["e0.test"]
    assert e0["next_attempt"] == NOW + 10 and e0["deferred"] == 8
    assert rows_by_key(full)["d0.test"]["oldest"] == int(NOW) - 35 * 100


def test_summary_by_age(q: Q) -> None:
    q.add("a@x.test", age=10)
    q.add("b@x.test", later("c@y.test", 60), age=700)
    reply = summary(q.store, by="age", now=NOW, suspended={"y.test": 1})
    rows = rows_by_key(reply)
    assert [r["key"] for r in reply["rows"]] == qv.BUCKETS
    assert rows["5"]["total"] == 1 and rows["20"] == {"key": "20", "total": 2, "ready": 1, "deferred": 0,
                                                      "suspended": 1}
    # y.test's unit is held by its suspension: counted as suspended, not as deferred.
    assert reply["totals"] == {"units": 3, "ready": 2, "deferred": 0, "suspended": 1, "domains": 2}


def test_summary_by_sender(q: Q) -> None:
    q.add("a@x.test", sender="Big@Sender.test", age=30)
    q.add(later("b@x.test", 60), sender="big@sender.test", age=4000)
    q.add("c@x.test", sender="")
    reply = summary(q.store, by="sender", now=NOW, suspended={})
    rows = rows_by_key(reply)
    big = rows["big@sender.test"]
    assert (big["total"], big["ready"], big["deferred"], big["next_attempt"]) == (2, 1, 1, NOW + 60)
    assert big["oldest"] == int(NOW - 4000) and big["ages"][0] == 1 and big["ages"][4] == 1  # 30 s, 66.7 min
    assert rows["<>"]["total"] == 1
    assert reply["rows"][0]["key"] == "big@sender.test"
    with pytest.raises(ValueError):
        summary(q.store, by="colour", now=NOW, suspended={})


# --- totals ---------------------------------------------------------------------------------
def test_totals(q: Q) -> None:
    q.add("a@x.test", "b@y.test")
    q.add(later("c@y.test", 100))
    q.add(later("d@z.test", 100), body=b"x" * 5000)
    plain = totals(q.store, NOW, {})
    assert {k: plain[k] for k in ("messages", "units", "ready", "deferred", "suspended")} == {
        "messages": 3, "units": 4, "ready": 2, "deferred": 2, "suspended": 0}
    assert plain["bytes"] >= 5000
    held = totals(q.store, NOW, {"y.test": 1})
    # y.test's two units (one ready, one deferred) are counted once, as suspended.
    assert (held["ready"], held["deferred"], held["suspended"]) == (1, 1, 2)


# --- list -------------------------------------------------------------------------------------
def test_list_pages_see_every_message_once(q: Q) -> None:
    made = [id_text(q.add(f"u{i}@x.test").id) for i in range(23)]
    seen: list[str] = []
    after = ""
    for _ in range(10):
        page = list_messages(q.store, limit=5, after=after, suspended={})
        seen += [m["id"] for m in page["messages"]]
        after = page["next"]
        if not after:
            break
    assert seen == made  # id order, oldest first, no repeats, nothing missed


def test_list_exact_page_at_the_end_says_no_more(q: Q) -> None:
    for i in range(4):
        q.add(f"u{i}@x.test")
    page = list_messages(q.store, limit=4, suspended={})
    assert len(page["messages"]) == 4 and page["next"] == ""


def test_list_row_fields(q: Q) -> None:
    rec = q.add(Recipient("a@done.test", state=DELIVERED, attempts=1, last_reply="250 ok"),
                later("b@y.test", 50, attempts=2, reply="451 later"),
                later("c@z.test", 20, attempts=1, reply="452 full"), sender="S@x.org", age=9)
    (row,) = list_messages(q.store, suspended={})["messages"]
    assert row == {
        "id": id_text(rec.id), "sender": "S@x.org", "received_at": NOW - 9, "size": len(BODY),
        "recipients": 3, "pending": 2, "domains": ["y.test", "z.test"], "state": "deferred",
        "attempts": 2, "next_attempt": NOW + 20, "last_reply": "451 later",
    }


def test_list_filters(q: Q) -> None:
    a = q.add("u@one.test", sender="Alice@X.org")
    b = q.add(later("v@two.test", 60), sender="bob@x.org")
    c = q.add("w@ONE.test", later("x@three.test", 60), sender="")
    d = q.add(Recipient("y@one.test", state=DELIVERED), "z@four.test", sender="alice@x.org")

    def ids(**kw: object) -> list[bytes]:
        page = list_messages(q.store, suspended={"three.test": 1}, **kw)  # type: ignore[arg-type]
        return [bytes.fromhex(m["id"]) for m in page["messages"]]

    assert ids(domain="one.test") == [a.id, c.id]  # d's one.test recipient is delivered
    assert ids(domain="One.Test.") == [a.id, c.id]
    assert ids(sender="ALICE@x.org") == [a.id, d.id]
    assert ids(sender="<alice@x.org>") == [a.id, d.id]
    assert ids(sender="<>") == [c.id]
    assert ids(state="queued") == [a.id, d.id]
    assert ids(state="deferred") == [b.id]
    assert ids(state="suspended") == [c.id]
    assert ids(domain="one.test", sender="alice@x.org") == [a.id]
    assert ids(domain="nowhere.test") == []


def test_list_scan_budget_returns_next(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mv, "RECORD_CHUNK", 2)
    made = [q.add(f"u{i}@{'hit' if i % 4 == 0 else 'miss'}.test").id for i in range(20)]
    wanted = [m for i, m in enumerate(made) if i % 4 == 0]
    seen: list[bytes] = []
    after, calls = "", 0
    while True:
        page = list_messages(q.store, domain="hit.test", limit=50, after=after,
                                suspended={}, budget=3)
        calls += 1
        assert page["scanned"] <= 4  # the budget is checked after each page of 2
        seen += [bytes.fromhex(m["id"]) for m in page["messages"]]
        after = page["next"]
        if not after:
            break
    assert seen == wanted  # each selected message exactly once, in id order
    assert calls >= 5  # 20 records, at most 4 a call


def test_list_budget_stops_early(q: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mv, "RECORD_CHUNK", 4)
    for i in range(12):
        q.add(f"u{i}@miss.test")
    page = list_messages(q.store, domain="hit.test", suspended={}, budget=5)
    assert page["messages"] == [] and page["scanned"] == 8 and page["next"]
    rest = list_messages(q.store, domain="hit.test", after=page["next"], suspended={})
    assert rest["scanned"] == 4 and rest["next"] == ""


def test_list_bad_after(q: Q) -> None:
    with pytest.raises(ValueError):
        list_messages(q.store, after="xyz", suspended={})


# --- show -----------------------------------------------------------------------------------------
def test_show(q: Q) -> None:
    rec = q.add(Recipient("a@x.test", orcpt="rfc822;a@x.test", notify=("FAILURE", "DELAY")),
                Recipient("b@y.test", state=DELIVERED, attempts=1, last_reply="250 ok"))
    out = show(q.store, rec.id, suspended={})
    assert out is not None
    assert out["id"] == id_text(rec.id) and out["sender"] == "s@x.org" and out["state"] == "queued"
    assert out["recipients"][0] == {
        "address": "a@x.test", "orcpt": "rfc822;a@x.test", "notify": ["FAILURE", "DELAY"],
        "state": "pending", "attempts": 0, "next_attempt": NOW, "last_reply": "",
        "delay_warned": False}
    assert out["recipients"][1]["state"] == "delivered" and out["recipients"][1]["next_attempt"] is None
    assert out["headers"] == [["Subject", "hello\tworld"], ["From", "A <a@x.org>"], ["X-Long", "one two"]]
    assert out["pending"] == 1 and out["domains"] == ["x.test"]
    assert show(q.store, b"\0" * 8, suspended={}) is None


def test_parse_headers_edges() -> None:
    assert mv.parse_headers(b"\r\nbody") == []
    assert mv.parse_headers(b"A: 1\nB:2\n  more\n\nC: body") == [["A", "1"], ["B", "2  more"]]
    assert mv.parse_headers(b" stray\r\nnot a field\r\nX: \xff\r\n\r\n") == [["X", "\ufffd"]]
    big = b"A: " + b"x" * 100 + b"\r\nB: " + b"y" * 100
    assert mv.parse_headers(big, cap=60) == [["A", "x" * 57]]
    assert mv.parse_headers(b"Only: headers") == [["Only", "headers"]]


# --- store layout -----------------------------------------------------------------------------
def test_format_1_store_gets_arrival_values_on_open(tmp_path: Path) -> None:
    queue = Q(tmp_path / "q")
    recs = [queue.add(f"u@d{i}.test", age=100 * i) for i in range(5)]
    store = queue.store
    keys = store.scan_due_keys(b"", 100)

    def downgrade(w: object) -> None:  # what a format-1 engine left: empty due values
        txn = w.txn  # type: ignore[attr-defined]
        txn.put(b"format", bytes([1]), db=store._meta)
        for k in keys:
            txn.put(k, b"", db=store._due)

    store.write_one(downgrade)
    assert set(store.scan_due(b"", 100)[1]) == {b""}
    store.close()
    reopened = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="batch", shards=3)
    try:
        values = dict(zip(*reopened.scan_due(b"", 100)))
        assert sorted(values) == sorted(keys)
        by_id = {key_id(k): v for k, v in values.items()}
        assert all(by_id[r.id] == DUE_VALUE.pack(int(r.received_at)) for r in recs)
        assert reopened.get_control(b"nothing") is None
        assert summary(reopened, now=NOW, suspended={})["totals"]["units"] == 5
    finally:
        reopened.close()


def test_partial_view_decodes_records(q: Q) -> None:
    rec = q.add(later("a@x.test", 5, reply="451 x"), sender="z@y.test")
    ((_, raw),) = q.store.scan_records(b"", 10)
    view = mv.decode_view(raw)
    assert (view.id, view.sender, view.size, view.recipients[0].last_reply) == (rec.id, "z@y.test", rec.size, "451 x")
    assert view.recipients[0].state == PENDING
