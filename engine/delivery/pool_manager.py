"""Every connection pool of one worker, keyed by destination site (pool.py has one
pool's theory of operation)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from engine.config import TimeoutsConfig
from engine.delivery.budget import ConnectionBudget
from engine.delivery.changes import Changes
from engine.delivery.connect import client_tls_context
from engine.delivery.egress import EgressPools
from engine.delivery.job import Job, JobResult, PoolSettings, safe_done, unsent
from engine.delivery.pool import PoolStats, SitePool
from engine.delivery.provider_gate import ProviderGates
from engine.delivery.shared_limits import LimitTable
from engine.delivery.site_slots import SiteGates, SiteTable
from engine.dns.mx import Route

PoolKey = tuple[str, int, str, str, str, str, str, str]


class PoolManager:
    """Every SitePool of a worker, keyed by (site, port, tls policy, auth user,
    throttled domain, [[shaping]] provider, source address, EHLO name), so domains
    sharing an MX set share connections (ARCHITECTURE rule 10) unless an operator
    throttled one of them (`PoolSettings.only_domain`), they belong to different
    providers, or their jobs leave from different [[egress]] sources (`egress`,
    egress.py, binds each job's settings to a source before the pool is chosen). Pools of one
    provider share its server-wide limits through `gates` (provider_gate.py), over a
    table shared with the other workers (`limits`; a private one when not given).
    The site is the MX host names (`Route.site_key`) when the certificate is verified
    (the session's name must be the one checked), else their addresses
    (`Route.address_key`): one receiving machine, one pool, however many names point
    at it. Every pool draws on one `ConnectionBudget` (budget.py) when given one.

    Differing `settings` for an existing key are applied to that pool
    (`SitePool.update_settings`): a reload or a throttle changes running pools.

    Pools do not live for ever: every `sweep_interval` seconds while any exist, a pool
    that has had no session, job or backoff for its `idle_timeout` is dropped
    (`drop_idle_pools`), so a worker that once mailed 100,000 domains does not keep
    100,000 pools. A later job for the site simply makes a new one.
    """

    def __init__(self, timeouts: TimeoutsConfig | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 budget: ConnectionBudget | None = None, sweep_interval: float = 1.0,
                 limits: LimitTable | None = None, column: int = 0,
                 egress: EgressPools | None = None, workers: int = 1,
                 sites: SiteTable | None = None) -> None:
        self.timeouts = timeouts or TimeoutsConfig()
        self.egress = egress
        self.budget = budget
        self.loop = loop or asyncio.get_running_loop()
        self.limits = limits or LimitTable.private()
        self.gates = ProviderGates(self.limits, column, self.loop, workers)
        # Each site's connections counted across workers (site_slots.py): every worker
        # delivers a share of a hot domain, the site's cap holds for all of them.
        self.site_gates = SiteGates(sites or SiteTable.private(), column, workers, self.loop)
        self.pools: dict[PoolKey, SitePool] = {}
        self._contexts: dict[tuple[bool, str], ssl.SSLContext] = {}
        self._closing = False
        self._retired = PoolStats()  # totals of pools dropped by drop_idle_pools
        self._sweep_interval = sweep_interval
        self._sweep: asyncio.TimerHandle | None = None
        self._changed = Changes()  # a pool was made or dropped

    def tls_context(self, settings: PoolSettings) -> ssl.SSLContext:
        """One cached client context per (verify, CA file).

        Raises OSError / ssl.SSLError if the CA file cannot be loaded.
        """
        key = (settings.tls_verify, settings.tls_ca_file)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = client_tls_context(*key)
        return ctx

    @staticmethod
    def _key(route: Route, settings: PoolSettings) -> PoolKey:
        site = route.site_key if settings.tls_verify or not route.address_key else route.address_key
        return (site, settings.port, settings.tls, settings.auth_user, settings.only_domain,
                settings.provider, settings.source_address, settings.helo_name)

    def backing_off(self, route: Route, settings: PoolSettings) -> SitePool | None:
        """The pool a job of `route` would go to, when it exists and is backing off (its
        destination is dead: the scheduler defers the unit as part of a group, dead.py,
        instead of dispatching it). None with [[egress]] sources in use: the source,
        hence the pool, is chosen per job at `submit`."""
        egress = self.egress
        if egress is not None and egress.active:
            return None
        pool = self.pools.get(self._key(route, settings))
        return pool if pool is not None and pool.in_backoff else None

    def pool_for(self, route: Route, settings: PoolSettings) -> SitePool:
        key = self._key(route, settings)
        pool = self.pools.get(key)
        if pool is None:
            pool = self._new_pool(key, settings)
        elif pool.settings is not settings and pool.settings != settings:
            pool.update_settings(settings)
        return pool

    def submit(self, job: Job, settings: PoolSettings) -> None:
        """`pool_for(job.route, settings).submit(job)`; after `close` a 4.3.2 deferral."""
        if self._closing:
            safe_done(job, unsent(job))
            return
        egress = self.egress
        if egress is not None and egress.active:
            chosen = egress.choose(job, settings, self.loop.time())
            if isinstance(chosen, JobResult):  # every source of its pool is held (warm-up)
                safe_done(job, chosen)
                return
            settings = chosen
        self.pool_for(job.route, settings).submit(job)

    def withdraw(self, domain: str) -> int:
        """`SitePool.withdraw` on every pool; returns the jobs handed back."""
        return sum(pool.withdraw(domain) for pool in self.pools.values())

    def serving(self, domain: str, route: Route | None = None) -> list[SitePool]:
        """Pools that lately took jobs for `domain`, its own (throttled) pool, and the
        pools of its site by name or address (when its route is known)."""
        sites = {route.site_key, route.address_key} - {""} if route is not None else set()
        return [p for k, p in self.pools.items()
                if k[4] == domain or k[0] in sites or p.serves(domain)]

    def _new_pool(self, key: PoolKey, settings: PoolSettings) -> SitePool:
        def tls_context() -> ssl.SSLContext:
            return self.tls_context(pool.settings)

        pool = self.pools[key] = SitePool(key[0], settings, self.timeouts, tls_context,
                                          self.loop, self.budget, self.gates)
        pool.site_gate = self.site_gates.gate_for("|".join(map(str, key)), pool)
        if self._sweep is None and not self._closing:
            self._sweep = self.loop.call_later(self._sweep_interval, self._on_sweep)
        self._changed.set()
        return pool

    def _on_sweep(self) -> None:
        self._sweep = None
        self.drop_idle_pools()
        if self.pools and not self._closing:
            self._sweep = self.loop.call_later(self._sweep_interval, self._on_sweep)

    def drop_idle_pools(self) -> int:
        """Drop every pool idle (`SitePool.idle_since`) for at least its settings'
        `idle_timeout`; their counters go on in the totals. Returns how many."""
        now = self.loop.time()
        idle = [(key, pool) for key, pool in self.pools.items()
                if (since := pool.idle_since()) is not None
                and now - since >= pool.settings.idle_timeout]
        for key, pool in idle:
            st = pool.stats
            self._retired.connections_opened += st.connections_opened
            self._retired.bytes_sent += st.bytes_sent
            del self.pools[key]
            pool.drop()
        if idle:
            self._changed.set()
        return len(idle)

    async def wait_for(self, predicate: Callable[[PoolManager], bool], timeout: float) -> None:
        """Wait until `predicate(self)` holds, re-checked whenever a pool is made or
        dropped. Raises TimeoutError after `timeout` seconds."""
        await self._changed.until(lambda: predicate(self), timeout)

    @property
    def connections_opened(self) -> int:
        """Outbound connections opened since start (all pools, dropped ones too)."""
        live = sum(p.stats.connections_opened for p in self.pools.values())
        return self._retired.connections_opened + live

    @property
    def bytes_sent(self) -> int:
        """Message content accepted by next hops since start."""
        return self._retired.bytes_sent + sum(p.stats.bytes_sent for p in self.pools.values())

    async def close(self, grace: float | None = None) -> None:
        """Close every pool (see `SitePool.close`); every job gets exactly one result."""
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        await asyncio.gather(*[pool.close(grace) for pool in self.pools.values()])

    @property
    def stats(self) -> dict[str, PoolStats]:
        return {f"{k[0]}:{k[1]}/{k[2]}" + (f"/{k[3]}" if k[3] else "")
                + (f"[{k[4]}]" if k[4] else "") + (f"<{k[5]}>" if k[5] else "")
                + (f"@{k[6]}" if k[6] else ""): p.stats
                for k, p in self.pools.items()}
