"""Operator changes to many queued messages: flush, delete, bounce, in chunks.

A filter (one id, or domain/sender/state/all with the semantics of `volley ctl list`)
selects messages in short read transactions (`select`); each chunk of ids is then
changed in ONE write transaction (`flush_chunk`, `delete_chunk`, `bounce_chunk`), so
the LMDB write lock (one per environment) is held for a few milliseconds at a time
and the workers' commits interleave with the operator's. Every op re-reads its
record inside the write transaction and passes over a message that is gone or has
nothing left to change: the queue moves on between selection and change.

`run_bulk` drives the chunks from the supervisor's event loop, one thread call per
chunk, so the loop keeps serving between them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from itertools import compress, repeat
from operator import eq, itemgetter
from typing import Any

import msgspec

from engine.control.message_view import Selector, domain_key, record_pages
from engine.delivery.bounce import bounce_recipients
from engine.errors import StorageError
from engine.queue.ids import IdAllocator
from engine.queue.layout import DUE_FIXED, DUE_HEAD, key_domain
from engine.queue.records import BOUNCED, PENDING, MessageRecord, domain_of
from engine.queue.store import QueueStore
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply

CHUNK = 100  # messages per write transaction (~5-10 ms of write lock under fsync)
# Share of wall time a bulk change may hold the queue's one write lock: after each
# chunk it rests as long as the chunk took. Measured (bench/control_live.py, 1M queued,
# 20 sessions): back-to-back 500-message chunks cut intake 1,842 → 448 msgs/s.
DUTY = 0.5
ACTIONS = ("flush", "delete", "bounce")
DELETED_REPLY = "deleted by the operator"

# One chunk: (ids matched, messages changed), or None when the selection is exhausted.
Step = Callable[[], tuple[int, int] | None]

_ID = itemgetter(slice(DUE_HEAD.size, DUE_FIXED))


def _domain_ids(store: QueueStore, domain: str) -> list[bytes]:
    """Ids with a PENDING recipient in `domain`, from the due index (keys only, in
    pages), sorted. One key per (message, domain): no duplicates. Every worker owns a
    share of a domain's units (layout.owner_of), so every owner's range is read."""
    target = domain.encode("utf-8", "surrogatepass")
    ids: list[bytes] = []
    start = b""
    while True:
        keys = store.scan_due_keys(start, 8192)
        ids += compress(map(_ID, keys), map(eq, map(key_domain, keys), repeat(target)))
        if len(keys) < 8192:
            break
        start = keys[-1] + b"\0"
    ids.sort()
    return ids


def select(store: QueueStore, *, domain: str = "", sender: str = "", state: str | None = None,
           now: float, suspended: Mapping[str, object], chunk: int = CHUNK) -> Iterator[list[bytes]]:
    """Yield the ids of the messages the filter selects, in chunks of up to `chunk`.

    Only messages received before `now` are selected: the reports a bounce queues
    (received at `now`) are never bounced by the same run. With a domain the due index
    gives the candidates; otherwise the records are walked in id order. Each page is
    read in its own short transaction; a message changed after its page was read is
    re-checked by the chunk action itself.
    """
    domain = domain_key(domain)
    sel = Selector(domain=domain, sender=sender, state=state, suspended=suspended, before=now)

    def found() -> Iterator[list[bytes]]:  # the matches of each page read
        if domain:
            ids = _domain_ids(store, domain)
            for i in range(0, len(ids), chunk):
                part = ids[i:i + chunk]
                yield [mid for mid, rec in zip(part, store.get_many(part))
                       if rec is not None and sel.match(rec) is not None]
        else:
            for page in record_pages(store):
                yield [mid for mid, raw in page if sel.match_raw(raw) is not None]

    out: list[bytes] = []
    for matches in found():
        out += matches
        while len(out) >= chunk:
            yield out[:chunk]
            out = out[chunk:]
    if out:
        yield out


def _one(store: QueueStore, msg_id: bytes) -> Iterator[list[bytes]]:
    """The chunk of a single-id request: [id] when it is queued (read in the thread)."""
    if store.get(msg_id) is not None:
        yield [msg_id]


def _copy(rec: MessageRecord) -> MessageRecord:
    return msgspec.structs.replace(rec, recipients=[msgspec.structs.replace(r) for r in rec.recipients])


def _mine(rec: MessageRecord, domain: str) -> list[int]:
    """Indexes of the PENDING recipients (of `domain`, when given)."""
    return [i for i, r in enumerate(rec.recipients)
            if r.state == PENDING and (not domain or domain_of(r.address) == domain)]


def _commit(store: QueueStore, ops: list[Callable[[WriteTxn], object]]) -> int:
    """One write transaction for the chunk; the number of messages changed."""
    if not ops:
        return 0
    results = store.write(ops)
    if store.durability == "fsync":
        store.sync()  # the operator's change is on disk when the reply says so (P1)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:  # the other ops are committed; say what went wrong with the rest
        raise StorageError(f"{len(failed)} of {len(ops)} changes failed: {failed[0]!r}")
    return sum(r for r in results if isinstance(r, int))


def _each_pending(store: QueueStore, ids: list[bytes], domain: str,
                  change: Callable[[WriteTxn, MessageRecord, list[int]], None]) -> int:
    """One op per message in one write txn: the record is read again inside it, and a
    message that is gone or has no pending recipient (of `domain`) is passed over;
    otherwise `change(w, record, indexes of those recipients)`. Returns how many
    messages were changed."""

    def op_for(mid: bytes) -> Callable[[WriteTxn], int]:
        def op(w: WriteTxn) -> int:
            current = w.get(mid)
            if current is None:
                return 0
            idx = _mine(current, domain)
            if not idx:
                return 0
            change(w, current, idx)
            return 1

        return op

    return _commit(store, [op_for(mid) for mid in ids])


def flush_chunk(store: QueueStore, ids: list[bytes], domain: str = "") -> int:
    """Make the pending recipients (of `domain`, if given) due at once: next_attempt
    0.0, so their due entries move to the arrival time (in the past, i.e. now).
    Returns how many messages had such recipients."""

    def change(w: WriteTxn, current: MessageRecord, idx: list[int]) -> None:
        new = _copy(current)
        for i in idx:
            new.recipients[i].next_attempt = 0.0
        if new != current:
            w.update_message(new, stored=current)

    return _each_pending(store, ids, domain, change)


def delete_chunk(store: QueueStore, ids: list[bytes], domain: str = "") -> int:
    """Without a domain, delete each message. With one, its pending recipients in that
    domain become BOUNCED ("deleted by the operator", no report) and the message is
    deleted when nothing is pending any more. Returns how many messages changed."""
    if not domain:
        def op_for(mid: bytes) -> Callable[[WriteTxn], int]:
            return lambda w: int(w.delete_message(mid))

        return _commit(store, [op_for(mid) for mid in ids])

    def change(w: WriteTxn, current: MessageRecord, idx: list[int]) -> None:
        new = _copy(current)
        for i in idx:
            new.recipients[i].state = BOUNCED
            new.recipients[i].last_reply = DELETED_REPLY
        if any(r.state == PENDING for r in new.recipients):
            w.update_message(new, stored=current)
        else:
            w.delete_message(current.id, stored=current)

    return _each_pending(store, ids, domain, change)


def bounce_reply(reason: str = "") -> Reply:
    """550 5.0.0 (RFC 3463 §3.1 "Other undefined status"): no code says "an operator
    decided"; the text does. Control characters in the reason become spaces."""
    text = "bounced by the operator"
    reason = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in reason).strip()
    return Reply(550, "5.0.0", f"{text}: {reason}" if reason else text)


def bounce_chunk(store: QueueStore, ids: list[bytes], *, domain: str = "", reason: str = "",
                 id_alloc: IdAllocator, hostname: str, now: float,
                 reports: list[int] | None = None) -> int:
    """Bounce the pending recipients (of `domain`, or all) with `bounce_reply`, through
    the delivery side's own bounce path (`bounce.bounce_recipients`: BOUNCED, a failure
    report to the sender, the message deleted when nothing is pending) in the chunk's
    write transaction. Returns how many messages had recipients bounced; `reports[0]`
    grows by the failure reports the committed chunk queued."""
    reply = bounce_reply(reason)
    # Bodies never change once queued, so they are read outside the write txn; report
    # ids are taken outside the ops too, because an op may be run twice.
    bodies = dict(zip(ids, store.get_bodies(ids)))
    report_ids = {mid: (id_alloc.next(), id_alloc.next(), id_alloc.next()) for mid in ids}

    queued: dict[bytes, int] = {}  # by message: an op run again (isolation) overwrites

    def change(w: WriteTxn, current: MessageRecord, idx: list[int]) -> None:
        _, queued[current.id] = bounce_recipients(
            w, current, idx, reply, bodies[current.id] or b"",
            report_ids=report_ids[current.id], reporting_mta=hostname, now=now)

    done = _each_pending(store, ids, domain, change)  # raises when the chunk did not commit
    if reports is not None:
        reports[0] += sum(queued.values())
    return done


def _chunk_action(store: QueueStore, action: str, *, domain: str, reason: str,
                  id_alloc: IdAllocator | None, hostname: str,
                  now: float, reports: list[int]) -> Callable[[list[bytes]], int]:
    """The change `action` makes to one chunk of ids (it returns how many changed)."""
    if action == "flush":
        return lambda ids: flush_chunk(store, ids, domain)
    if action == "delete":
        return lambda ids: delete_chunk(store, ids, domain)
    assert id_alloc is not None
    return lambda ids: bounce_chunk(store, ids, domain=domain, reason=reason, id_alloc=id_alloc,
                                    hostname=hostname, now=now, reports=reports)


async def run_bulk(store: QueueStore, action: str, *, now: float,
                   suspended: Mapping[str, object],
                   run_in_thread: Callable[[Step], Awaitable[tuple[int, int] | None]],
                   id: bytes | None = None, domain: str = "", sender: str = "",
                   state: str | None = None, all: bool = False, dry_run: bool = False,
                   reason: str = "", id_alloc: IdAllocator | None = None, hostname: str = "",
                   chunk: int = CHUNK, duty: float = DUTY) -> dict[str, Any]:
    """Select and change messages chunk by chunk: {"matched", "done", "dry_run",
    "chunks", "seconds", "reports"} (reports: the failure reports a bounce queued).
    Each chunk (selection and write) is one `run_in_thread(fn)`
    call, so the event loop runs between chunks. `dry_run` only counts the matches.
    A chunk that wrote is followed by a rest so the writes hold the LMDB write lock for
    at most `duty` of the time: reception and delivery commit in between (1 = no rest).

    `id` selects one message (its pending recipients, of `domain` if given, for
    flush); otherwise the filter, which must not be empty unless `all`.

    Raises:
        ValueError: unknown action, an empty filter without `all`, or a bounce
            without `id_alloc`/`hostname`.
        StorageError: the store failed (chunks already done stay done).
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown bulk action {action!r}; expected one of {ACTIONS}")
    if action == "bounce" and (id_alloc is None or not hostname):
        raise ValueError("bounce needs id_alloc and hostname (the reports' ids and Reporting-MTA)")
    domain = domain_key(domain)
    if id is None and not (domain or sender.strip() or state or all):
        raise ValueError(f"{action}: give an id, a filter, or all")
    started = time.monotonic()
    if id is not None:
        chunks = _one(store, id)
    else:
        chunks = select(store, domain=domain, sender=sender, state=state, now=now,
                        suspended=suspended, chunk=chunk)

    reports = [0]
    change = _chunk_action(store, action, domain=domain, reason=reason, id_alloc=id_alloc,
                           hostname=hostname, now=now, reports=reports)

    def step() -> tuple[int, int] | None:
        ids = next(chunks, None)
        if ids is None:
            return None
        return len(ids), 0 if dry_run else change(ids)

    matched = done = n_chunks = 0
    while True:
        began = time.monotonic()
        res = await run_in_thread(step)
        if res is None:
            break
        matched += res[0]
        done += res[1]
        n_chunks += 1
        if res[1] and duty < 1.0:
            await asyncio.sleep((time.monotonic() - began) * (1.0 - duty) / duty)
    return {"matched": matched, "done": done, "dry_run": dry_run, "chunks": n_chunks,
            "seconds": round(time.monotonic() - started, 3), "reports": reports[0]}
