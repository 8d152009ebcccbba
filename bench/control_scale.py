"""Control socket at scale: the queue reads and bulk changes of `volley ctl` on a big queue.

    .venv/bin/python bench/control_scale.py                       # 1,000,000 messages, 10,000 domains
    .venv/bin/python bench/control_scale.py --messages 100000 --json

Fills a QueueStore in a temporary directory ("batch" durability, 20,000 messages per
write transaction, one recipient each), then times the functions the supervisor runs
for `volley ctl` (engine/control/queue_view.py, message_view.py, bulk.py) directly,
without the socket: list (first page, one domain), show, summary by domain and by
sender, totals, a flush of the biggest domain, and a delete of every message in
chunks, with the time each chunk held the write lock. Cheap reads are the median of
5 runs. The queue looks like a backlog: domains by a skewed (Zipf-like) share,
arrivals spread over ~a day (mean age 2 h), half never attempted, half with a retry
between 10 minutes ago and an hour ahead. Not part of `make test`; ~2-3 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engine.control import bulk, queue_view
from engine.queue.ids import IdAllocator
from engine.queue.records import MessageRecord, Recipient
from engine.queue.store import QueueStore

TARGETS = {"list first page": 0.050, "summary by domain": 1.0}
BODY = (b"From: Sender <s@sender.example>\r\nTo: <u@example.net>\r\nSubject: monthly offer\r\n"
        b"Message-ID: <x@sender.example>\r\nMIME-Version: 1.0\r\n\r\n" + b"x" * 150 + b"\r\n")


def domain_name(i: int) -> str:
    return f"d{i:05d}.example.net"


def put_all(store: QueueStore, records: Iterable[MessageRecord]) -> None:
    """Queue `records`, each with BODY, 20,000 per write transaction, then sync."""
    it = iter(records)
    while chunk := list(itertools.islice(it, 20_000)):
        store.write([lambda w, rec=rec: w.put_message(rec, BODY) for rec in chunk])
    store.sync()


def fill(store: QueueStore, messages: int, domains: int, now: float, seed: int = 1) -> float:
    """Queue `messages` one-recipient messages; returns the seconds it took."""
    rng = random.Random(seed)
    ids = IdAllocator(store.next_boot())

    def records() -> Iterator[MessageRecord]:
        for j in range(messages):
            dom = domain_name(min(domains - 1, int(domains * rng.random() ** 2)))
            attempts = 0 if rng.random() < 0.5 else rng.randint(1, 6)
            retry = 0.0 if attempts == 0 else now + rng.uniform(-600, 3600)
            rcpt = Recipient(f"user{j}@{dom}", attempts=attempts, next_attempt=retry,
                             last_reply="451 4.7.1 try again later" if attempts else "")
            yield MessageRecord(ids.next(), f"list{j % 1000}@sender{j % 50}.example", [rcpt],
                                now - rng.expovariate(1 / 7200.0), len(BODY))

    started = time.perf_counter()
    put_all(store, records())
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, list[float], Any]:
    """(median seconds, all runs, last result)."""
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def target_mark(name: str, seconds: float, targets: dict[str, float]) -> str:
    """"< target" for a timed operation that has one, with " MISS" when `seconds` is not under it."""
    target = targets.get(name)
    return "" if target is None else f"< {target:g}" + ("" if seconds < target else " MISS")


def measure_reads(store: QueueStore, runs: int) -> dict[str, dict[str, Any]]:
    now = time.time()
    out: dict[str, dict[str, Any]] = {}

    def record(name: str, fn: Callable[[], Any], n: int, detail: Callable[[Any], str]) -> Any:
        median, times, result = timed(fn, n)
        out[name] = {"seconds": median, "runs": times, "detail": detail(result)}
        return result

    record("list first page", lambda: queue_view.list_messages(store, suspended={}),
           runs, lambda r: f"{len(r.messages)} rows, {r.scanned} scanned")
    mid_domain = domain_name(100)
    record("list --domain page", lambda: queue_view.list_messages(
        store, domain=mid_domain, suspended={}), runs,
        lambda r: f"{mid_domain}: {len(r.messages)} rows, {r.scanned} scanned, "
                  f"{'more' if r.next else 'end'}")
    some_id = next(iter(store.iter_ids(chunk=1)))
    record("show", lambda: queue_view.show(store, some_id, suspended={}), runs,
           lambda r: f"{len(r.headers)} headers")
    record("summary by domain", lambda: queue_view.summary(store, now=now, suspended={}), runs,
           lambda r: f"{r.rows_total} domains, {r.totals.units} units, top {len(r.rows)}")
    record("summary by domain, limit 10000", lambda: queue_view.summary(
        store, now=now, suspended={}, limit=10_000), max(1, runs // 2),
        lambda r: f"{len(r.rows)} rows")
    record("summary by age", lambda: queue_view.summary(store, by="age", now=now, suspended={}),
           max(1, runs // 2), lambda r: f"{r.totals.units} units")
    record("summary by sender", lambda: queue_view.summary(store, by="sender", now=now, suspended={}),
           1, lambda r: f"{r.rows_total} senders (decodes every record)")
    record("totals", lambda: queue_view.totals(store, now, {}), runs,
           lambda r: f"{r.messages} messages, {r.ready} ready")
    record("totals, one suspension", lambda: queue_view.totals(store, now, {domain_name(0): 1}),
           runs, lambda r: f"{r.suspended} suspended units")
    return out


def measure_flush(store: QueueStore, domain: str) -> dict[str, Any]:
    now = time.time()
    t0 = time.perf_counter()
    writes, done = [], 0
    for ids in bulk.select(store, domain=domain, now=now, suspended={}):
        w0 = time.perf_counter()
        done += bulk.flush_chunk(store, ids, domain)
        writes.append(time.perf_counter() - w0)
    return {"seconds": time.perf_counter() - t0, "detail": f"{domain}: {done} messages",
            "chunks": len(writes), "write_p50": pct(writes, 0.5), "write_max": max(writes, default=0.0)}


def measure_delete_all(store: QueueStore) -> dict[str, Any]:
    now = time.time()
    t0 = time.perf_counter()
    writes, select_time, done = [], 0.0, 0
    # `select` with no filter walks every record in id order: the path of `delete --all`.
    chunks = bulk.select(store, now=now, suspended={})
    while True:
        s0 = time.perf_counter()
        ids = next(chunks, None)
        select_time += time.perf_counter() - s0
        if ids is None:
            break
        w0 = time.perf_counter()
        done += bulk.delete_chunk(store, ids)
        writes.append(time.perf_counter() - w0)
    total = time.perf_counter() - t0
    return {"seconds": total, "detail": f"{done} messages in {len(writes)} chunks of {bulk.CHUNK}",
            "select_seconds": select_time, "chunks": len(writes), "write_p50": pct(writes, 0.5),
            "write_p99": pct(writes, 0.99), "write_max": max(writes, default=0.0),
            "left": store.count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--domains", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5, help="runs of each cheap read (median)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    # Page-cache friendly: the whole queue fits in memory, as on a real relay's host.
    with tempfile.TemporaryDirectory(prefix="volley-ctl-bench-") as tmp:
        store = QueueStore(tmp, map_size=max(1 << 30, args.messages * 4096), durability="batch")
        try:
            fill_s = fill(store, args.messages, args.domains, time.time())
            results = measure_reads(store, args.runs)
            results["flush one domain"] = measure_flush(store, domain_name(0))
            results["delete all"] = measure_delete_all(store)
        finally:
            store.close()
    report = {"messages": args.messages, "domains": args.domains, "fill_seconds": round(fill_s, 2),
              "python": platform.python_version(), "machine": platform.machine(),
              "targets": TARGETS, "results": results}
    if args.json:
        json.dump(report, sys.stdout, indent=1, default=float)
        print()
    else:
        print_table(report)
    missed = [k for k, limit in TARGETS.items() if results[k]["seconds"] >= limit]
    return 1 if missed else 0


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['messages']:,} messages over {report['domains']:,} domains "
          f"(filled in {report['fill_seconds']} s)\n")
    print(f"{'operation':34} {'seconds':>9}  {'target':>7}  detail")
    for name, r in report["results"].items():
        print(f"{name:34} {r['seconds']:9.3f}  {target_mark(name, r['seconds'], TARGETS):>7}  {r['detail']}")
    d = report["results"]["delete all"]
    print(f"\ndelete all: write lock held per chunk p50 {d['write_p50'] * 1000:.1f} ms, "
          f"p99 {d['write_p99'] * 1000:.1f} ms, max {d['write_max'] * 1000:.1f} ms; "
          f"selection {d['select_seconds']:.1f} s of {d['seconds']:.1f} s; {d['left']} left")


if __name__ == "__main__":
    raise SystemExit(main())
