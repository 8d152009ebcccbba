"""One worker's delivery side, assembled: resolver, MX cache, site pools, delivery
log and the scheduler for the worker's shard of the queue; and what the worker's
control handler asks of it (holds, flush, the MX cache, live state).

Times on the control wire are epoch seconds; pools keep `loop.time()`, converted here.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from engine.config import Config
from engine.delivery.budget import ConnectionBudget
from engine.delivery.dns_share import AnswerTable, SharingResolver
from engine.delivery.dns_share import table_path as answers_path
from engine.delivery.egress import EgressPools
from engine.delivery.holds import Holds
from engine.delivery.pool import PoolStats, SitePool
from engine.delivery.pool_manager import PoolManager
from engine.delivery.reactions import ReactionBook
from engine.delivery.routing import worker_share
from engine.delivery.scheduler import Scheduler
from engine.delivery.shared_limits import LimitTable, table_path
from engine.delivery.site_slots import SiteTable
from engine.delivery.site_slots import table_path as site_table_path
from engine.delivery.warmup import Warmup
from engine.delivery.warmup_table import WarmupTable
from engine.delivery.warmup_table import table_path as warmup_table_path
from engine.dns.cache import DnsCache
from engine.dns.mx import Route, norm_domain
from engine.observe import log
from engine.observe.delivery_log import DeliveryLog
from engine.queue.committer import QueueCommitter
from engine.queue.ids import IdAllocator
from engine.queue.store import QueueStore
from engine.smtp.replies import Reply

# Pools idle past their idle_timeout are looked for (and dropped) this often; idle
# sessions need no sweep: each has its own timer.
_IDLE_SWEEP = 1.0
# Pools listed in `live_state` (busiest first): a worker delivering to thousands of
# sites must not push megabytes a second over its control pipe.
MAX_POOLS_SHOWN = 200


class Delivery:
    def __init__(self, cfg: Config, *, store: QueueStore, committer: QueueCommitter,
                 ids: IdAllocator, owner: int, local: set[tuple[str, int]],
                 workers: int = 1) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        d = cfg.dns
        # What one worker learns from DNS, the others read (dns_share.py): every worker
        # delivers a share of every domain, so each would otherwise look it up again.
        self.answers = AnswerTable.open(answers_path(cfg.queue.path))
        self.resolver = SharingResolver(list(d.nameservers), float(d.timeout), self.answers)
        self.dns = DnsCache(
            self.resolver, min_ttl=float(d.min_ttl), max_ttl=float(d.max_ttl),
            negative_ttl_max=float(d.negative_ttl_max), failure_ttl=float(d.failure_ttl),
            max_entries=d.cache_size,
            # Loop detection by name (RFC 5321 §5.1): an MX that is our own host name is
            # us even when its address is not one of our listeners' (NAT, a proxy), which
            # the scheduler's (ip, port) check cannot see.
            local=frozenset({cfg.server.hostname}) if cfg.server.hostname else frozenset(),
        )
        self.workers = max(1, workers)
        self.budget = ConnectionBudget(self._budget_share(cfg))
        # [[shaping]] limits held across workers (shared_limits.py); our column is our slot.
        self.limits = LimitTable.open(table_path(cfg.queue.path), owner, self.workers)
        # Each site's connections across workers: a hot domain is delivered by every
        # worker (queue layout format 4), its cap holds for all of them.
        self.sites = SiteTable.open(site_table_path(cfg.queue.path), owner, self.workers)
        # [[egress]] sources and their warm-up counts, held across workers likewise.
        self.warmup_table = WarmupTable.open(warmup_table_path(cfg.queue.path))
        self.egress = EgressPools(cfg, Warmup(self.warmup_table, store.get_control,
                                              lambda op: committer.submit(op, _ignore)))
        self.pools = PoolManager(cfg.delivery.timeouts, loop, self.budget, sweep_interval=_IDLE_SWEEP,
                                 limits=self.limits, column=owner, egress=self.egress,
                                 workers=self.workers, sites=self.sites)
        # [[reactions]] to what providers say, in force through the same table.
        self.reactions = ReactionBook(self.limits, loop)
        self.reactions.configure(cfg.reactions)
        self.pools.gates.book = self.reactions
        self.dlog = DeliveryLog(cfg.log.delivery, loop)
        self.scheduler = Scheduler(cfg, store=store, committer=committer, ids=ids,
                                   dns=self.dns, resolver=self.resolver, pools=self.pools, owner=owner,
                                   dlog=self.dlog, local=local)

    def start(self) -> None:
        self.scheduler.start()

    def _budget_share(self, cfg: Config) -> int:
        # Each worker takes its share of the server-wide cap, as the inbound limits do.
        return max(1, math.ceil(cfg.delivery.max_connections / self.workers))

    def apply_config(self, cfg: Config) -> None:
        self.budget.resize(self._budget_share(cfg))
        self.reactions.configure(cfg.reactions)
        self.pools.gates.reconfigure()
        self.egress.configure(cfg)
        self.scheduler.apply_config(cfg)

    async def stop(self, grace: float) -> None:
        """Let transactions in flight finish within `grace`, then close every pool;
        jobs never started stay due in the queue for the next start."""
        await self.scheduler.stop(grace / 2)
        await self.pools.close(grace / 2)
        await self.scheduler.stop(1.0)
        await self.dlog.close()
        self.limits.close()
        self.sites.close()
        self.warmup_table.close()
        self.answers.close()

    # --- control -------------------------------------------------------------------------
    def set_holds(self, holds: Holds) -> None:
        """The operator's suspensions and throttles (the whole table, see holds.py)."""
        self.scheduler.set_holds(worker_share(holds, self.workers))

    def flush(self, domain: str | None = None) -> int:
        """End the backoff of every pool serving `domain` (all pools if None), forget
        memoised routes and scan now. Returns the number of pools that were backing off.

        Re-dating the queue's entries is the caller's (through the store); call this
        before that too, or an entry made due while its pool still backs off is
        deferred again until the backoff's end."""
        if domain is None:
            pools = list(self.pools.pools.values())
        else:
            domain = norm_domain(domain)
            cached = self.dns.peek(domain)
            pools = self.pools.serving(domain, cached[0] if cached and isinstance(cached[0], Route) else None)
        ended = sum(pool.end_backoff() for pool in pools)
        self.scheduler.forget_routes()
        self.scheduler.rescan()
        return ended

    def lift(self, provider: str) -> list[str]:
        """The operator lifted `provider`'s reactions: its pools connect again now;
        returns the domains whose mail its suspension deferred (the caller makes it due)."""
        for pool in self.pools.pools.values():
            if pool.settings.provider == provider:
                pool.end_backoff()
        self.scheduler.rescan()
        return self.reactions.lift(provider)

    def mx(self, domain: str) -> dict[str, Any]:
        """What the MX cache holds for `domain` (no query): kind "route" with the hosts
        in the order they would be tried, "error" with the reply that decides the mail,
        or "none" when nothing (or only part of it) is cached."""
        name = norm_domain(domain)
        out: dict[str, Any] = {"domain": name, "kind": "none", "hosts": [], "reply": "",
                               "ttl": 0.0}
        cached = self.dns.peek(name)
        if cached is None:
            return out
        plan, ttl = cached
        out["ttl"] = round(ttl, 1)
        if isinstance(plan, Route):
            out["kind"] = "route"
            out["hosts"] = [{"name": h.name, "preference": h.preference,
                             "addresses": list(h.addresses)} for h in plan.hosts]
        else:
            out["kind"] = "error"
            out["reply"] = reply_text(plan.reply)
        return out

    def mx_flush(self, domain: str | None = None) -> int:
        """Forget cached DNS answers for `domain` (all if None) and the route memo;
        returns the number of cache entries removed."""
        if domain is None:
            self.answers.clear()
        else:
            self.answers.forget_domain(norm_domain(domain))
        removed = self.dns.flush(domain)
        self.scheduler.forget_routes()
        return removed

    def live_state(self) -> dict[str, Any]:
        """Figures for `volley ctl status` (see the README, "Control socket")."""
        mono, wall = self.loop.time(), time.time()
        # PoolStats is built per call: once per pool here (pushed every second).
        pools = [(p, p.stats) for p in self.pools.pools.values()]
        shown = sorted(pools, key=lambda ps: -(ps[1].connections_open + ps[1].jobs_queued))
        rows = [_pool_row(p, st, mono, wall) for p, st in shown[:MAX_POOLS_SHOWN]]
        backoffs = [{"site": p.site_key, "domains": p.recent_domains,
                     "until": round(wall + st.backoff_until - mono, 3),
                     "reply": reply_text(p.backoff_reply)}
                    for p, st in pools if st.backoff_until > 0]
        return {
            "sessions_out": sum(st.connections_open for _, st in pools),
            "inflight": len(self.scheduler.inflight),
            "queued_jobs": sum(st.jobs_queued for _, st in pools),
            "pools": rows,
            "pools_total": len(pools),
            "connection_budget": {"limit": self.budget.limit, "used": self.budget.used,
                                  "waiting": self.budget.waiting},
            "backoffs": backoffs,
        }


def _pool_row(pool: SitePool, st: PoolStats, mono: float, wall: float) -> dict[str, Any]:
    s = pool.settings
    backing_off = st.backoff_until > 0
    return {
        "site": pool.site_key, "domain": s.only_domain, "domains": pool.recent_domains,
        "open": st.connections_open,
        "queued": st.jobs_queued, "limit": st.concurrency_limit, "sent": st.messages_sent,
        "max_connections": s.max_connections, "rate": s.rate, "provider": s.provider,
        "source": s.source_address,
        "backoff_until": round(wall + st.backoff_until - mono, 3) if backing_off else None,
        "backoff_reply": reply_text(pool.backoff_reply) if backing_off else "",
    }


def _ignore(result: object) -> None:
    """The callback of the warm-up's first-send write: on a failure the day is counted
    from this worker's memory (until its restart)."""
    if isinstance(result, BaseException):
        log.error("warmup_start_write_failed", error=repr(result))


def reply_text(reply: Reply) -> str:
    """One line: "421 4.4.1 text" (multi-line texts joined by spaces)."""
    parts = [str(reply.code)] + ([reply.enhanced] if reply.enhanced else []) + list(reply.lines)
    return " ".join(parts)
