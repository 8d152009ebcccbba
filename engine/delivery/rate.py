"""The token bucket behind an operator's rate throttle (`settings.rate` messages/s) on a
site pool (pool.py says where it is consulted).

The burst is one message, or a tenth of a second's worth above 10 msgs/s so that a timer
firing late does not lower the rate: messages leave evenly spaced, which is what a
receiver's per-window limit wants. With no token ready, one `loop.call_at` timer calls
`on_ready` when the next is due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

ONE = 1.0 - 1e-9  # a whole token, give or take float rounding of the refill


class TokenBucket:
    """Loop thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None]) -> None:
        self.loop = loop
        self._on_ready = on_ready
        self._tokens = 1.0
        self._at = loop.time()
        self._timer: asyncio.TimerHandle | None = None

    def ready(self, rate: float) -> float:
        """Refill at `rate` and return the tokens held; below one, arm the timer that
        calls `on_ready` when the next is due."""
        now = self.loop.time()
        tokens = min(max(1.0, rate / 10), self._tokens + (now - self._at) * rate)
        self._tokens, self._at = tokens, now
        if tokens < ONE and self._timer is None:
            self._timer = self.loop.call_at(now + (1.0 - tokens) / rate, self._tick)
        return tokens

    def take(self) -> None:
        self._tokens -= 1.0

    def reset(self) -> None:
        """A changed rate: a fresh bucket holding one message."""
        self._tokens, self._at = 1.0, self.loop.time()
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        self._on_ready()
