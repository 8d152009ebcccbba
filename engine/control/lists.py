"""The suppression list and campaign counters as the supervisor serves them.

`suppress_add` writes one request's values (at most protocol.MAX_VALUES, one chunk of an
import) in write transactions of `WRITE_SLICE` entries on the supervisor's own handle of
the queue, in a thread, each flushed under "fsync" before the next, like the bulk changes
(engine/control/bulk.py): the workers' commits take the write lock between slices. The
reads run in a thread in one short read transaction each.

The metrics families are read from LMDB at scrape time: the counters there are the
truth, every worker's commits included, with nothing to merge.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from engine.control import protocol, replies
from engine.errors import QueueFull
from engine.observe.metrics import Gauge, gauge
from engine.queue import campaigns, suppression
from engine.queue.store import QueueStore, WriteTxn

_T = TypeVar("_T")
Runner = Callable[..., Awaitable[Any]]
CAMPAIGN_FAMILY = "volley_campaign_messages_total"
# In a cluster: local changes of the suppression list waiting for Redis (the outbox,
# engine/queue/supp_outbox.py); above 0 for long means the fleet has not heard of them.
OUTBOX_FAMILY = "volley_cluster_suppression_outbox"
# Entries per write transaction of an import chunk. LMDB has one write lock for every
# process: a whole 10,000-value chunk held it ~170 ms, long enough for the workers' group
# commits (intake and outcomes) to queue behind it, and delivery ran at about half its
# rate during a 1,000,000-line import (bench/suppress_live.py). 1,000 holds it ~15 ms.
WRITE_SLICE = 1000


def _request_error(err: ValueError) -> protocol.RequestError:
    return protocol.RequestError(str(err))


class Lists:
    """Handlers of suppress_add, suppress_remove, suppress_list and campaigns."""

    def __init__(self, store: QueueStore, run_in_thread: Runner) -> None:
        self.store = store
        self._thread = run_in_thread
        # In a cluster, the supervisor sets this (engine/cluster/campaign_sync.py):
        # (tenant, campaign, limit) -> every node's counters summed, for --cluster.
        self.fleet_campaigns: Callable[[str | None, str | None, int],
                                       Awaitable[list[campaigns.CampaignCounts]]] | None = None
        # In a cluster: called after an operator's change of the list committed, so the
        # supervisor sends the outbox at once instead of at its next look.
        self.on_change: Callable[[], None] | None = None

    async def handle(self, req: protocol.SuppressAdd | protocol.SuppressRemove
                     | protocol.SuppressList | protocol.Campaigns, peer: str) -> replies.Reply:
        if isinstance(req, protocol.SuppressAdd):
            return await self.add_values(req, peer)
        if isinstance(req, protocol.SuppressRemove):
            return await self.remove_value(req)
        if isinstance(req, protocol.SuppressList):
            return await self.list_entries(req)
        return await self.campaign_counts(req)

    def _commit(self, op: Callable[[WriteTxn], _T]) -> _T:
        """One write transaction, flushed under "fsync" before the reply says done (P1)."""
        (res,) = self.store.write([op])
        if isinstance(res, BaseException):
            raise res
        if self.store.durability == "fsync":
            self.store.sync()
        return res  # type: ignore[return-value]  # not an exception: what `op` returned

    async def add_values(self, req: protocol.SuppressAdd, peer: str) -> replies.SuppressAdd:
        if req.reason not in suppression.REASONS:
            raise protocol.RequestError(
                f"reason: expected one of {', '.join(suppression.REASONS)}, got {req.reason!r}")
        try:
            suppression.check_tenant(req.tenant)
        except ValueError as err:
            raise _request_error(err) from None
        now = time.time()
        source = req.source or f"ctl by {peer}"
        entries: list[suppression.Suppression] = []
        bad: list[replies.BadValue] = []
        for i, value in enumerate(req.values):
            try:
                entries.append(suppression.make(value, req.reason, source=source, created=now,
                                                tenant=req.tenant))
            except ValueError as err:
                bad.append(replies.BadValue(index=i, value=value[:200], error=str(err)))
        added = 0
        for start in range(0, len(entries), WRITE_SLICE):
            part = entries[start:start + WRITE_SLICE]
            try:
                added += await self._thread(self._commit, lambda w, part=part: suppression.add(
                    w, part, headroom=False))
            except QueueFull as err:
                raise protocol.RequestError(
                    f"queue store full after {added} of this chunk's values were added: {err}") from None
        if added and self.on_change is not None:
            self.on_change()
        return replies.SuppressAdd(added=added, present=len(entries) - added, bad=bad)

    async def remove_value(self, req: protocol.SuppressRemove) -> replies.SuppressRemove:
        try:
            suppression.normalize(req.value)
            suppression.check_tenant(req.tenant)
        except ValueError as err:
            raise _request_error(err) from None
        removed = await self._thread(self._commit, lambda w: suppression.remove(
            w, req.value, req.tenant))
        if removed and self.on_change is not None:
            self.on_change()
        return replies.SuppressRemove(removed=removed)

    async def list_entries(self, req: protocol.SuppressList) -> replies.SuppressList:
        if req.after:
            try:
                suppression.normalize(req.after)
            except ValueError as err:
                raise protocol.RequestError(f"after: {err}") from None

        def read() -> tuple[list[suppression.Suppression], int]:
            rows = self.store.suppression_list(req.after, req.limit + 1, req.tenant,
                                               after_tenant=req.after_tenant)
            return rows, self.store.suppression_count()

        rows, total = await self._thread(read)
        more = len(rows) > req.limit
        rows = rows[:req.limit]
        last = rows[-1] if more else None
        return replies.SuppressList(entries=rows, next=last.value if last else "",
                                    next_tenant=last.tenant if last else "", total=total)

    async def campaign_counts(self, req: protocol.Campaigns) -> replies.Campaigns:
        if req.cluster:
            return await self._fleet_counts(req)
        if req.campaign is not None:
            try:
                one = await self._thread(self.store.campaign, req.tenant or "", req.campaign)
            except ValueError as err:
                raise _request_error(err) from None
            return replies.Campaigns(campaigns=[one] if one else [])
        rows = await self._thread(self.store.campaigns, req.limit, req.tenant)
        return replies.Campaigns(campaigns=rows)

    async def _fleet_counts(self, req: protocol.Campaigns) -> replies.Campaigns:
        if self.fleet_campaigns is None:
            raise protocol.RequestError(
                "campaigns --cluster: this node is not in a cluster ([cluster] redis is not set)")
        try:
            rows = await self.fleet_campaigns(req.tenant, req.campaign, req.limit)
        except (RuntimeError, ValueError) as err:
            raise protocol.RequestError(f"campaigns --cluster: {err}") from None
        return replies.Campaigns(campaigns=rows)

    def gauges(self, top: int) -> list[Gauge]:
        """The campaign and suppression families, read now (call it in a thread): the
        `top` most recently active campaigns one by one, the rest summed as
        campaign="other" (bounded cardinality). Raises StorageError."""
        out = [gauge("volley_suppression_entries", self.store.suppression_count())]
        if self.fleet_campaigns is not None:  # in a cluster: changes not yet in Redis
            out.append(gauge(OUTBOX_FAMILY, self.store.supp_outbox_count()))
        everything = self.store.campaigns(limit=1 << 62)
        for c in campaigns.summarize(everything, top):
            labels = {"tenant": c.tenant, "campaign": c.campaign}
            for outcome in campaigns.OUTCOMES:
                out.append(gauge(CAMPAIGN_FAMILY, getattr(c, outcome),
                                 {**labels, "outcome": outcome}))
        return out
