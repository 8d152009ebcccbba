"""What the supervisor knows about its workers' live state.

Each worker pushes its `State` (engine/control/wire.py) about once a second over its pipe:
its metrics snapshot and live figures (sessions, pools, backoffs). The fleet keeps
the last push per slot. When a worker dies its last counters are folded into a
`retired` base, so counters stay monotonic across restarts (what was counted after
the last push, at most a second's worth, is lost with the process).

The status rates (`rates`) are sliding windows over the merged counters: sampled every
few seconds by the supervisor and once more, with the counters of the latest pushes, when
`status` asks, starting from zeros at the fleet's creation (engine/observe/rates.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from engine.control.wire import Backoff, Live, State
from engine.observe.metrics import WorkerMetrics
from engine.observe.rates import RATE_COUNTERS, RateWindow

_NO_LIVE = Live()  # what a worker that has not pushed yet shows


class FleetRates(RateWindow):
    """The fleet's rate window: `rates(now)` first samples the counters as the workers
    last pushed them, so a status asked between two periodic samples is current."""

    def __init__(self, fleet: Fleet, start: float) -> None:
        super().__init__(RATE_COUNTERS, start=start)
        self.fleet = fleet

    def rates(self, now: float, counters: Mapping[str, int] | None = None) -> dict[str, dict[str, float]]:
        return super().rates(now, self.fleet.counters() if counters is None else counters)


class Fleet:
    def __init__(self) -> None:
        self.states: dict[int, State] = {}
        self.retired: dict[str, Any] | None = None
        # Counts the supervisor itself makes (the reports of `ctl bounce`), merged in.
        self.own: dict[str, int] = {}
        # Every counter is 0 now (no worker has pushed): the base of the first rates.
        self.rates = FleetRates(self, time.monotonic())

    def update(self, slot: int, state: State) -> None:
        self.states[slot] = state

    def worker_exited(self, slot: int) -> None:
        last = self.states.pop(slot, None)
        if last and last.metrics:
            parts = [last.metrics] + ([self.retired] if self.retired else [])
            self.retired = WorkerMetrics.merge(parts)

    def count(self, attr: str, n: int) -> None:
        """Add `n` to a counter the supervisor moves itself (a WorkerMetrics counter)."""
        self.own[attr] = self.own.get(attr, 0) + n

    def metrics(self) -> dict[str, Any]:
        parts = [s.metrics for s in self.states.values() if s.metrics]
        if self.retired:
            parts.append(self.retired)
        if self.own:
            parts.append({"counters": dict(self.own)})
        return WorkerMetrics.merge(parts) if parts else WorkerMetrics().snapshot()

    def counters(self) -> dict[str, int]:
        """The merged counters the rates are kept of."""
        counters = self.metrics().get("counters", {})
        return {k: counters.get(k, 0) for k in RATE_COUNTERS}

    def sample(self) -> None:
        """Feed the rate window (the supervisor calls this every few seconds)."""
        self.rates.add(time.monotonic(), self.counters())

    def live(self, slot: int) -> Live:
        """The live figures of the worker's last push (all empty before its first)."""
        state = self.states.get(slot)
        return state.live if state is not None else _NO_LIVE

    def backoffs(self) -> list[Backoff]:
        """Automatic suspensions: destinations a worker's pool is backing off."""
        out: list[Backoff] = []
        for state in self.states.values():
            out.extend(state.live.backoffs)
        return out
