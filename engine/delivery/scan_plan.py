"""Where a shard's next scan of the due index starts, and how much each lane may take.

The due index keeps one run of keys per (owner, priority lane), each in due order
(engine/queue/layout.py); `QueueStore.due_scan` reads the lanes highest priority first.
This is the scheduler's side of it:

- Budget. In-flight units are capped at `delivery.max_ready`. Lanes above the default
  priority may go `priority_room` past it, so a shard whose in-flight set is full of
  newsletter units (a throttled provider drains them slowly) still reads its priority
  lanes and dispatches a password reset at once; without it the scan would not run
  until the newsletter drained. Priority mail uses the ordinary room first.
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
