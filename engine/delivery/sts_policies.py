"""One worker's MTA-STS policies (RFC 8461): looked up, fetched, cached, and applied to
each domain's delivery plan. The route planner asks `plan_now` (memory only) and, when
that cannot answer, awaits `plan`.

Per domain (§5.1, "Policy Application Control Flow"):
1. The `_mta-sts.DOMAIN` TXT record is looked up when the last look is stale: its TTL,
   clamped by [dns] min_ttl/max_ttl (negative answers by negative_ttl_max, failures
   by failure_ttl, at least 1 s), like the MX answers of the DNS cache.
2. A record whose id differs from the cached policy's (or no cached policy) makes a
   fetch (sts_fetch.py); the policy is then cached for its max_age. Many messages to
   one domain cost one fetch; a new id (the domain changed its policy) costs one more.
3. No record, a DNS failure or a failed fetch leave an unexpired cached policy in
   force (§5.1, and §8.3: a domain withdraws by publishing mode "none" first); with
   none cached the domain is treated as having no policy (§5: "as though the domain
   has not implemented MTA-STS"). A failed fetch is retried when the TXT is next
   looked at, not once per message.

Applying a policy (mode enforce or testing) gives the domain a pool of its own
(`only_domain`): sessions checked against one domain's policy never carry another's
mail, and an enforced policy's failure backs off that domain alone. Enforce keeps only
the route's allowed MX hosts (4.7.5 if none) and sets tls="required" with a verified
certificate (`mta_sts.ca_file` trusted besides the system store); connect.py words
the failures. Testing leaves delivery as it is and logs what would have failed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import OrderedDict

import msgspec

from engine.config import Config, MtaStsConfig
from engine.delivery.job import PoolSettings
from engine.delivery.mta_sts import Policy, disallowed_hosts, record_id, restrict_route
from engine.delivery.sts_fetch import FetchError, fetch_policy
from engine.dns.mx import Route, RouteError, norm_domain
from engine.dns.resolver import Resolver, Status
from engine.observe import log

Plan = tuple[Route | RouteError, PoolSettings]


class _Entry:
    __slots__ = ("policy", "expires", "checked_until", "noted")

    def __init__(self) -> None:
        self.policy: Policy | None = None  # the last policy fetched, mode "none" included
        self.expires = 0.0  # loop time the policy's max_age ends
        self.checked_until = 0.0  # loop time the TXT record is looked at again
        self.noted = ""  # policy id whose testing-mode MX mismatch was logged


class StsPolicies:
    """Loop thread only. `fetches` counts policy fetches started (for tests and state)."""

    def __init__(self, cfg: Config, resolver: Resolver, loop: asyncio.AbstractEventLoop) -> None:
        self.resolver = resolver
        self.loop = loop
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, asyncio.Task[None]] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.fetches = 0
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        self.cfg: MtaStsConfig = cfg.mta_sts
        self.dns = cfg.dns
        if not self.cfg.enabled:
            self._entries.clear()

    # --- the planner's side ---------------------------------------------------------
    def plan_now(self, domain: str, route: Route | RouteError, settings: PoolSettings) -> Plan | None:
        """The plan with the domain's policy applied, from memory; None when the TXT
        record must be looked at first (then `plan`)."""
        if not self.cfg.enabled or not isinstance(route, Route):
            return route, settings
        entry = self._entries.get(norm_domain(domain))
        if entry is None or entry.checked_until <= self.loop.time():
            return None
        return self._apply(domain, self._in_force(entry), route, settings)

    async def plan(self, domain: str, route: Route | RouteError, settings: PoolSettings) -> Plan:
        """`plan_now`, looking the policy up (TXT, and a fetch when its id is new)."""
        if not self.cfg.enabled or not isinstance(route, Route):
            return route, settings
        return self._apply(domain, await self.policy(domain), route, settings)

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for `domain` (mode "none" and no policy give None).
        Concurrent callers for one domain share one lookup."""
        key = norm_domain(domain)
        entry = self._entries.get(key)
        if entry is None or entry.checked_until <= self.loop.time():
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = self.loop.create_task(self._refresh(key))
                flight.add_done_callback(lambda _t: self._flights.pop(key, None))
            try:
                await asyncio.shield(flight)
            except Exception as err:  # never fail the planner: as if no policy were known
                log.error("mta_sts_lookup_error", domain=key, error=repr(err))
            entry = self._entries.get(key)
        return self._in_force(entry) if entry is not None else None

    def context(self) -> ssl.SSLContext:
        """The verifying client context: the system store plus `ca_file`.

        Raises OSError / ssl.SSLError if the CA file cannot be loaded."""
        ctx = self._contexts.get(self.cfg.ca_file)
        if ctx is None:
            ctx = ssl.create_default_context()
            if self.cfg.ca_file:
                ctx.load_verify_locations(cafile=self.cfg.ca_file)
            self._contexts[self.cfg.ca_file] = ctx
        return ctx

    # --- internals --------------------------------------------------------------------
    def _in_force(self, entry: _Entry) -> Policy | None:
        policy = entry.policy
        if policy is None or policy.mode == "none" or entry.expires <= self.loop.time():
            return None
        return policy

    def _apply(self, domain: str, policy: Policy | None, route: Route, settings: PoolSettings) -> Plan:
        if policy is None:
            return route, settings
        domain = norm_domain(domain)
        if policy.mode == "testing":
            entry = self._entries.get(domain)
            wrong = disallowed_hosts(policy, route)
            if wrong and entry is not None and entry.noted != policy.id:
                entry.noted = policy.id
                log.warning("mta_sts_testing", domain=domain, policy_id=policy.id,
                            problem=f"MX host(s) not in the policy: {', '.join(wrong)}")
            return route, msgspec.structs.replace(
                settings, only_domain=domain, tls_ca_file=self.cfg.ca_file, mta_sts="testing")
        return restrict_route(policy, route), msgspec.structs.replace(
            settings, only_domain=domain, tls="required", tls_verify=True,
            tls_ca_file=self.cfg.ca_file, mta_sts="enforce")

    def _entry(self, domain: str) -> _Entry:
        entry = self._entries.get(domain)
        if entry is None:
            entry = self._entries[domain] = _Entry()
            while len(self._entries) > self.cfg.max_policies:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(domain)
        return entry

    def _ttl(self, status: Status, ttl: int) -> float:
        d = self.dns
        if status.is_failure:
            return max(1.0, float(d.failure_ttl))
        if status is Status.OK:
            return max(1.0, min(max(float(ttl), float(d.min_ttl)), float(d.max_ttl)))
        return max(1.0, min(max(float(ttl), float(d.min_ttl)), float(d.negative_ttl_max)))

    async def _refresh(self, domain: str) -> None:
        answer = await self.resolver.txt(f"_mta-sts.{domain}")
        entry = self._entry(domain)
        now = self.loop.time()
        entry.checked_until = now + self._ttl(answer.status, answer.ttl)
        wanted = record_id(answer.records) if answer.status is Status.OK else None
        if wanted is None or (entry.policy is not None and entry.policy.id == wanted
                              and entry.expires > now):
            return  # no (usable) record: the cached policy, if any, stays until it expires
        self.fetches += 1
        try:
            policy = await fetch_policy(domain, self.resolver, self.context(),
                                        port=self.cfg.port, timeout=float(self.cfg.fetch_timeout))
        except (FetchError, OSError, ssl.SSLError) as err:
            log.warning("mta_sts_fetch_failed", domain=domain, policy_id=wanted, error=str(err),
                        cached=self._in_force(entry) is not None)
            return
        entry.policy = msgspec.structs.replace(policy, id=wanted)
        entry.expires = self.loop.time() + policy.max_age
        log.info("mta_sts_policy", domain=domain, policy_id=wanted, mode=policy.mode,
                 mx=list(policy.mx), max_age=policy.max_age)
