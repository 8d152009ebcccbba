"""What the supervisor knows about its workers' live state.

Each worker pushes its `State` (engine/control/wire.py) about once a second over its pipe:
its metrics snapshot and live figures (sessions, pools, backoffs). The fleet keeps
the last push per slot. When a worker dies its last counters are folded into a
`retired` base, so counters stay monotonic across restarts (what was counted after
the last push, at most a second's worth, is lost with the process).
"""

from __future__ import annotations

import time
from typing import Any

from engine.control.wire import Backoff, Live, State
from engine.observe.metrics import WorkerMetrics
from engine.observe.rates import RATE_COUNTERS, RateWindow

_NO_LIVE = Live()  # what a worker that has not pushed yet shows


class Fleet:
    def __init__(self) -> None:
        self.states: dict[int, State] = {}
        self.retired: dict[str, Any] | None = None
        self.rates = RateWindow(RATE_COUNTERS)

    def update(self, slot: int, state: State) -> None:
        self.states[slot] = state

    def worker_exited(self, slot: int) -> None:
        last = self.states.pop(slot, None)
        if last and last.metrics:
            parts = [last.metrics] + ([self.retired] if self.retired else [])
            self.retired = WorkerMetrics.merge(parts)

    def metrics(self) -> dict[str, Any]:
        parts = [s.metrics for s in self.states.values() if s.metrics]
        if self.retired:
            parts.append(self.retired)
        return WorkerMetrics.merge(parts) if parts else WorkerMetrics().snapshot()

    def sample(self) -> None:
        """Feed the rate window (the supervisor calls this every few seconds)."""
        counters = self.metrics().get("counters", {})
        self.rates.add(time.monotonic(), {k: counters.get(k, 0) for k in RATE_COUNTERS})

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
