"""One deadline that moves at every write and almost never fires.

A session sets its deadline at every write (house rule 8: now + the timeouts of every
reply still awaited). Replacing a loop timer each time would cost a heap push and a
cancellation per message, so one timer is kept and re-armed lazily: moving the
deadline later is an attribute store; only an earlier deadline replaces the timer, and
a timer that fires before the (since pushed back) deadline just sleeps again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class Deadline:
    """Calls `expired()` once the loop time passes `at` (set with `set`). Loop thread only."""

    __slots__ = ("_expired", "_loop", "_timer", "_timer_at", "at")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self._loop = loop
        self._expired = expired
        self.at = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def set(self, at: float) -> None:
        self.at = at
        if self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._loop.time() < self.at:
            self.set(self.at)  # pushed back by later writes: sleep again
        else:
            self._expired()
