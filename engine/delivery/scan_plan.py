"""Where a shard's next scan of the due index starts, and how much each lane may take.

The due index keeps one run of keys per (owner, priority lane), each in due order
(engine/queue/layout.py); `QueueStore.due_scan` reads the lanes highest priority first.
This is the scheduler's side of it:

- Budget. In-flight units are capped at `delivery.max_ready`. Lanes above the default
  priority may go `priority_room` past it, so a shard whose in-flight set is full of
  newsletter units (a throttled provider drains them slowly) still reads its priority
  lanes and dispatches a password reset at once; without it the scan would not run
  until the newsletter drained. Priority mail uses the ordinary room first.
- Per destination. One domain holds at most `destination_room` of the in-flight
  units (`delivery.max_ready_per_destination`); its further units are passed over
  (`PassOver`) and the scan reads on, so a slow or throttled destination with a deep
  backlog cannot hold the whole set (head-of-line blocking). Priority lanes are read
  apart and not held to the room (`by_kind`). A passed-over unit is
  not "seen": once the domain is down to half its room the scheduler makes the next
  scan a full one (`forget`), which finds them again.
- Resume points. A scan starts each lane near the newest due time dispatched from it
  (minus a margin for messages whose commit raced their timestamp) instead of walking
  past everything in flight again; one lane's resume point never hides another lane's
  older entries. A full scan (every lane from the start) runs every few seconds as a
  safety net, and at once when told entries moved before the resume points (`forget`).
"""

from __future__ import annotations

from engine.queue.layout import DEFAULT_LANE, PRIORITIES

# Resume scans this far before the newest due time dispatched: a message stamped at
# t may commit a little later than one stamped after it.
SCAN_MARGIN_MS = 1000
FULL_SCAN_EVERY = 5.0
SCAN_BATCH = 512


def destination_room(max_ready: int, per_destination: int) -> int:
    """In-flight units one destination domain may hold: `per_destination`, or a tenth of
    `max_ready` (at least one) when 0."""
    return per_destination if per_destination > 0 else max(1, max_ready // 10)


class PassOver(set[tuple[bytes, str]]):
    """What a scan passes over (`QueueStore.due_scan`'s `exclude`): the units in flight,
    and every unit of a destination holding its `destination_room`. Passed-over units
    do not count toward the scan's caps, so a slow destination's backlog never fills a
    scan and the units of the others behind it are read. Empty as a set: only
    `in` and truth are used."""

    __slots__ = ("inflight", "per_domain", "room")

    def __init__(self, inflight: set[tuple[bytes, str]], per_domain: dict[str, int],
                 room: int) -> None:
        super().__init__()
        self.inflight = inflight
        self.per_domain = per_domain
        self.room = room

    def __bool__(self) -> bool:
        return True

    def __contains__(self, entry: object) -> bool:
        if entry in self.inflight:
            return True
        domain = entry[1] if isinstance(entry, tuple) else None
        return isinstance(domain, str) and self.per_domain.get(domain, 0) >= self.room


def by_kind(caps: list[int]) -> tuple[list[int], list[int]]:
    """`caps` as two scans': the priority lanes alone, then the default and lower lanes
    alone. Priority units are read without `PassOver`'s room per destination (their
    headroom above is bounded already), so a password reset for a destination that holds
    its whole room still overtakes that destination's newsletter."""
    return ([c if lane < DEFAULT_LANE else 0 for lane, c in enumerate(caps)],
            [0 if lane < DEFAULT_LANE else c for lane, c in enumerate(caps)])


def priority_room(max_ready: int) -> int:
    """In-flight units allowed above `max_ready` for priorities above the default: a
    tenth of it, at least one. If priority mail alone fills that, further priority mail
    waits its turn like any other (first come first served within a lane)."""
    return max(1, max_ready // 10)


class ScanPlan:
    """Per-shard scan state: each lane's resume point and the full-scan clock."""

    __slots__ = ("newest", "last_full")

    def __init__(self) -> None:
        self.newest = [0] * PRIORITIES  # per lane: the newest due ms dispatched
        self.last_full = 0.0

    def forget(self) -> None:
        """The next scan reads every lane from the start (entries were re-dated or
        handed back to before the resume points)."""
        self.last_full = 0.0

    def next(self, max_ready: int, inflight: int, mono: float) -> tuple[list[int], list[int]] | None:
        """(caps, since) for `due_scan`, or None when not even the priority lanes may
        take anything. `caps` are running totals: every lane at most SCAN_BATCH a scan."""
        room = max_ready - inflight
        high_room = room + priority_room(max_ready)
        if high_room <= 0:
            return None
        # The safety-net full scan is spent only on a scan that may read every lane.
        full = room > 0 and mono - self.last_full >= FULL_SCAN_EVERY
        if full:
            self.last_full = mono
            since = [0] * PRIORITIES
        else:
            since = [max(0, t - SCAN_MARGIN_MS) for t in self.newest]
        low, high = min(max(room, 0), SCAN_BATCH), min(high_room, SCAN_BATCH)
        return [high if lane < DEFAULT_LANE else low for lane in range(PRIORITIES)], since

    def saw(self, lane: int, due_ms: int) -> None:
        """An entry of `lane` due at `due_ms` was dispatched."""
        if due_ms > self.newest[lane]:
            self.newest[lane] = due_ms
