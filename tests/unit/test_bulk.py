"""Operator bulk changes (flush, delete, bounce) on a real LMDB queue."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.control import bulk
from engine.control.queue_view import list_messages
from engine.queue.ids import IdAllocator
from engine.queue.layout import key_domain, key_due, key_id
from engine.queue.records import BOUNCED, PENDING, MessageRecord, Recipient
from engine.queue.store import QueueStore

NOW = 1_900_000_000.0
BODY = b"From: s@x.org\r\nSubject: offer\r\n\r\nhello\r\n"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="fsync", shards=2)
    yield s
    s.close()


@pytest.fixture
def ids(store: QueueStore) -> IdAllocator:
    return IdAllocator(store.next_boot())


def put(store: QueueStore, ids: IdAllocator, *rcpts: str | Recipient, sender: str = "s@x.org",
        at: float = NOW - 100) -> bytes:
    rec = MessageRecord(ids.next(), sender,
                        [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts], at, len(BODY))
    store.write_one(lambda w: w.put_message(rec, BODY))
    return rec.id


def everything(store: QueueStore) -> list[MessageRecord]:
    return [r for r in store.get_many(list(store.iter_ids())) if r is not None]


def bounce(store: QueueStore, ids: IdAllocator, msg_ids: list[bytes], **kw: Any) -> int:
    return bulk.bounce_chunk(store, msg_ids, id_alloc=ids, hostname="mx.volley.test", now=NOW, **kw)


def run(store: QueueStore, action: str, **kw: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        thread: Callable[..., Any] = functools.partial(loop.run_in_executor, None)
        return await bulk.run_bulk(store, action, now=NOW, suspended={}, run_in_thread=thread, **kw)

    return asyncio.run(main())


# --- bounce ------------------------------------------------------------------------------------
def test_bounce_queues_a_failure_report_to_the_sender(store: QueueStore, ids: IdAllocator) -> None:
    mid = put(store, ids, "a@far.test", "b@far.test")
    assert bounce(store, ids, [mid], reason="spam run\r\nX-Injected: 1") == 1
    assert store.get(mid) is None
    (dsn,) = everything(store)
    assert dsn.sender == "" and [r.address for r in dsn.recipients] == ["s@x.org"]
    assert dsn.received_at == NOW
    body = store.get_body(dsn.id)
    assert body is not None
    assert b"Status: 5.0.0" in body and body.count(b"Action: failed") == 2
    assert b"Diagnostic-Code: smtp; 550 5.0.0 bounced by the operator: spam run" in body
    assert b"\r\nX-Injected: 1" not in body  # the operator's CR LF cannot start a field


def test_bounce_of_a_null_sender_message_queues_nothing(store: QueueStore, ids: IdAllocator) -> None:
    mid = put(store, ids, "a@far.test", sender="")
    never = put(store, ids, Recipient("b@far.test", notify=("NEVER",)))
    assert bounce(store, ids, [mid, never]) == 2
    assert everything(store) == []


def test_bounce_by_domain_leaves_other_domains_pending(store: QueueStore, ids: IdAllocator) -> None:
    mid = put(store, ids, "a@bad.test", "b@good.test", "c@BAD.test")
    assert bounce(store, ids, [mid], domain="bad.test") == 1
    rec = store.get(mid)
    assert rec is not None
    assert [r.state for r in rec.recipients] == [BOUNCED, PENDING, BOUNCED]
    assert rec.recipients[0].last_reply == "550 5.0.0 bounced by the operator"
    assert rec.recipients[0].attempts == 1
    (dsn,) = [r for r in everything(store) if r.id != mid]
    body = store.get_body(dsn.id) or b""
    assert b"a@bad.test" in body and b"c@BAD.test" in body and b"b@good.test" not in body
    # the due index keeps good.test only
    assert [key_domain(k) for k in store.scan_due_keys(b"", 10) if key_id(k) == mid] == [b"good.test"]
    assert bounce(store, ids, [mid], domain="bad.test") == 0  # nothing pending there any more


# --- delete and flush ---------------------------------------------------------------------------
def test_delete_whole_messages(store: QueueStore, ids: IdAllocator) -> None:
    a = put(store, ids, "a@x.test")
    b = put(store, ids, "b@y.test")
    assert bulk.delete_chunk(store, [a]) == 1
    assert [r.id for r in everything(store)] == [b]
    assert [key_id(k) for k in store.scan_due_keys(b"", 10)] == [b]


def test_delete_by_domain(store: QueueStore, ids: IdAllocator) -> None:
    mixed = put(store, ids, "a@x.test", "b@y.test")
    only = put(store, ids, "c@x.test")
    assert bulk.delete_chunk(store, [mixed, only], domain="x.test") == 2
    assert store.get(only) is None  # nothing pending left: gone
    rec = store.get(mixed)
    assert rec is not None
    assert (rec.recipients[0].state, rec.recipients[0].last_reply) == (BOUNCED, bulk.DELETED_REPLY)
    assert rec.recipients[1].state == PENDING
    assert len(everything(store)) == 1  # no report was queued


def test_flush_moves_due_to_now(store: QueueStore, ids: IdAllocator) -> None:
    mid = put(store, ids, Recipient("a@x.test", attempts=2, next_attempt=NOW + 3600),
              Recipient("b@y.test", attempts=1, next_attempt=NOW + 7200))
    assert bulk.flush_chunk(store, [mid], domain="x.test") == 1
    dues = {key_domain(k): key_due(k) for k in store.scan_due_keys(b"", 10)}
    assert dues == {b"x.test": int((NOW - 100) * 1000), b"y.test": int((NOW + 7200) * 1000)}
    assert bulk.flush_chunk(store, [mid]) == 1
    rec = store.get(mid)
    assert rec is not None and [r.next_attempt for r in rec.recipients] == [0.0, 0.0]
    assert [r.attempts for r in rec.recipients] == [2, 1]


def test_message_gone_between_select_and_change_is_skipped(store: QueueStore, ids: IdAllocator) -> None:
    made = [put(store, ids, f"u{i}@x.test") for i in range(4)]
    (chunk,) = bulk.select(store, domain="x.test", now=NOW, suspended={})
    assert chunk == made
    store.write_one(lambda w: w.delete_message(made[1]))
    assert bulk.delete_chunk(store, chunk) == 3
    assert bulk.flush_chunk(store, chunk) == 0
    assert bounce(store, ids, chunk) == 0


# --- selection ------------------------------------------------------------------------------------
def test_select_matches_list_semantics(store: QueueStore, ids: IdAllocator) -> None:
    for i in range(9):
        put(store, ids, f"u{i}@{'hit' if i % 3 else 'miss'}.test", sender="Big@x.org" if i % 2 else "")
    put(store, ids, "late@hit.test", at=NOW + 1)  # received after the request: never selected
    for kw in ({"domain": "hit.test"}, {"sender": "big@X.org"}, {"sender": "<>"},
               {"domain": "hit.test", "sender": "<>"}, {"state": "queued"}):
        listed = [bytes.fromhex(m.id) for m in
                  list_messages(store, suspended={}, limit=100, **kw).messages]
        chunks = list(bulk.select(store, now=NOW, suspended={}, chunk=2, **kw))
        assert [m for c in chunks for m in c] == [m for m in listed if store.get(m).received_at < NOW], kw
        assert all(0 < len(c) <= 2 for c in chunks)


# --- run_bulk ---------------------------------------------------------------------------------------
def test_run_bulk_counts_in_chunks(store: QueueStore, ids: IdAllocator) -> None:
    for i in range(7):
        put(store, ids, f"u{i}@x.test", "v@y.test")
    res = run(store, "delete", domain="x.test", chunk=3)
    assert (res["matched"], res["done"], res["chunks"], res["dry_run"]) == (7, 7, 3, False)
    assert res["seconds"] >= 0
    assert all([r.address for r in rec.recipients if r.state == PENDING] == ["v@y.test"]
               for rec in everything(store))
    res = run(store, "delete", all=True, chunk=3)
    assert (res["matched"], res["done"]) == (7, 7) and everything(store) == []


def test_dry_run_changes_nothing(store: QueueStore, ids: IdAllocator) -> None:
    for i in range(5):
        put(store, ids, f"u{i}@x.test")
    before = everything(store)
    for action in ("delete", "bounce", "flush"):
        res = run(store, action, all=True, dry_run=True, id_alloc=ids, hostname="mx.test")
        assert (res["matched"], res["done"], res["dry_run"]) == (5, 0, True)
    assert everything(store) == before


def test_run_bulk_bounce_all_never_bounces_its_own_reports(store: QueueStore, ids: IdAllocator) -> None:
    for i in range(4):
        put(store, ids, f"u{i}@x.test")
    res = run(store, "bounce", all=True, id_alloc=ids, hostname="mx.test", chunk=2)
    assert (res["matched"], res["done"]) == (4, 4)
    reports = everything(store)
    assert len(reports) == 4 and all(r.sender == "" for r in reports)


def test_run_bulk_one_id(store: QueueStore, ids: IdAllocator) -> None:
    mid = put(store, ids, Recipient("a@x.test", next_attempt=NOW + 60))
    assert run(store, "flush", id=mid)["done"] == 1
    assert run(store, "delete", id=b"\1" * 8)["matched"] == 0
    assert run(store, "delete", id=mid)["done"] == 1 and store.get(mid) is None


def test_run_bulk_refuses_bad_requests(store: QueueStore) -> None:
    with pytest.raises(ValueError, match="unknown bulk action"):
        run(store, "shred", all=True)
    with pytest.raises(ValueError, match="give an id, a filter, or all"):
        run(store, "delete")
    with pytest.raises(ValueError, match="id_alloc"):
        run(store, "bounce", all=True)
