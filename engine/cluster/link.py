"""The node's one connection to the fleet's Redis, and its liveness in it.

`ClusterLink` owns the `redis.asyncio` client, the key naming (`key_prefix` + parts),
a heartbeat that keeps this node's liveness record alive (a key with a TTL of
`lease_ttl`, so a node killed with -9 disappears from the count by itself), and the
healthy/degraded state every other piece of coordination reads.

Every command is bounded by `timeout` (the client's socket timeouts plus an outer
`asyncio.timeout`), so Redis being down costs the supervisor at most one timeout per
attempt and never blocks delivery: workers only read the shared tables the supervisor
writes. While degraded, `live_nodes()` keeps the last count seen, which is what the
local shares (cap ÷ live nodes) divide by.

Stopping is bounded too (`stop_tasks`). A cancel can be lost: in Python 3.11
`asyncio.wait_for` returns the result instead of raising when the cancel arrives in the
same loop turn as the reply it waited for (a library's await may do the same), so one
cancel and an unbounded await of the task could wait for ever. Commands therefore run
under `asyncio.timeout`, which keeps the cancel, and a stop cancels again a task that
goes on, giving up on it after STOP_WITHIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine.config.cluster import ClusterConfig
from engine.observe import log

T = TypeVar("T")
HealthCallback = Callable[[bool], Any]

# The errors that mean "Redis is not answering" (down, refused, timed out, reset):
# they turn the link degraded; anything else is a bug and propagates.
LINK_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
STOP_WITHIN = 5.0  # seconds stop_tasks waits in all before it leaves a task behind
# Seconds between cancels of a task still running: long enough that its own cleanup on
# cancel (closing a Redis connection) is not cut short, short enough that a lost cancel
# costs a stop little.
RECANCEL_AFTER = 0.5


class ClusterLink:
    """A node's connection to the fleet's Redis, its heartbeat and its health."""

    def __init__(self, cfg: ClusterConfig) -> None:
        if not cfg.enabled:
            raise ValueError("cluster: redis is not set")
        self.cfg = cfg
        self.node = cfg.node
        self.timeout = float(cfg.timeout)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            cfg.redis, decode_responses=False,
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            health_check_interval=0, retry_on_timeout=False)
        self.healthy = False
        self._live = 1
        self._callbacks: list[HealthCallback] = []
        self._task: asyncio.Task[None] | None = None
        self.started_at = time.time()

    # -- naming ---------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """`key_prefix` + the parts joined by ':' (every key Volley writes)."""
        return self.cfg.key_prefix + ":".join(parts)

    @property
    def nodes_key(self) -> str:
        """A sorted set: node name → the wall-clock time its lease ends."""
        return self.key("nodes")

    # -- health ---------------------------------------------------------------

    def on_health(self, cb: HealthCallback) -> None:
        """Call `cb(healthy)` on every healthy↔degraded transition (sync or async)."""
        self._callbacks.append(cb)

    def live_nodes(self) -> int:
        """Nodes whose liveness was renewed within lease_ttl (at least 1, this one);
        while degraded, the last count seen."""
        return max(1, self._live)

    async def call(self, coro: Awaitable[T]) -> T:
        """Await one Redis command within `timeout`; a failure marks the link
        degraded (the caller still gets the exception, to skip its round)."""
        try:
            return await self._bounded(coro)
        except LINK_ERRORS:
            await self._set_health(False)
            raise

    async def _bounded(self, coro: Awaitable[T]) -> T:
        async with asyncio.timeout(self.timeout):
            return await coro

    async def _set_health(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        # Logged once per transition, not once per failed command.
        if healthy:
            log.info("cluster_healthy", node=self.node, live_nodes=self.live_nodes())
        else:
            log.warning("cluster_degraded", node=self.node, live_nodes=self.live_nodes(),
                        reason="redis not answering")
        for cb in list(self._callbacks):
            try:
                res = cb(healthy)
                if asyncio.iscoroutine(res):
                    await res
            except Exception as err:  # a broken listener must not stop the heartbeat
                log.error("cluster_health_callback_failed", error=repr(err))

    # -- heartbeat ------------------------------------------------------------

    async def beat(self) -> bool:
        """Renew this node's liveness and recount the live nodes (one round trip:
        ZADD + ZREMRANGEBYSCORE of the expired + ZCARD in a transaction). Returns
        whether Redis answered."""
        now = time.time()
        ttl = float(self.cfg.lease_ttl)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.nodes_key, {self.node: now + ttl})
        pipe.zremrangebyscore(self.nodes_key, "-inf", now)
        pipe.zcard(self.nodes_key)
        # The set itself outlives any one node by a margin, so a fleet that stops
        # leaves nothing behind.
        pipe.expire(self.nodes_key, int(ttl * 3) + 1)
        try:
            res = await self.call(pipe.execute())
        except LINK_ERRORS:
            return False
        self._live = max(1, int(res[2]))
        await self._set_health(True)
        return True

    async def _heartbeat(self) -> None:
        period = float(self.cfg.heartbeat)
        while True:
            await self.beat()
            await asyncio.sleep(period)

    async def start(self) -> None:
        """Connect (one attempt, bounded by timeout) and start the heartbeat; a
        Redis that is down at start leaves the node degraded, not stopped."""
        if not await self.beat():
            # Starting degraded is a transition too: say it once.
            log.warning("cluster_degraded", node=self.node, live_nodes=self.live_nodes(),
                        reason="redis not answering at start")
        self._task = asyncio.create_task(self._heartbeat(), name="cluster-heartbeat")

    async def stop(self) -> None:
        """Stop the heartbeat and leave the fleet at once (others need not wait for
        the TTL to stop counting this node)."""
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        if self.healthy:
            with contextlib.suppress(*LINK_ERRORS):
                await self._bounded(self.redis.zrem(self.nodes_key, self.node))
        with contextlib.suppress(*LINK_ERRORS):
            await self._bounded(self.redis.aclose())
        self.healthy = False

    def status(self) -> dict[str, Any]:
        """What `volley ctl status` shows of the link."""
        return {"node": self.node, "redis": _redacted(self.cfg.redis),
                "state": "healthy" if self.healthy else "degraded",
                "live_nodes": self.live_nodes()}


async def call_loose(link: ClusterLink, coro: Awaitable[Any]) -> Any:
    """`link.call`, typed loosely: redis-py's replies are unions its stubs cannot narrow
    (bytes or str by decode_responses, list or dict by protocol); we know ours."""
    return await link.call(coro)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until they end, cancelling again those that go on (a
    lost cancel, see the module's docstring), for at most STOP_WITHIN seconds. An error
    a task ended with is logged, not raised: the rest of the node's stop must still run."""
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_WITHIN
    pending = {t for t in tasks if not t.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            log.error("cluster_stop_timed_out", tasks=sorted(t.get_name() for t in pending))
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_AFTER, left))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("cluster_task_failed", task=task.get_name(), error=repr(task.exception()))


def _redacted(url: str) -> str:
    """The Redis URL without a password (status output is not a secret store)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
