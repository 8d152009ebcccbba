"""Where each domain's mail goes and with which pool settings: [[routes]] matching, the
MX route (or a smarthost's), loop removal, the [[shaping]] entry that applies
(shaping.py: by domain, or by the most-preferred MX hosts once the route is known) and
an operator's throttle, in that order, memoised briefly.

Bulk mail sends thousands of messages to one domain a second. The DNS cache already
answers from memory, but building the route (shuffle, loop check, settings, a
coroutine) per message cost ~12% of a worker, so a plan is kept for `MEMO_SECONDS`.
With 10,000 domains that memo rarely hits; then `now` asks the DNS cache
synchronously (`DnsCache.route_now`) and only a real query costs a task (`resolve`).
"""

from __future__ import annotations

import asyncio

from engine.config import Config, RouteConfig
from engine.delivery.holds import Throttle
from engine.delivery.job import PoolSettings
from engine.delivery.routing import drop_self, match_route, pool_settings, smarthost_route, throttled
from engine.delivery.shaping import match, most_preferred, shaped
from engine.delivery.sts_policies import StsPolicies
from engine.dns.cache import DnsCache
from engine.dns.mx import Route, RouteError
from engine.dns.resolver import Resolver

Plan = tuple[Route | RouteError, PoolSettings]

MEMO_SECONDS = 1.0  # a plan is reused this long without asking the DNS cache
MEMO_SIZE = 20_000  # domains memoised; expired plans are dropped beyond it


class RoutePlanner:
    """Plans for one worker's scheduler. Loop thread only."""

    def __init__(self, cfg: Config, dns: DnsCache, resolver: Resolver,
                 local: set[tuple[str, int]], loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.dns = dns
        self.resolver = resolver
        self.local = local
        self.loop = loop
        self.throttles: dict[str, Throttle] = {}  # the operator's, from the hold table
        self._memo: dict[str, tuple[float, Route | RouteError, PoolSettings]] = {}
        # Equal settings as one object, so the pool manager's "changed?" test is an
        # identity check for every job but the first after a change.
        self._interned: dict[PoolSettings, PoolSettings] = {}
        self._base: dict[int, PoolSettings] = {}  # id of a [[routes]] entry (or None)
        # MTA-STS (RFC 8461) for MX routes, applied last: a [[shaping]] tls must never
        # loosen an enforced policy's "required".
        self.sts = StsPolicies(cfg, resolver, loop)

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sts.configure(cfg)
        self.forget()

    def forget(self) -> None:
        """Drop every plan: the next message of each domain asks the DNS cache again."""
        self._memo.clear()
        self._interned.clear()
        self._base.clear()

    def now(self, domain: str, mono: float) -> Plan | None:
        """The plan without waiting: memoised, or from fresh DNS cache answers; None
        when a query must go out (then `resolve`)."""
        memo = self._memo.get(domain)
        if memo is not None and memo[0] > mono:
            return memo[1], memo[2]
        route_cfg, settings = self._settings(domain)
        if route_cfg is not None and route_cfg.host:
            return None  # a smarthost: resolved on the slow path
        route = self.dns.route_now(domain)
        if route is None:
            return None
        if isinstance(route, Route):
            route = drop_self(route, settings.port, self.local)
        planned = self.sts.plan_now(domain, route, self._finish(domain, route, settings))
        if planned is None:
            return None  # the domain's policy must be looked up first: resolve()
        return self._remember(domain, planned[0], self._intern(planned[1]))

    async def resolve(self, domain: str) -> Plan:
        route_cfg, settings = self._settings(domain)
        route: Route | RouteError
        if route_cfg is not None and route_cfg.host:
            route = await smarthost_route(domain, route_cfg, self.resolver)
            return self._remember(domain, route, self._finish(domain, route, settings))
        route = await self.dns.route(domain)
        if isinstance(route, Route):
            route = drop_self(route, settings.port, self.local)
        route, shaped_settings = await self.sts.plan(domain, route, self._finish(domain, route, settings))
        return self._remember(domain, route, self._intern(shaped_settings))

    def _settings(self, domain: str) -> tuple[RouteConfig | None, PoolSettings]:
        """The domain's [[routes]] entry and its pool settings. Settings per entry are
        built once per config: building them per message read a route's password file
        each time."""
        route_cfg = match_route(self.cfg.routes, domain)
        settings = self._base.get(id(route_cfg))
        if settings is None:
            settings = self._base[id(route_cfg)] = self._intern(pool_settings(self.cfg, route_cfg))
        return route_cfg, settings

    def _finish(self, domain: str, route: Route | RouteError, settings: PoolSettings) -> PoolSettings:
        """`settings` with the domain's [[shaping]] entry, then an operator's throttle."""
        if self.cfg.shaping:
            hosts = most_preferred(route.hosts) if isinstance(route, Route) else None
            rule, _why = match(self.cfg.shaping, domain, hosts)
            if rule is not None:
                settings = self._intern(shaped(settings, rule))
        throttle = self.throttles.get(domain)
        if throttle is not None:
            settings = self._intern(throttled(settings, throttle))
        return settings

    def _intern(self, settings: PoolSettings) -> PoolSettings:
        return self._interned.setdefault(settings, settings)

    def _remember(self, domain: str, route: Route | RouteError, settings: PoolSettings) -> Plan:
        memo = self._memo
        now = self.loop.time()
        if len(memo) >= MEMO_SIZE:
            for stale in [d for d, m in memo.items() if m[0] <= now]:
                del memo[stale]
            if len(memo) >= MEMO_SIZE:
                memo.clear()
        memo[domain] = (now + MEMO_SECONDS, route, settings)
        return route, settings
