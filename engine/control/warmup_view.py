"""`volley ctl warmup`, as the supervisor runs it: each [[egress]] source, its warm-up
day, and per provider the allowance this UTC hour, how much of it the workers used
(the shared table of engine/delivery/warmup_table.py, mapped read-only here) and the
headroom left.

The day comes from the [[warmup]] entry's `start`, else the first send's day that the
workers keep in the queue's control table; before the first send the source is on
day 1 and nothing is counted yet. The providers listed are the entry's `providers`, or
every [[shaping]] entry's name and "*" (mail that no entry matches).
"""

from __future__ import annotations

import asyncio
import datetime
import time

import msgspec

from engine.config import Config
from engine.config.egress import OTHER_PROVIDERS, allowance
from engine.control import replies
from engine.delivery.warmup import Plan, ReadControl, day_number, plans_of, start_key, utc_day
from engine.delivery.warmup_table import WarmupTable, table_path
from engine.queue.store import QueueStore


class WarmupProvider(msgspec.Struct, kw_only=True):
    provider: str  # a [[shaping]] entry's name, or "*"
    allowance: int | None  # messages this hour; None = no cap
    used: int  # counted this hour, all workers together
    headroom: int | None  # allowance - used (never below 0); None = no cap


class WarmupSource(msgspec.Struct, kw_only=True):
    name: str  # the [[egress]] entry
    address: str
    pool: str
    ehlo_name: str
    scheduled: bool  # a [[warmup]] entry names it
    start: str  # day 1, "YYYY-MM-DD" (UTC); "" = not sent yet
    start_from: str  # "config", "first send", "not sent yet"; "" when not scheduled
    day: int | None  # 1 = the first day; None when not scheduled
    schedule: list[str]
    providers: list[WarmupProvider]


class Warmup(replies.Reply, kw_only=True):
    hour: str  # the UTC hour the figures count, "2025-03-10T12:00Z"
    sources: list[WarmupSource]


async def warmup(cfg: Config, store: QueueStore) -> Warmup:
    return await asyncio.to_thread(build, cfg, store.get_control, time.time())


def build(cfg: Config, read: ReadControl, wall: float) -> Warmup:
    """The reply; `read(key)` reads the queue's control table (QueueStore.get_control)."""
    plans = plans_of(cfg)
    hour = int(wall // 3600)
    stamp = datetime.datetime.fromtimestamp(hour * 3600, datetime.UTC).strftime("%Y-%m-%dT%H:%MZ")
    schedules = {name: list(w.schedule) for w in cfg.warmup for name in w.sources}
    table = WarmupTable.open_readonly(table_path(cfg.queue.path))
    try:
        sources = []
        for e in cfg.egress:
            plan = plans.get(e.source_address)
            row = WarmupSource(name=e.name, address=e.source_address, pool=e.pool,
                               ehlo_name=e.ehlo_name or cfg.delivery.helo_name or cfg.server.hostname,
                               scheduled=plan is not None, start="", start_from="", day=None,
                               schedule=schedules.get(e.name, []), providers=[])
            if plan is not None:
                _fill(row, plan, cfg, read, table, wall, hour)
            sources.append(row)
    finally:
        if table is not None:
            table.close()
    return Warmup(hour=stamp, sources=sources)


def _fill(row: WarmupSource, plan: Plan, cfg: Config, read: ReadControl, table: WarmupTable | None,
          wall: float, hour: int) -> None:
    start = plan.start
    row.start_from = "config"
    if start is None:
        kept = read(start_key(plan.address))
        row.start_from = "first send" if kept else "not sent yet"
        try:
            start = datetime.date.fromisoformat(kept.decode()) if kept else None
        except ValueError:
            start = None
    row.start = start.isoformat() if start is not None else ""
    row.day = day_number(start, utc_day(wall)) if start is not None else 1
    cap = allowance(plan.steps, row.day)
    providers = sorted(plan.providers) or [s.label for s in cfg.shaping] + [OTHER_PROVIDERS]
    for provider in providers:
        used = table.used(plan.address, provider, hour) if table is not None else 0
        row.providers.append(WarmupProvider(
            provider=provider, allowance=cap, used=used,
            headroom=None if cap is None else max(0, cap - used)))
