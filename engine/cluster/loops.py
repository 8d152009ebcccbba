"""The loops the fleet's coordination runs as supervisor tasks (stopped by
link.stop_tasks).

Every loop outlives Redis going away (the link turns degraded, logged once there, and
the next round retries) and one bad round (logged under the caller's event name), so
the supervisor never loses a piece of coordination while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from engine.cluster.link import LINK_ERRORS, ClusterLink
from engine.observe import log


async def rounds(round_: Callable[[], Awaitable[object]], pause: Callable[[], float], failed: str,
                 wake: asyncio.Event | None = None) -> None:
    """`round_()`, then a pause of `pause()` seconds (cut short by `wake`), for ever."""
    while True:
        try:
            await round_()
        except LINK_ERRORS:
            pass  # degraded: the next round does what this one could not
        except Exception as err:  # one bad round must not end the task
            log.error(failed, error=repr(err))
        if wake is None:
            await asyncio.sleep(pause())
            continue
        # asyncio.timeout rather than wait_for: a stop's cancel arriving as `wake` is
        # set must not be lost (see link.stop_tasks).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause()):
                await wake.wait()
        wake.clear()


async def follow(link: ClusterLink, join: Callable[[], Awaitable[bytes]],
                 follow_once: Callable[[bytes], Awaitable[bytes]], failed: str) -> None:
    """Follow a stream for ever: `join()` gives the id to read from, each
    `follow_once(id)` reads what came after it and returns the next id. Any failure
    joins again a heartbeat later: Redis may have restarted empty meanwhile, and a
    bad event must not end the task."""
    position: bytes | None = None
    while True:
        try:
            if position is None:
                position = await join()
            position = await follow_once(position)
        except LINK_ERRORS:
            position = None
            await asyncio.sleep(float(link.cfg.heartbeat))
        except Exception as err:
            log.error(failed, error=repr(err))
            position = None
            await asyncio.sleep(float(link.cfg.heartbeat))
