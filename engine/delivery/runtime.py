"""One worker's delivery side, assembled: resolver, MX cache, site pools, delivery
log and the scheduler for the worker's shard of the queue."""

from __future__ import annotations

import asyncio

from engine.config import Config
from engine.delivery.pool import PoolManager
from engine.delivery.scheduler import Scheduler
from engine.dns.cache import DnsCache
from engine.dns.resolver import Resolver
from engine.observe.delivery_log import DeliveryLog
from engine.queue.commit import Committer
from engine.queue.ids import IdAllocator
from engine.queue.store import QueueStore

# Idle sessions are checked for QUIT this often (each pool also has its own timer).
_IDLE_SWEEP = 1.0


class Delivery:
    def __init__(self, cfg: Config, *, store: QueueStore, committer: Committer,
                 ids: IdAllocator, owner: int, local: set[tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        d = cfg.dns
        self.resolver = Resolver(list(d.nameservers), float(d.timeout))
        self.dns = DnsCache(
            self.resolver, min_ttl=float(d.min_ttl), max_ttl=float(d.max_ttl),
            negative_ttl_max=float(d.negative_ttl_max), failure_ttl=float(d.failure_ttl),
            max_entries=d.cache_size,
            # Loop detection by name (RFC 5321 §5.1): an MX that is our own host name is
            # us even when its address is not one of our listeners' (NAT, a proxy), which
            # the scheduler's (ip, port) check cannot see.
            local=frozenset({cfg.server.hostname}) if cfg.server.hostname else frozenset(),
        )
        self.pools = PoolManager(cfg.delivery.timeouts, loop)
        self.dlog = DeliveryLog(cfg.log.delivery, loop)
        self.scheduler = Scheduler(cfg, store=store, committer=committer, ids=ids,
                                   dns=self.dns, resolver=self.resolver, pools=self.pools, owner=owner,
                                   dlog=self.dlog, local=local)

    def start(self) -> None:
        self.scheduler.start()

    def apply_config(self, cfg: Config) -> None:
        self.scheduler.apply_config(cfg)

    async def stop(self, grace: float) -> None:
        """Let transactions in flight finish within `grace`, then close every pool;
        jobs never started stay due in the queue for the next start."""
        await self.scheduler.stop(grace / 2)
        await self.pools.close(grace / 2)
        await self.scheduler.stop(1.0)
        await self.dlog.close()
