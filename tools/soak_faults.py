"""The soak's fault schedule: one seeded RNG decides when and what, so a run can be
replayed with the same --seed (the load and the kernel's timing still vary).

Kinds injected on the schedule:
- `worker_kill`: kill -9 of one `volley serve` worker (pid from `volley ctl status`);
  the supervisor starts a new one. Its outbound sessions at that moment bound the
  duplicates the kill may cause (README, P2/P3: the remote said 250 and our commit of
  that fact had not completed), so each kill records them.
- `sink_restart`: SIGTERM to one lab sink, which drops its connections mid-transaction,
  then a new sink on the same address and port after a short outage.
- `queue_fill`: every destination suspended (`volley ctl suspend`) for a while, so the
  small queue reaches its high-water mark and new mail gets 452 (the blast counts those
  refusals); then resumed.
The sinks' own rates (451 defers, 550 rejects, dropped connections at the end of data)
run all the time; their counts are reported beside these.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak_lab import Sink

KINDS = ("worker_kill", "sink_restart", "queue_fill")


def control(sock: Path, req: Any, timeout: float = 10.0) -> dict[str, Any]:
    """One control request (blocking: call it through asyncio.to_thread)."""
    from engine.control.client import request

    return request(str(sock), req, timeout)


async def status(sock: Path) -> dict[str, Any]:
    from engine.control.protocol import Status

    return await asyncio.to_thread(control, sock, Status())


@dataclass
class Faults:
    """Runs the schedule until stopped; `events` and `kills` are read by the report."""

    sock: Path
    sinks: list[Sink]
    domains: list[str]
    rng: random.Random
    interval: float  # mean seconds between faults
    fill_seconds: float  # how long a queue_fill keeps delivery suspended
    outage: float  # how long a restarted sink stays down
    kinds: tuple[str, ...] = KINDS  # which kinds the schedule draws from
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, kind, detail)
    counts: Counter[str] = field(default_factory=Counter)
    kill_bound: int = 0  # sum over kills of the victim's units in flight or sessions out (at least 1)
    suspended: bool = False
    t0: float = field(default_factory=time.monotonic)

    def plan(self) -> list[str]:
        """Every kind once in a shuffled order first (a short run still sees each), then
        random kinds."""
        first = list(self.kinds)
        self.rng.shuffle(first)
        return first

    async def run(self) -> None:
        queue = self.plan()
        while True:
            # The first round comes sooner, so a short run still sees every kind.
            await asyncio.sleep(self.rng.uniform(0.5, 1.0 if queue else 1.5) * self.interval)
            kind = queue.pop(0) if queue else self.rng.choice(self.kinds)
            try:
                detail = await getattr(self, kind)()
            except Exception as err:  # noqa: BLE001 (a fault that could not be injected is noted, not fatal)
                self.note("fault_error", f"{kind}: {err!r}")
                continue
            if detail is not None:
                self.counts[kind] += 1
                self.note(kind, detail)

    def note(self, kind: str, detail: str) -> None:
        self.events.append((round(time.monotonic() - self.t0, 1), kind, detail))

    async def worker_kill(self) -> str | None:
        st = await status(self.sock)
        live = [w for w in st["workers"] if w.get("pid")]
        if not live:
            return None
        victim = self.rng.choice(live)
        # Every unit dispatched and not yet committed may be delivered again (P3): a
        # session can have delivered several before their outcomes commit, so the
        # sessions alone undercounted the window (95 duplicates against 67 in one run).
        self.kill_bound += max(1, int(victim.get("sessions_out") or 0), int(victim.get("inflight") or 0))
        os.kill(int(victim["pid"]), signal.SIGKILL)
        return f"slot {victim['slot']} pid {victim['pid']} ({victim.get('sessions_out', 0)} sessions out)"

    async def sink_restart(self) -> str | None:
        sink = self.rng.choice(self.sinks)
        await sink.stop()
        await asyncio.sleep(self.outage)  # the outage itself is the fault
        for _ in range(20):
            if await sink.start():
                return f"{sink.spec.host} down {self.outage:g}s"
            await asyncio.sleep(0.5)  # the port is still in TIME_WAIT-free reuse race: retry
        raise RuntimeError(f"sink {sink.spec.host} did not come back")

    async def queue_fill(self) -> str | None:
        """Suspend every destination until the queue stops growing under the blast's
        steady load for a second (new mail is being refused: the server's rejected
        counter cannot tell, nothing increments it) or `fill_seconds` pass; then resume."""
        from engine.control.protocol import Suspend

        self.suspended = True
        start = time.monotonic()
        full_at = None
        try:
            for domain in self.domains:  # the duration makes it end even if we die
                await asyncio.to_thread(control, self.sock, Suspend(
                    domain=domain, duration=self.fill_seconds + 10, reason="soak: queue fill"))
            top, top_at = -1, start
            while time.monotonic() - start < self.fill_seconds:
                await asyncio.sleep(0.25)  # polling the queue's exact count, with a deadline
                queued = int((await status(self.sock))["queue"]["messages"])
                if queued > top:
                    top, top_at = queued, time.monotonic()
                elif time.monotonic() - top_at >= 1.0:
                    full_at = top_at - start
                    break
        finally:
            await self.resume_all()
        held = time.monotonic() - start
        if full_at is None:
            return f"delivery suspended {held:.1f}s; the queue did not fill"
        return f"delivery suspended {held:.1f}s; full at {top} messages after {full_at:.1f}s"

    async def resume_all(self) -> None:
        from engine.control.protocol import Resume

        if not self.suspended:
            return
        for domain in self.domains:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(control, self.sock, Resume(domain=domain))
        self.suspended = False

    async def settle(self) -> None:
        """After the schedule is cancelled: delivery resumed, every sink up again."""
        await self.resume_all()
        for sink in self.sinks:
            if sink.proc is None:
                for _ in range(20):
                    if await sink.start():
                        break
                    await asyncio.sleep(0.5)


class RssWatch:
    """Each worker's RSS: a baseline `after` seconds into its life (the first minute of a
    run, or of a restarted worker's new life), and the latest value."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.born: dict[int, float] = {}
        self.slot: dict[int, int] = {}
        self.base: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def sample(self, workers: list[dict[str, Any]]) -> None:
        from soak_lab import rss_kib

        now = time.monotonic()
        for w in workers:
            pid = w.get("pid")
            if not pid:
                continue
            self.born.setdefault(pid, now - float(w.get("age") or 0.0))
            self.slot[pid] = int(w["slot"])
            rss = rss_kib(pid)
            if rss is None:
                continue
            self.last[pid] = rss
            if pid not in self.base and now - self.born[pid] >= self.after:
                self.base[pid] = rss

    def rows(self, current: set[int]) -> list[dict[str, Any]]:
        """One row per worker alive at the end."""
        rows = []
        for pid in sorted(current, key=lambda p: self.slot.get(p, 0)):
            base, last = self.base.get(pid), self.last.get(pid)
            drift = None if base is None or last is None else (last - base) / base
            rows.append({"slot": self.slot.get(pid), "pid": pid, "base_kib": base,
                         "end_kib": last, "drift": drift})
        return rows
