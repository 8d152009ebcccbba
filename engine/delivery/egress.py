"""Which source address (and EHLO name) a job leaves from: the [[egress]] pools.

The pool, first that applies:
1. the message's own `egress_pool` (the HTTP API's field);
2. the first [[egress_rules]] entry whose `tenant` / `campaign` patterns match the
   message's (file order);
3. the domain's [[routes]] `egress_pool` (`PoolSettings.egress_pool`, from the planner);
4. "default".
A pool with no [[egress]] entry (only "default" can be one: config check refuses other
names) keeps the delivery settings (`delivery.source_address` and `helo_name`), so with
no [[egress]] at all nothing changes, and one entry in "default" moves all mail to it.

Within the pool, a source per job by smooth weighted round robin (nginx's: each pick
adds every weight to its source's credit and takes the total from the chosen one's),
so weights 3:1 send 3 jobs of 4 from the first, interleaved. A job, not a connection:
the source is part of the pool settings, and so of the site pool's key
(pool_manager.py), so each source has its own connections, and a provider's caps hold
per source address (provider_gate.py keys on it). Warm-up (warmup.py): a source whose
allowance for the job's provider is used up this hour is passed over for the pool's
others; when every source of the pool is held, the job is deferred (451 4.4.5) until
the next hour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec

from engine.config import Config
from engine.config.egress import DEFAULT_POOL
from engine.delivery.job import Job, JobResult, PoolSettings
from engine.delivery.warmup import Warmup, provider_of
from engine.observe import log
from engine.smtp.replies import Reply

_DERIVED_MAX = 4096  # (settings, source) pairs remembered before the memo starts again


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    address: str
    ehlo: str
    weight: int


@dataclass(slots=True)
class _Pool:
    sources: list[Source]
    credit: list[int] = field(default_factory=list)  # smooth WRR state, one per source


class EgressPools:
    """One worker's pools. Loop thread only."""

    def __init__(self, cfg: Config, warmup: Warmup | None = None) -> None:
        self.warmup = warmup
        self._derived: dict[tuple[int, str], tuple[PoolSettings, PoolSettings]] = {}
        self._unknown: set[str] = set()
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        default_ehlo = cfg.delivery.helo_name or cfg.server.hostname
        pools: dict[str, _Pool] = {}
        for e in cfg.egress:
            pools.setdefault(e.pool, _Pool([])).sources.append(
                Source(e.name, e.source_address, e.ehlo_name or default_ehlo, e.weight))
        for pool in pools.values():
            pool.credit = [0] * len(pool.sources)
        self.pools = pools
        self.rules = list(cfg.egress_rules)
        self.active = bool(pools)
        self._derived.clear()
        self._unknown.clear()
        if self.warmup is not None:
            self.warmup.configure(cfg)

    def pool_name(self, job: Job, settings: PoolSettings) -> str:
        """The job's pool (the order in the module's docstring)."""
        record = job.record
        if record.egress_pool:
            if record.egress_pool in self.pools or record.egress_pool == DEFAULT_POOL:
                return record.egress_pool
            if record.egress_pool not in self._unknown:  # gone since it was queued (reload)
                self._unknown.add(record.egress_pool)
                log.warning("egress_pool_unknown", pool=record.egress_pool, using=DEFAULT_POOL)
            return DEFAULT_POOL
        if record.tenant or record.campaign:
            for rule in self.rules:
                if rule.matches(record.tenant, record.campaign):
                    return rule.pool
        return settings.egress_pool or DEFAULT_POOL

    def choose(self, job: Job, settings: PoolSettings, mono: float, wall: float | None = None
               ) -> PoolSettings | JobResult:
        """`settings` bound to the source chosen for `job`, or the deferral of a job
        every source of its pool is held back from (warm-up). `mono`: loop.time() now,
        for the deferral's `retry_after`; `wall`: time.time() (None: the warm-up's clock)."""
        pool = self.pools.get(self.pool_name(job, settings))
        if pool is None:
            return settings
        source = self._pick(pool, provider_of(settings.provider), wall)
        if source is None:
            return self._held(job, settings, pool, mono, wall)
        return self._bind(settings, source)

    def _pick(self, pool: _Pool, provider: str, wall: float | None) -> Source | None:
        sources, credit = pool.sources, pool.credit
        warmup = self.warmup
        passed: set[int] = set()
        while len(passed) < len(sources):
            best, total = -1, 0
            for i, s in enumerate(sources):
                if i in passed:
                    continue
                total += s.weight
                if best < 0 or credit[i] + s.weight > credit[best] + sources[best].weight:
                    best = i
            chosen = sources[best]
            if warmup is None or warmup.take(chosen.address, provider, wall):
                for i, s in enumerate(sources):
                    if i not in passed:
                        credit[i] += s.weight
                credit[best] -= total
                return chosen
            passed.add(best)  # its allowance is used up: overflow to the others
        return None

    def _bind(self, settings: PoolSettings, source: Source) -> PoolSettings:
        key = (id(settings), source.address)
        memo = self._derived.get(key)
        if memo is not None and memo[0] is settings:
            return memo[1]
        derived = msgspec.structs.replace(settings, source_address=source.address,
                                          helo_name=source.ehlo, egress_pool="")
        if len(self._derived) >= _DERIVED_MAX:
            self._derived.clear()
        self._derived[key] = (settings, derived)
        return derived

    def _held(self, job: Job, settings: PoolSettings, pool: _Pool, mono: float,
              wall: float | None) -> JobResult:
        """RFC 3463 X.4.5 (system congestion): ours, and over when the hour is."""
        assert self.warmup is not None  # only warm-up holds a source back
        now = self.warmup.clock() if wall is None else wall
        next_hour = (math.floor(now / 3600) + 1) * 3600
        names = ", ".join(s.name for s in pool.sources)
        reply = Reply(451, "4.4.5", f"warm-up: the hourly allowance of {names} for "
                                    f"{provider_of(settings.provider)} is used up; retry next hour")
        return JobResult({i: reply for i in job.indices}, retry_after=mono + next_hour - now)
