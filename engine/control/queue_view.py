"""Read-only views of the queue for the control socket: a qshape-like summary and
totals (this module), message lists and one message in full (`message_view`,
re-exported here so the server reads the queue through one module).

Called in a worker thread of the supervisor (loop.run_in_executor) on its own
QueueStore handle of the environment the workers write to. Every walk is a series of
short read transactions of at most WALK_CHUNK entries, because a long reader pins
old pages and grows the file (finding 7); a walk is therefore not one snapshot, its
counts may mix states a few milliseconds apart.

The summary by domain reads only the due index (key: owner | lane | due | id | domain,
value: arrival second) and never decodes a record: its 1,000,000 entries are grouped by
domain with map() over key slices and bytearray.extend, C code all the way, in about
half a second on 2 cores (bench/control_scale.py). By sender it must decode every
record (see `summary`).
"""

from __future__ import annotations

import array
import math
import sys
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import msgspec

from engine.control.message_view import list_messages, record_pages, show
from engine.control.replies import AgeRow, Queue, QueueCounts, ShapeRow, ShapeTotals
from engine.queue.layout import DUE_VALUE, key_domain, key_due, key_run, next_run
from engine.queue.records import PENDING, RECORD_VERSION, domain_of
from engine.queue.store import QueueStore

__all__ = ["BUCKETS", "BUCKET_MINUTES", "list_messages", "show", "summary", "totals"]

# Postfix qshape's buckets: minutes since arrival. Bucket "5" holds ages 0..5 min
# (inclusive), "10" ages over 5 up to 10 min, ..., "1280+" everything older.
BUCKET_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
BUCKETS = [*map(str, BUCKET_MINUTES), "1280+"]
WALK_CHUNK = 8192  # due entries per read transaction (~5 ms)

_NB = len(BUCKETS)
_EXTEND = bytearray.extend
assert array.array("I").itemsize == DUE_VALUE.size  # _unpack reads arrivals as array("I")


# --- due-index walks ----------------------------------------------------------------------
def _due_pages(store: QueueStore) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """(keys, values) pages of the whole due index, one short read txn each."""
    start = b""
    while True:
        keys, vals = store.scan_due(start, WALK_CHUNK)
        if not keys:
            return
        yield keys, vals
        start = keys[-1] + b"\0"  # the smallest key after the last one


def _owner_runs(keys: list[bytes], now_ms: int) -> Iterator[tuple[int, int, int]]:
    """(lo, cut, hi) per run (owner and priority lane) in sorted due keys: keys[lo:hi]
    are one run's, sorted by due, and keys[lo:cut] are due by `now_ms` (ready)."""
    lo, n = 0, len(keys)
    while lo < n:
        run = key_run(keys[lo])
        hi = bisect_left(keys, next_run(run), lo)
        yield lo, bisect_left(keys, run + (now_ms + 1).to_bytes(8, "big"), lo, hi), hi
        lo = hi


def _edges(now: float) -> list[int]:
    """Ascending arrival seconds splitting the buckets, oldest first: an arrival at or
    after ceil(now - m*60) is at most m minutes old."""
    return [min(0xFFFFFFFF, max(0, math.ceil(now - m * 60))) for m in reversed(BUCKET_MINUTES)]


def _rank_of(now: float) -> Callable[[bytes], int]:
    """Arrival value (u32 BE) → rank: 0 for the oldest bucket ("1280+") up to 9 for the
    youngest ("5"); the bucket index is 9 - rank."""
    edges = [DUE_VALUE.pack(e) for e in _edges(now)]
    return partial(bisect_right, edges)  # byte order of u32 BE = numeric order


def _group(groups: defaultdict[bytes, bytearray], doms: list[bytes], vals: list[bytes]) -> None:
    """Append each value to its domain's bytearray: three C calls per entry, no bytecode
    (a Python loop doing the same costs twice as much)."""
    deque(map(_EXTEND, map(groups.__getitem__, doms), vals), maxlen=0)


def _unpack(arrivals: bytes) -> list[int]:
    """Packed u32 BE arrival values, as sorted ints."""
    values = array.array("I", arrivals)
    if sys.byteorder == "little":
        values.byteswap()
    return sorted(values)


def _shape(ordered: list[int], edges: list[int]) -> tuple[list[int], int]:
    """(counts per bucket youngest first, oldest arrival) of sorted arrival seconds."""
    cuts = [0, *(bisect_left(ordered, e) for e in edges), len(ordered)]
    return [cuts[r + 1] - cuts[r] for r in reversed(range(_NB))], ordered[0]


class _DomainWalk:
    """Groups due entries by domain without decoding records.

    Per domain it keeps the arrival values of its ready and of its deferred units (4
    bytes each, so 1,000,000 units take 4 MB) and the key of its earliest deferred
    unit; bucket counts and the oldest arrival are computed afterwards, only for the
    rows shown. Each step is one pass of C code over a page."""

    def __init__(self, now: float) -> None:
        self.now_ms = int(now * 1000)
        self.ready: defaultdict[bytes, bytearray] = defaultdict(bytearray)
        self.waiting: defaultdict[bytes, bytearray] = defaultdict(bytearray)
        # domain → its earliest deferred key, per run (owner and priority lane: a
        # domain's keys run by due within each; the earliest is the least of the firsts)
        self.first_deferred: defaultdict[bytes, dict[bytes, bytes]] = defaultdict(dict)

    def feed(self, keys: list[bytes], vals: list[bytes]) -> None:
        doms = list(map(key_domain, keys))
        for lo, cut, hi in _owner_runs(keys, self.now_ms):
            _group(self.ready, doms[lo:cut], vals[lo:cut])
            if cut == hi:
                continue
            _group(self.waiting, doms[cut:hi], vals[cut:hi])
            # Keys run by due within a run (owner and lane), so the first deferred key
            # seen of a domain in a run is its earliest there (setdefault keeps the
            # first); a domain has units in every owner's runs (layout.owner_of).
            firsts = self.first_deferred[key_run(keys[lo])]
            deque(map(firsts.setdefault, doms[cut:hi], keys[cut:hi]), maxlen=0)

    def counts(self) -> dict[bytes, tuple[int, int]]:
        """domain → (units, ready units)."""
        ready, waiting = self.ready, self.waiting
        return {d: ((len(ready.get(d, b"")) + len(waiting.get(d, b""))) // 4, len(ready.get(d, b"")) // 4)
                for d in ready.keys() | waiting.keys()}

    def next_attempt(self, dom: bytes) -> float | None:
        """The earliest due time (epoch s) of the domain's deferred units, or None."""
        dues = [key_due(firsts[dom]) for firsts in self.first_deferred.values() if dom in firsts]
        return min(dues) / 1000 if dues else None

    def arrivals(self, dom: bytes) -> bytes:
        return bytes(self.ready.get(dom, b"")) + bytes(self.waiting.get(dom, b""))


def _domain_summary(store: QueueStore, now: float, limit: int,
                    suspended: Mapping[str, object]) -> Queue:
    walk = _DomainWalk(now)
    for keys, vals in _due_pages(store):
        walk.feed(keys, vals)
    counts = walk.counts()
    top = sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
    edges = _edges(now)
    rows = []
    for dom, (n, ready) in top:
        name = dom.decode("utf-8", "surrogatepass")
        ages, oldest = _shape(_unpack(walk.arrivals(dom)), edges)
        held = name in suspended  # the suspension holds all of it, due or not
        rows.append(ShapeRow(
            key=name, total=n, ages=ages, oldest=oldest, next_attempt=walk.next_attempt(dom),
            ready=0 if held else ready, deferred=0 if held else n - ready, suspended=n if held else 0,
            state="suspended" if held else "active" if ready else "deferred",
        ))
    units = sum(n for n, _ in counts.values())
    held_units = _held({d: n for d, (n, _) in counts.items()}, suspended)
    ready_all = sum(r for _, r in counts.values()) - _held({d: r for d, (_, r) in counts.items()}, suspended)
    return Queue(by="domain", buckets=BUCKETS, rows=rows, rows_total=len(counts),
                 totals=ShapeTotals(units=units, ready=ready_all,
                                    deferred=units - ready_all - held_units,
                                    suspended=held_units, domains=len(counts)))


def _held(units: Mapping[bytes, int], suspended: Mapping[str, object]) -> int:
    """Units of the suspended domains (`units`: domain → its units)."""
    return sum(units.get(name.encode("utf-8", "surrogatepass"), 0) for name in suspended)


def _age_summary(store: QueueStore, now: float, suspended: Mapping[str, object]) -> Queue:
    rank, now_ms = _rank_of(now), int(now * 1000)
    counts, ready, held = [0] * _NB, [0] * _NB, [0] * _NB
    names = {d.encode("utf-8", "surrogatepass") for d in suspended}
    per_domain: Counter[bytes] = Counter()
    for keys, vals in _due_pages(store):
        ranks = bytes(map(rank, vals))
        doms = list(map(key_domain, keys))
        per_domain.update(doms)
        for lo, cut, _ in _owner_runs(keys, now_ms):
            part = ranks[lo:cut]
            for r in set(part):
                ready[r] += part.count(r)
        for r in set(ranks):
            counts[r] += ranks.count(r)
        if names:  # held units leave ready (or deferred) for suspended: a loop, rarely run
            for i, dom in enumerate(doms):
                if dom in names:
                    held[ranks[i]] += 1
                    if key_due(keys[i]) <= now_ms:
                        ready[ranks[i]] -= 1
    rows = [AgeRow(key=BUCKETS[i], total=counts[j], ready=ready[j],
                   deferred=counts[j] - ready[j] - held[j], suspended=held[j])
            for i, j in ((i, _NB - 1 - i) for i in range(_NB))]
    units, ready_all, held_all = sum(counts), sum(ready), sum(held)
    return Queue(by="age", buckets=BUCKETS, rows=rows, rows_total=_NB,
                 totals=ShapeTotals(units=units, ready=ready_all, deferred=units - ready_all - held_all,
                                    suspended=held_all, domains=len(per_domain)))


class _SenderRecipient(msgspec.Struct, array_like=True, tag_field="v", tag=RECORD_VERSION):
    # Raw: the strings not needed are skipped, not built.
    address: str
    orcpt: msgspec.Raw
    notify: msgspec.Raw
    state: int
    attempts: int
    next_attempt: float


class _SenderView(msgspec.Struct, array_like=True, tag_field="v", tag=RECORD_VERSION):
    id: msgspec.Raw
    sender: str
    recipients: list[_SenderRecipient]
    received_at: float


_decode_sender = msgspec.msgpack.Decoder(_SenderView).decode


def _units(view: _SenderView) -> dict[str, float]:
    """Domain → due time of the record's units, as the due index keys them
    (engine.queue.records.pending_domains)."""
    due: dict[str, float] = {}
    received = view.received_at
    for r in view.recipients:
        if r.state == PENDING:
            d = domain_of(r.address)
            t = r.next_attempt if r.next_attempt > received else received
            if t < due.get(d, math.inf):
                due[d] = t
    return due


class _SenderRow:
    """One sender's (message, domain) units so far."""

    __slots__ = ("arrivals", "held", "messages", "next", "ready", "units")

    def __init__(self) -> None:
        self.units = self.ready = self.held = self.messages = 0
        self.next = math.inf
        self.arrivals: list[int] = []


def _sender_summary(store: QueueStore, now: float, limit: int,
                    suspended: Mapping[str, object]) -> Queue:
    """Units like the domain view's (one per message and pending domain), so both views
    add up to the same totals; a unit of a suspended domain counts as suspended."""
    agg: dict[str, _SenderRow] = {}
    domains: set[str] = set()
    for page in record_pages(store):
        for _, raw in page:
            view = _decode_sender(raw)
            dues = _units(view)
            if not dues:
                continue
            key = view.sender.lower() or "<>"
            row = agg.get(key) or agg.setdefault(key, _SenderRow())
            row.messages += 1
            arrival = min(0xFFFFFFFF, max(0, int(view.received_at)))
            for dom, due in dues.items():
                domains.add(dom)
                row.units += 1
                row.arrivals.append(arrival)
                if dom in suspended:
                    row.held += 1
                elif due <= now:
                    row.ready += 1
                if due > now:
                    row.next = min(row.next, due)
    top = sorted(agg.items(), key=lambda kv: (-kv[1].units, kv[0]))[:limit]
    edges = _edges(now)
    rows = []
    for key, r in top:
        ages, oldest = _shape(sorted(r.arrivals), edges)
        rows.append(ShapeRow(
            key=key, total=r.units, ages=ages, oldest=oldest,
            next_attempt=None if r.next == math.inf else r.next, ready=r.ready,
            deferred=r.units - r.ready - r.held, suspended=r.held,
            state="suspended" if r.held == r.units else "active" if r.ready else "deferred"))
    units = sum(r.units for r in agg.values())
    ready_all = sum(r.ready for r in agg.values())
    held_all = sum(r.held for r in agg.values())
    return Queue(by="sender", buckets=BUCKETS, rows=rows, rows_total=len(agg),
                 totals=ShapeTotals(units=units, messages=sum(r.messages for r in agg.values()),
                                    ready=ready_all, deferred=units - ready_all - held_all,
                                    suspended=held_all, domains=len(domains)))


def summary(store: QueueStore, *, by: str = "domain", limit: int = 100, now: float,
            suspended: Mapping[str, object]) -> Queue:
    """The queue's shape, like Postfix qshape (the `queue` reply); rows sorted by total
    (descending), at most `limit`.

    by "domain" (one `ShapeRow` per recipient domain, counting (message, domain) units):
    "key", "total", "ages" (counts per bucket), "oldest" (arrival, epoch s),
    "next_attempt" (earliest due after `now`, or None), "ready" (due by now),
    "deferred", "suspended", "state" ("suspended" | "active": some ready |
    "deferred"). Reads only the due index: ~0.6 s for 1,000,000 units over 10,000
    domains on 2 cores (more with a large `limit`: ages and oldest are worked out for
    the rows shown only). "totals": units, ready, deferred, suspended, domains, with
    ready + deferred + suspended == units: a unit of a suspended domain is counted as
    suspended only (it waits for the suspension, not for its due time).

    by "age": one `AgeRow` per bucket ("key": its label, "total", "ready", "deferred").

    by "sender": rows per envelope sender (lower case, "<>" for the null sender)
    counting the same (message, domain) units as by domain, with the domain rows'
    fields; its totals equal the domain view's, plus "messages". SLOWER: it must decode
    every record (a partial decode that skips the strings it does not need): ~2.5-3 s
    per 1,000,000 messages on 2 cores (bench/control_scale.py) before it read the
    recipients' domains, which adds ~0.65 s per 1,000,000 two-recipient records (the
    decode alone: 0.41 s → 1.06 s).

    Raises:
        ValueError: unknown `by`.
        StorageError: the store failed.
    """
    if by == "domain":
        return _domain_summary(store, now, limit, suspended)
    if by == "age":
        return _age_summary(store, now, suspended)
    if by == "sender":
        return _sender_summary(store, now, limit, suspended)
    raise ValueError(f"summary by {by!r}: expected domain, age or sender")


def totals(store: QueueStore, now: float, suspended: Mapping[str, object]) -> QueueCounts:
    """The queue by state: ready + deferred + suspended == units (a unit of a suspended
    domain is counted as suspended only). Reads due keys only; without suspensions only
    the ready part of each run (owner and priority lane) of the index."""
    stats = store.stats()
    now_ms = int(now * 1000)
    held = {d.encode("utf-8", "surrogatepass") for d in suspended}
    ready = units = count_held = 0
    start = b""
    while True:
        keys = store.scan_due_keys(start, WALK_CHUNK)
        if not keys:
            break
        units += len(keys)
        for lo, cut, _ in _owner_runs(keys, now_ms):
            ready += cut - lo
            if held:
                ready -= sum(map(held.__contains__, map(key_domain, keys[lo:cut])))
        if held:
            count_held += sum(map(held.__contains__, map(key_domain, keys)))
            start = keys[-1] + b"\0"
            continue
        if key_due(keys[-1]) <= now_ms:
            start = keys[-1] + b"\0"
        else:  # the rest of this run (owner and lane) is deferred: skip to the next run
            start = next_run(key_run(keys[-1]))
    total_units = units if held else stats["units"]
    return QueueCounts(messages=stats["messages"], units=total_units, bytes=stats["body_bytes"],
                       ready=ready, deferred=max(0, total_units - ready - count_held),
                       suspended=count_held)
