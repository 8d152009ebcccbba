"""`volley ctl top`: the data model, pure: two snapshots in, the screen's lines out.

A `Snapshot` is what the client read in one refresh: the `status` reply (workers, their
pushed pool rows, suspensions, backoffs), the `queue` reply by domain, the server's
counters (from `metrics`) and each worker's CPU seconds (/proc/PID/stat). Rates are the
difference of two snapshots over the time between them, computed here on the client:
the server keeps no per-destination rate. Drawing (curses, or plain lines when stdout is
not a terminal) is engine/control/top_screen.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# Server counters the header shows as rates (volley_<name>_total, summed over workers).
COUNTERS = ("messages_received", "messages_delivered", "messages_deferred", "messages_bounced")


@dataclass
class Snapshot:
    at: float  # time.monotonic() when it was read
    status: dict[str, Any]
    queue: dict[str, Any]
    counters: dict[str, float] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)  # worker slot -> CPU seconds used


@dataclass
class Row:
    """One destination: a recipient domain (or an MX site that serves several)."""

    name: str
    queued: int = 0  # delivery units in the queue
    deferred: int = 0  # of them not ready: waiting for a retry, or held by a suspension
    jobs: int = 0  # handed to the workers' pools, waiting for or in a session
    open: int = 0  # outbound connections now, all workers
    cap: int | None = None  # the pools' connection limit (summed over workers)
    sent: int = 0  # transactions answered 2xx since the pools started
    sent_rate: float = 0.0  # per second between the two snapshots
    deferred_rate: float = 0.0  # growth of `deferred` per second (0 when it shrinks)
    state: str = ""  # "suspended ..." / "backoff ..." / the last reply that held it


def parse_counters(text: str) -> dict[str, float]:
    """The unlabelled `volley_<name>_total` samples of a Prometheus exposition."""
    wanted = {f"volley_{name}_total": name for name in COUNTERS}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            try:
                out[wanted[name]] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return out


def parse_cpu(stat: str, ticks: float) -> float:
    """CPU seconds (user + system) from a /proc/PID/stat line (proc(5): fields 14, 15)."""
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def _rate(now: float, before: float | None, seconds: float) -> float:
    if before is None or seconds <= 0 or now < before:  # a restart resets a counter
        return 0.0
    return (now - before) / seconds


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


def _pool_key(pool: dict[str, Any]) -> str:
    """A pool's destination: its domain when it serves one, else its MX site."""
    domains = pool.get("domains") or []
    if pool.get("domain"):
        return str(pool["domain"])
    return str(domains[0]) if len(domains) == 1 else str(pool.get("site") or "?")


def _held(by: Any, reason: Any) -> str:
    """A suspension: automatic ("backoff", after the site's replies) or an operator's."""
    return f"backoff: {reason or '?'}" if by == "backoff" else f"suspended: {reason or by or '?'}"


def _rows(snap: Snapshot) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for q in snap.queue.get("rows") or []:
        row = rows.setdefault(str(q.get("key")), Row(str(q.get("key"))))
        row.queued = _int(q.get("total"))
        row.deferred = _int(q.get("deferred")) + _int(q.get("suspended"))
        if q.get("state") == "suspended":
            row.state = _held(q.get("by_who"), q.get("reason"))
    for pool in snap.status.get("pools") or []:
        row = rows.setdefault(_pool_key(pool), Row(_pool_key(pool)))
        row.jobs += _int(pool.get("queued"))
        row.open += _int(pool.get("open"))
        row.sent += _int(pool.get("sent"))
        cap = pool.get("limit") or pool.get("max_connections")
        if isinstance(cap, int) and cap > 0:
            row.cap = (row.cap or 0) + cap
        if pool.get("backoff_until") and not row.state:
            row.state = f"backoff: {pool.get('backoff_reply') or '?'}"
    for b in snap.status.get("backoffs") or []:
        for domain in b.get("domains") or []:
            if domain in rows and not rows[domain].state:
                rows[domain].state = f"backoff: {b.get('reply') or '?'}"
    for s in snap.status.get("suspensions") or []:
        row = rows.setdefault(str(s.get("domain")), Row(str(s.get("domain"))))
        row.state = _held(s.get("by"), s.get("reason"))
    return rows


def destinations(prev: Snapshot | None, cur: Snapshot) -> list[Row]:
    """The destinations of `cur`, busiest first, with rates against `prev`.

    Busiest: delivering the most per second, then the most connections open, then the
    most queued; the name breaks ties so the order holds still between refreshes."""
    rows = _rows(cur)
    if prev is not None:
        seconds = cur.at - prev.at
        before = _rows(prev)
        for name, row in rows.items():
            # New since the last refresh: its pools and queue rows started from nothing.
            old = before.get(name) or Row(name)
            row.sent_rate = _rate(row.sent, old.sent, seconds)
            row.deferred_rate = _rate(row.deferred, old.deferred, seconds)
    return sorted(rows.values(), key=lambda r: (-r.sent_rate, -r.open, -r.queued, r.name))


def _fit(text: str, width: int) -> str:
    """Cut to `width` columns, marking the cut with "~"."""
    return text if len(text) <= width else text[: width - 1] + "~"


def _clock(seconds: Any) -> str:
    s = _int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02d}h" if s >= 86400 else \
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def header(prev: Snapshot | None, cur: Snapshot, wall: float | None = None) -> list[str]:
    """The summary lines: server, rates, connections, queue, worker CPU."""
    st = cur.status
    seconds = cur.at - prev.at if prev else 0.0

    def per_s(name: str) -> str:
        r = _rate(cur.counters.get(name, 0.0), prev.counters.get(name) if prev else None, seconds)
        return f"{r:.1f}/s" if prev else "-/s"

    workers = st.get("workers") or []
    out_open = sum(_int(w.get("sessions_out")) for w in workers)
    limits = [w.get("out_limit") for w in workers]
    out_cap = str(sum(_int(x) for x in limits)) if limits and None not in limits else "-"
    q = st.get("queue") or {}
    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) if wall is not None else ""
    cpu = []
    for w in workers:
        slot = _int(w.get("slot"))
        used = cur.cpu.get(slot)
        was = prev.cpu.get(slot) if prev else None
        cpu.append(f"w{slot} {_rate(used, was, seconds) * 100:.0f}%" if used is not None
                   and was is not None else f"w{slot} -")
    return [
        f"volley top  {st.get('hostname', '')}  up {_clock(st.get('uptime'))}  "
        f"{len(workers)} workers{'  DRAINING' if st.get('draining') else ''}  {stamp}",
        f"in {per_s('messages_received')}  out {per_s('messages_delivered')}  "
        f"deferred {per_s('messages_deferred')}  bounced {per_s('messages_bounced')}",
        f"queue {_int(q.get('messages'))} msgs {_int(q.get('units'))} units "
        f"({_int(q.get('deferred'))} deferred, {_int(q.get('suspended'))} held)",
        f"conns in {sum(_int(w.get('sessions_in')) for w in workers)} out {out_open}/{out_cap}"
        "  cpu " + "  ".join(cpu),
    ]


# The table: (title, width, right-aligned). The last column takes what is left.
COLUMNS = (("DESTINATION", 18, False), ("QUEUED", 6, True), ("DEFER", 5, True),
           ("JOBS", 4, True), ("CONN", 7, True), ("SENT", 7, True), ("SENT/s", 6, True),
           ("DEF/s", 5, True), ("STATE/REPLY", 0, False))


def _cells(row: Row) -> list[str]:
    conn = f"{row.open}/{row.cap}" if row.cap else str(row.open)
    return [row.name, str(row.queued), str(row.deferred), str(row.jobs), conn, str(row.sent),
            f"{row.sent_rate:.1f}", f"{row.deferred_rate:.1f}", row.state or "-"]


def _line(cells: list[str], width: int) -> str:
    parts = []
    for (_, w, right), text in zip(COLUMNS, cells, strict=True):
        if not w:
            parts.append(text)
        else:
            text = _fit(text, w)
            parts.append(text.rjust(w) if right else text.ljust(w))
    return _fit(" ".join(parts), width)


def screen(prev: Snapshot | None, cur: Snapshot, width: int = 80, height: int = 24,
           wall: float | None = None) -> list[str]:
    """The whole screen: every line at most `width` columns, at most `height` lines."""
    lines = [_fit(text, width) for text in header(prev, cur, wall)]
    lines.append("")
    lines.append(_line([title for title, _, _ in COLUMNS], width))
    rows = destinations(prev, cur)
    room = max(height - len(lines), 0)
    if len(rows) > room and room:
        shown = rows[: room - 1]
        lines += [_line(_cells(r), width) for r in shown]
        lines.append(_fit(f"... {len(rows) - len(shown)} more destinations", width))
    else:
        lines += [_line(_cells(r), width) for r in rows[:room]]
    return lines[:height]
