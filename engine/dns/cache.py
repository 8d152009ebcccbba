"""The worker's DNS cache: MX plans from cached answers, single-flight, bounded.

What is cached is the *answers* (one MX answer per domain, one address answer per host
name), not the `Route`: `route()` rebuilds the route from them on every call so the
shuffle of equal preferences (RFC 5321 §5.1) differs per call even on a hit, and MX
hosts shared by many domains (one provider hosting thousands of domains) are resolved
once. A route is therefore valid exactly as long as the shortest-lived answer it used.

Lifetimes (ARCHITECTURE rule 11):
- positive answers: the RRset TTL, clamped to [min_ttl, max_ttl];
- negative answers (NXDOMAIN, NODATA): the RFC 2308 §5 negative TTL (min of the SOA's
  TTL and MINIMUM), clamped to [min_ttl, negative_ttl_max];
- failures (SERVFAIL, timeout): `failure_ttl` (5 s by default, 0 disables). Long enough
  that a burst of recipients for a broken domain costs one query rather than one per
  recipient (they all defer with 4.4.3 anyway), short enough that a recovered zone is
  seen on the next retry. RFC 2308 §7.1 allows caching server failures for up to 5 min.

Concurrent lookups of one name share one query (single flight): the first caller starts
it as a task, the others await the same task. A waiter that is cancelled does not
cancel the query (it is shielded), so the others still get their answer.
The size is bounded (`max_entries`, least recently used evicted first).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from engine.dns.mx import Answer, Route, RouteError, Status, build_route, hosts_to_resolve, norm_domain
from engine.dns.resolver import Resolver

_MX = "mx"
_ADDR = "addr"
_Key = tuple[str, str]  # (kind, name)


class CacheStats(msgspec.Struct):
    """Counters since start. `hits`/`misses` count answer lookups (one MX answer, and one
    address answer per MX host, per `route()`); `coalesced` counts misses that joined a
    query already in flight; `queries` counts resolver calls (an address call is one A
    and one AAAA query); `failures` counts calls that ended in SERVFAIL or timeout."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    queries: int = 0
    failures: int = 0
    evictions: int = 0


class _Entry(msgspec.Struct, frozen=True):
    answer: Answer
    expires: float  # on the cache's clock


class DnsCache:
    """MX routes for one worker, from a shared, bounded, single-flight answer cache.

    All methods must be called from the event loop that runs `route()`; nothing here
    is thread-safe.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        min_ttl: float = 60,
        max_ttl: float = 3600,
        negative_ttl_max: float = 900,
        failure_ttl: float = 5,
        max_entries: int = 100_000,
        max_mx_hosts: int = 16,
        local: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """`local`: this relay's host names and IPs, for MX loop detection (mx.py).
        `max_mx_hosts`: resolve at most this many of the most preferred MX hosts, so a
        huge MX RRset cannot fan out into hundreds of queries (rule 8)."""
        if max_entries < 1:
            raise ValueError("max_entries: must be at least 1")
        self._resolver = resolver
        self._min_ttl = float(min_ttl)
        self._max_ttl = float(max_ttl)
        self._negative_ttl_max = float(negative_ttl_max)
        self._failure_ttl = float(failure_ttl)
        self._max_entries = max_entries
        self._max_mx_hosts = max_mx_hosts
        self._local = frozenset(norm_domain(x) for x in local)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[_Entry]] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def route_now(self, domain: str) -> Route | RouteError | None:
        """`route(domain)` when every answer it needs is cached and fresh (counted as
        hits), else None. No coroutine, no task: a relay mailing 10,000 domains asks
        this once per message, and a task per lookup was a tenth of its CPU."""
        name = norm_domain(domain)
        fresh = self._fresh(name)
        if fresh is None:
            return None
        mx_answer, answers, _ = fresh
        entries = self._entries
        entries.move_to_end((_MX, name))
        for host in answers:
            entries.move_to_end((_ADDR, host))
        self.stats.hits += 1 + len(answers)
        return build_route(name, mx_answer, answers, self._rng, local=self._local)

    async def route(self, domain: str) -> Route | RouteError:
        """The delivery plan for `domain`: a `Route`, or a `RouteError` whose reply says
        bounce (5xx) or defer (4xx). Never raises for DNS outcomes; cancelling the caller
        leaves queries in flight running for the other waiters (bounded by the resolver
        timeout). Worst case two resolver timeouts: MX, then all hosts concurrently."""
        name = norm_domain(domain)
        mx_entry = await self._lookup(_MX, name)
        hosts = hosts_to_resolve(name, mx_entry.answer, self._max_mx_hosts)
        entries = await asyncio.gather(*(self._lookup(_ADDR, host) for host in hosts))
        answers = {host: entry.answer for host, entry in zip(hosts, entries)}
        return build_route(name, mx_entry.answer, answers, self._rng, local=self._local)

    def peek(self, domain: str) -> tuple[Route | RouteError, float] | None:
        """The cached plan for `domain` and its remaining seconds, or None if any answer
        it needs is absent or expired. No query, no counter or LRU change; the order
        shown is one fixed shuffle (for `volley ctl mx`)."""
        name = norm_domain(domain)
        fresh = self._fresh(name)
        if fresh is None:
            return None
        mx_answer, answers, expires = fresh
        plan = build_route(name, mx_answer, answers, random.Random(0), local=self._local)
        return plan, expires - self._clock()

    def _fresh(self, name: str) -> tuple[Answer, dict[str, Answer], float] | None:
        """The MX answer of `name` and the address answers it needs, with the soonest
        expiry among them, if all are cached and fresh; touches nothing."""
        now = self._clock()
        entries = self._entries
        mx_entry = entries.get((_MX, name))
        if mx_entry is None or mx_entry.expires <= now:
            return None
        expires = mx_entry.expires
        answers: dict[str, Answer] = {}
        for host in hosts_to_resolve(name, mx_entry.answer, self._max_mx_hosts):
            entry = entries.get((_ADDR, host))
            if entry is None or entry.expires <= now:
                return None
            answers[host] = entry.answer
            expires = min(expires, entry.expires)
        return mx_entry.answer, answers, expires

    def flush(self, domain: str | None = None) -> int:
        """Forget everything (None), or the MX answer of `domain` together with the
        address answers it led to (its MX hosts, or the domain itself). Returns the
        number of entries removed. Lookups in flight are not affected."""
        if domain is None:
            count = len(self._entries)
            self._entries.clear()
            return count
        name = norm_domain(domain)
        keys: set[_Key] = {(_MX, name), (_ADDR, name)}
        mx_entry = self._entries.get((_MX, name))
        if mx_entry is not None:
            keys.update((_ADDR, h) for h in hosts_to_resolve(name, mx_entry.answer, self._max_mx_hosts))
        return sum(self._entries.pop(key, None) is not None for key in keys)

    # --- internals ---------------------------------------------------------------------

    async def _lookup(self, kind: str, name: str) -> _Entry:
        key = (kind, name)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires > self._clock():
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry
            del self._entries[key]
        self.stats.misses += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(kind, name))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        else:
            self.stats.coalesced += 1
        return await asyncio.shield(task)

    def _done(self, key: _Key, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an abandoned failure is not logged twice

    async def _fetch(self, kind: str, name: str) -> _Entry:
        self.stats.queries += 1
        if kind == _MX:
            answer = await self._resolver.mx(name)
        else:
            answer = await self._resolver.addresses(name)
        lifetime = self._lifetime(answer)
        entry = _Entry(answer, self._clock() + lifetime)
        if answer.status.is_failure:
            self.stats.failures += 1
        if lifetime > 0:
            self._store((kind, name), entry)
        return entry

    def _lifetime(self, answer: Answer) -> float:
        if answer.status is Status.OK:
            return min(max(float(answer.ttl), self._min_ttl), self._max_ttl)
        if answer.status.is_failure:
            return self._failure_ttl
        # RFC 2308 §5: negative answers live for the SOA-derived TTL, which the resolver
        # computed; clamp it like any other, with its own (lower) ceiling.
        return min(max(float(answer.ttl), self._min_ttl), self._negative_ttl_max)

    def _store(self, key: _Key, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
