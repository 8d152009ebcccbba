"""An asyncio.Event that tests and shutdown can wait on with a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes(asyncio.Event):
    """Set (`set()`) at every change of some state; `until` waits for a condition on it."""

    async def until(self, holds: Callable[[], bool], timeout: float) -> None:
        """Return once `holds()` is true, re-checked at every change.

        Raises TimeoutError after `timeout` seconds.
        """
        async def wait() -> None:
            while not holds():
                self.clear()
                await self.wait()

        await asyncio.wait_for(wait(), timeout)
