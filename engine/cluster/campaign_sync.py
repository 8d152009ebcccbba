"""Campaign counters across the fleet: each node publishes its own, a reader sums them.

Redis (under `key_prefix`):
  camp:index      a set of the campaigns' local keys (engine/queue/campaigns.py
                  `campaign_key`: tenant | NUL | campaign)
  camp:c:KEY      a hash per campaign: field NODE → that node's msgpack CampaignCounts

A node's counters are the truth of its own LMDB (bumped in the transactions of the
mail they count), so a node publishes them whole rather than deltas: a lost or repeated
publish can never count twice. Every PUBLISH_EVERY the supervisor reads its campaigns
and sends those that changed since its last publish (HSET + SADD in one MULTI). A
node that leaves keeps its field: the mail it sent still counts.

`fleet_counts` (for `volley ctl campaigns --cluster`) publishes this node's figures
first, then sums every node's field of each campaign: the sum is as fresh as the
other nodes' last publish (at most PUBLISH_EVERY plus a heartbeat old).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from engine.cluster.link import LINK_ERRORS, ClusterLink, stop_tasks
from engine.cluster.link import call_loose as _call
from engine.cluster.loops import rounds
from engine.queue.campaigns import OUTCOMES, CampaignCounts, campaign_key
from engine.queue.store import QueueStore

Thread = Callable[..., Awaitable[Any]]
PUBLISH_EVERY = 1.0  # seconds
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(CampaignCounts)


class CampaignSync:
    def __init__(self, link: ClusterLink, store: QueueStore, run_in_thread: Thread) -> None:
        self.link = link
        self.store = store
        self._thread = run_in_thread
        self.index = link.key("camp", "index")
        self._prefix = link.key("camp", "c", "").encode()
        self._sent: dict[bytes, bytes] = {}  # what Redis has of ours, by campaign key
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Degraded, the next round sends what changed meanwhile.
        self._task = asyncio.create_task(
            rounds(self.publish, lambda: PUBLISH_EVERY, "cluster_campaigns_failed"), name="cluster-campaigns")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None

    async def publish(self) -> int:
        """Send this node's campaigns that changed since the last publish; returns how
        many. Raises a LINK_ERRORS error when Redis does not take them."""
        async with self._lock:
            rows: list[CampaignCounts] = await self._thread(self.store.campaigns, 1 << 62)
            changed: dict[bytes, bytes] = {}
            for c in rows:
                key = campaign_key(c.tenant, c.campaign)
                data = _enc.encode(c)
                if self._sent.get(key) != data:
                    changed[key] = data
            if not changed:
                return 0
            pipe = self.link.redis.pipeline(transaction=True)
            for key, data in changed.items():
                pipe.hset(self._prefix + key, self.link.node, data)
            pipe.sadd(self.index, *changed)
            await self.link.call(pipe.execute())
            self._sent.update(changed)
            return len(changed)

    async def fleet_counts(self, tenant: str | None, campaign: str | None,
                           limit: int) -> list[CampaignCounts]:
        """Every node's counters summed per campaign (of `tenant`, or one `campaign`),
        the most recently active first. Raises RuntimeError naming the cause when Redis
        does not answer (the caller shows it; local counts are `ctl campaigns`)."""
        try:
            await self.publish()
            if campaign is not None:
                keys = [campaign_key(tenant or "", campaign)]
            else:
                members: set[bytes] = await _call(self.link, self.link.redis.smembers(self.index))
                prefix = None if tenant is None else tenant.encode("utf-8", "surrogatepass") + b"\0"
                keys = sorted(k for k in members if prefix is None or k.startswith(prefix))
            pipe = self.link.redis.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(self._prefix + key)
            tables: list[dict[bytes, bytes]] = await _call(self.link, pipe.execute())
        except LINK_ERRORS as err:
            raise RuntimeError(f"redis not answering ({type(err).__name__}); "
                               "`volley ctl campaigns` without --cluster shows this node's") from None
        out = [total for total in map(_sum, tables) if total is not None]
        out.sort(key=lambda c: c.last_at, reverse=True)
        return out[:limit]


def _sum(table: dict[bytes, bytes]) -> CampaignCounts | None:
    """One campaign's counters summed over the nodes' fields."""
    total: CampaignCounts | None = None
    by_class: dict[str, int] = {}
    for raw in table.values():
        try:
            c = _dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if total is None:
            total = CampaignCounts(c.tenant, c.campaign, first_at=c.first_at)
        for name in OUTCOMES:
            setattr(total, name, getattr(total, name) + getattr(c, name))
        for cls, n in c.bounced_by_class.items():
            by_class[cls] = by_class.get(cls, 0) + n
        total.first_at = min(total.first_at or c.first_at, c.first_at or total.first_at)
        total.last_at = max(total.last_at, c.last_at)
    if total is not None:
        total.bounced_by_class = by_class
    return total
