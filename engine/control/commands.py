"""The control commands, as the supervisor runs them.

Reads of the queue (status, queue, list, show) and bulk changes (flush, bounce,
delete, resume) run in a thread on the supervisor's own handle of the shared LMDB
queue, in short transactions, so neither the supervisor's loop nor the workers'
commits wait on them. Changes of delivery (suspend, resume, throttle, flush) are
saved in the store when they must survive a restart, then pushed to every worker
over its control pipe: they take effect at the worker's next scan (milliseconds).

ControlPlane dispatches every request and answers the reads; the steering commands
(suspend, resume, throttle, flush, bounce, delete) are in commands_steering.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar, assert_never

import msgspec

from engine.control import (
    drain_to,
    protocol,
    queue_view,
    replies,
    shaping_view,
    warmup_view,
    wire,
)
from engine.control.commands_steering import (
    Steering,
    parse_id,
    request_peer,
    suspension_row,
    throttle_row,
)
from engine.control.fleet import Fleet
from engine.control.lists import Lists
from engine.control.message_view import domain_key
from engine.control.reactions_view import ReactionsPlane
from engine.control.supervisor_api import SupervisorHandle
from engine.delivery.holds import (
    HOLDS_KEY,
    Holds,
    Suspension,
    decode_holds,
    encode_holds,
)
from engine.observe import log
from engine.observe.metrics import gauge, render
from engine.queue.ids import IdAllocator
from engine.queue.store import QueueStore
from engine.version import __version__

_T = TypeVar("_T")
_P = ParamSpec("_P")
_READS = (protocol.Status, protocol.Queue, protocol.List, protocol.Show, protocol.Metrics,
          protocol.SuppressList, protocol.Campaigns, protocol.Shaping, protocol.Warmup)
WORKER_ANSWER = 5.0  # seconds to wait for a worker's answer (mx)
# What metrics scrapes show before the first walk of the queue.
_NO_COUNTS = replies.QueueCounts(messages=0, units=0, bytes=0, ready=0, deferred=0, suspended=0)


class ControlPlane(Steering):
    def __init__(self, sup: SupervisorHandle, store: QueueStore) -> None:
        self.sup = sup
        self.store = store
        self.fleet = Fleet()
        self.holds = self._load_holds()
        self.ids = IdAllocator(store.next_boot())  # for DSNs of operator bounces
        self.started = time.time()
        self._totals: tuple[float, replies.QueueCounts] | None = None
        self.lists = Lists(store, self._thread)  # suppression list and campaign counters
        self.reactions = ReactionsPlane(sup, store, self._thread)  # [[reactions]] in force
        # Set by the supervisor in a cluster (engine/cluster/holds_sync.py): told of every
        # operator's suspend/resume here (None = resumed) and every reaction lifted by
        # name, so the fleet applies them too. Changes applied FROM the fleet
        # (`apply_remote_suspension`) do not call it: no echo.
        self.on_suspension: Callable[[str, Suspension | None], None] | None = None
        self.on_lift: Callable[[str], None] | None = None
        self.handing: drain_to.HandoverRun | None = None  # the last `drain --to`

    async def _hold_delivery(self, held: bool) -> None:
        self.holds.delivery_held = held
        await self._save_holds()

    async def handle(self, req: protocol.AnyRequest, peer: str = "unknown") -> replies.Reply:
        # A drain --to's progress polls (start false) change nothing: not audited.
        if not isinstance(req, _READS) and not (isinstance(req, protocol.Drain) and not req.start):
            # An audit trail of every change: what, by whom (SO_PEERCRED).
            audit = msgspec.to_builtins(req)
            if audit.get("password"):  # drain --to --user: never in the log
                audit["password"] = "(hidden)"
            log.info("control_command", peer=peer, request=audit)
        request_peer.set(peer)
        match req:
            case protocol.Status():
                return await self.status(req)
            case protocol.Queue():
                return await self.queue(req)
            case protocol.List():
                return await self.list(req)
            case protocol.Show():
                return await self.show(req)
            case protocol.Mx():
                return await self.mx(req)
            case protocol.Metrics():
                return await self.metrics(req)
            case protocol.Suspend():
                return await self.suspend(req)
            case protocol.Resume():
                return await self.resume(req)
            case protocol.Throttle():
                return await self.throttle(req)
            case protocol.Flush():
                return await self.flush(req)
            case protocol.Bounce():
                return await self.bounce(req)
            case protocol.Delete():
                return await self.delete(req)
            case protocol.Reload():
                return await self.reload(req)
            case protocol.Drain():
                return await self.drain(req)
            case protocol.Shutdown():
                return await self.shutdown(req)
            case protocol.Shaping():
                return await shaping_view.shaping(self.sup, req)
            case protocol.Warmup():
                return await warmup_view.warmup(self.sup.cfg, self.store)
            case (protocol.SuppressAdd() | protocol.SuppressRemove() | protocol.SuppressList()
                  | protocol.Campaigns()):
                return await self.lists.handle(req, peer)
            case _:
                assert_never(req)

    # --- plumbing ----------------------------------------------------------------------
    async def _thread(self, fn: Callable[_P, _T], *args: _P.args, **kw: _P.kwargs) -> _T:
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(fn, *args, **kw))

    def _load_holds(self) -> Holds:
        raw = self.store.get_control(HOLDS_KEY)
        holds = decode_holds(raw) if raw else Holds()
        if holds.delivery_held:  # a `drain --to` ended by a crash: its run is gone
            holds.delivery_held = False
            self.store.put_control(HOLDS_KEY, encode_holds(holds))  # before any worker reads it
        return holds

    async def _save_holds(self) -> None:
        await self._thread(self.store.put_control, HOLDS_KEY, encode_holds(self.holds))
        self.sup.broadcast(wire.SetHolds(holds=self.holds))

    def suspended(self, now: float) -> dict[str, Suspension]:
        in_force = {d: s for d, s in self.holds.suspensions.items() if s.in_force(now)}
        for b in self.fleet.backoffs():  # automatic suspensions, with the reply that caused them
            for domain in b.domains:
                in_force.setdefault(domain, Suspension(domain, since=0.0, until=b.until,
                                                       reason=b.reply, by="backoff"))
        return in_force

    async def expire_holds(self) -> None:
        """Drop suspensions whose time is up (called every second by the supervisor)."""
        gone = self.holds.expired(time.time())
        if gone:
            for domain in gone:
                self.holds.suspensions.pop(domain, None)
            log.info("suspension_ended", domains=gone)
            await self._save_holds()

    # --- reading ---------------------------------------------------------------------
    async def _walked_totals(self) -> replies.QueueCounts:
        """Queue totals by state, from a walk of the due index reused for ten times
        what it cost (a million entries: ~0.5 s, reused 5 s; a small queue: always
        fresh), so polling `status` never costs the server more than a tenth of a core.
        Its "messages" is the count as of the walk."""
        now = time.monotonic()
        if self._totals is None or now > self._totals[0]:
            wall = time.time()
            totals = await self._thread(queue_view.totals, self.store, wall, self.suspended(wall))
            self._totals = (time.monotonic() + 10 * (time.monotonic() - now), totals)
        return self._totals[1]

    async def status(self, req: protocol.Status) -> replies.Status:
        now = time.time()
        mono = time.monotonic()
        fleet = self.fleet
        held = self.suspended(now)
        workers = []
        for s in self.sup.slots:
            live = fleet.live(s.slot)
            budget = live.connection_budget
            pid = s.pid
            workers.append(replies.WorkerRow(
                slot=s.slot, pid=pid, age=round(mono - s.started_at, 1) if pid is not None else None,
                restarts=s.restarts, sessions_in=live.sessions_in, sessions_out=live.sessions_out,
                inflight=live.inflight,
                out_limit=budget.limit if budget else None, out_waiting=budget.waiting if budget else 0,
            ))
        # The message count is always exact (an O(1) read), the rest from the last walk.
        queue = msgspec.structs.replace(await self._walked_totals(),
                                        messages=await self._thread(self.store.count))
        return replies.Status(
            version=__version__, pid=os.getpid(), uptime=round(now - self.started, 1),
            hostname=self.sup.cfg.server.hostname, listeners=self.sup.addresses,
            draining=self.sup.draining, workers=workers,
            queue=queue, rates=fleet.rates.rates(mono),
            suspensions=[suspension_row(s) for s in held.values()],
            throttles=[throttle_row(t) for t in self.holds.throttles.values()],
            backoffs=fleet.backoffs(), reactions=self.reactions.rows(now),
            pools=[{**row, "worker": s.slot} for s in self.sup.slots for row in fleet.live(s.slot).pools],
            cluster=self.sup.cluster_status(),
        )

    async def queue(self, req: protocol.Queue) -> replies.Queue:
        now = time.time()
        held = self.suspended(now)
        shape = await self._thread(queue_view.summary, self.store, by=req.by, limit=req.limit,
                                   now=now, suspended=held)
        if req.by == "domain":
            for row in shape.rows:
                s = held.get(row.key)
                if s is not None and isinstance(row, replies.ShapeRow):
                    row.reason, row.until, row.by_who = s.reason, s.until, s.by
        return shape

    async def list(self, req: protocol.List) -> replies.List:
        now = time.time()
        if req.after:
            parse_id(req.after, "after")
        return await self._thread(
            queue_view.list_messages, self.store, domain=req.domain, sender=req.sender,
            state=req.state, limit=req.limit, after=req.after,
            suspended=self.suspended(now))

    async def show(self, req: protocol.Show) -> replies.Show:
        now = time.time()
        message = await self._thread(queue_view.show, self.store, parse_id(req.id, "id"),
                                     suspended=self.suspended(now))
        if message is None:
            raise protocol.RequestError(f"no queued message {req.id}")
        return replies.Show(message=message)

    async def mx(self, req: protocol.Mx) -> replies.MxFlushed | replies.MxEntries:
        domain = domain_key(req.domain)
        if req.flush:
            query = wire.MxQuery(domain=domain or None, flush=True)
            answers = await asyncio.gather(*[s.ask(query, WORKER_ANSWER) for s in self.sup.slots])
            # A worker that is down or has no delivery has nothing cached: it counts 0.
            return replies.MxFlushed(
                flushed=sum(a.flushed for a in answers if isinstance(a, wire.MxFlushed)))
        if not domain:
            raise protocol.RequestError("mx: give a domain (or --flush)")
        # Every worker delivers a share of the domain and has its own cache: ask them all.
        answer = await shaping_view.ask_mx(self.sup, domain)
        if not isinstance(answer, wire.MxEntries):
            error = answer.error if isinstance(answer, wire.Refused) else "no answer"
            raise protocol.RequestError(f"mx {domain}: no MX cache to read ({error})")
        # The worker's "none" means nothing cached, not "no MX": name it so (issue 14).
        return replies.MxEntries(entries=[
            msgspec.structs.replace(e, kind="not_cached") if e.kind == "none" else e
            for e in answer.entries])

    async def metrics(self, req: protocol.Metrics) -> replies.Metrics:
        await self._walked_totals()
        return replies.Metrics(text=await self.metrics_text())

    async def refresh(self) -> None:
        """Sample the rates and, when there is an HTTP endpoint to scrape, keep the
        queue totals fresh for it (the supervisor calls this every 5 s); without one,
        nobody reads totals that a command does not walk for itself."""
        if self.sup.cfg.metrics.listen:
            await self._walked_totals()
        self.fleet.sample()

    async def metrics_text(self) -> str:
        """Prometheus text from what is known now (queue totals from the last walk, at
        most 5 s old): an HTTP scrape never waits for a walk of the queue. Campaign and
        suppression figures are read from the store now, in a thread."""
        stored = await self._thread(self.lists.gauges, self.sup.cfg.campaigns.metrics_top)
        totals = self._totals[1] if self._totals else _NO_COUNTS
        now = time.time()
        fleet = self.fleet
        slots = self.sup.slots
        gauges = [
            gauge("volley_queue_messages", totals.messages),
            gauge("volley_queue_bytes", totals.bytes),
            gauge("volley_queue_units", totals.units),
            gauge("volley_sessions_in", sum(fleet.live(s.slot).sessions_in for s in slots)),
            gauge("volley_sessions_out", sum(fleet.live(s.slot).sessions_out for s in slots)),
            gauge("volley_workers", sum(1 for s in slots if s.running)),
            gauge("volley_worker_restarts_total", sum(s.restarts for s in slots)),
            gauge("volley_domains_suspended", len(self.suspended(now))),
            gauge("volley_uptime_seconds", round(now - self.started, 1)),
            *stored,
        ]
        cluster = self.sup.cluster_status()
        if cluster is not None:  # [cluster]: 1 while Redis does not answer (local shares)
            gauges.append(gauge("volley_cluster_degraded", int(cluster["state"] != "healthy")))
        return render(fleet.metrics(), gauges)

    # --- process -----------------------------------------------------------------------
    async def reload(self, req: protocol.Reload) -> replies.Reload:
        outcome, notes = self.sup.reload()
        if outcome == "skipped":
            raise protocol.RequestError(f"reload skipped, nothing changed: {'; '.join(notes)}")
        if outcome != "reloaded":
            raise protocol.RequestError(f"reload refused, the configuration in force stays: {'; '.join(notes)}")
        return replies.Reload(config=self.sup.config_path or "", kept=notes)

    async def drain(self, req: protocol.Drain) -> replies.Drain | replies.Handover:
        if req.to or not req.start:  # hand the queue over (drain_to.py), or its progress
            run = self.handing
            if req.start and (run is None or not run.running):
                run = self.handing = drain_to.new_run(
                    self.sup, self.store, req, set_held=self._hold_delivery, thread=self._thread,
                    counted=functools.partial(self.fleet.count, "handed_over"))
            return await drain_to.answer(run, req)
        started = time.monotonic()
        self.sup.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout
        remaining = await self._thread(self.store.count)
        while remaining and loop.time() < deadline:
            await asyncio.sleep(0.2)  # polling the queue: nothing signals "empty"
            remaining = await self._thread(self.store.count)
        return replies.Drain(drained=remaining == 0, remaining=remaining,
                             seconds=round(time.monotonic() - started, 2),
                             delivering=self.sup.cfg.delivery.enabled)

    async def shutdown(self, req: protocol.Shutdown) -> replies.Done:
        # Answer first: the stop begins on the next loop turn, after this reply is written.
        asyncio.get_running_loop().call_later(0.05, self.sup.request_stop)
        return replies.Done()
