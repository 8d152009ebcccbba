"""The control commands, as the supervisor runs them.

Reads of the queue (status, queue, list, show) and bulk changes (flush, bounce,
delete, resume) run in a thread on the supervisor's own handle of the shared LMDB
queue, in short transactions, so neither the supervisor's loop nor the workers'
commits wait on them. Changes of delivery (suspend, resume, throttle, flush) are
saved in the store when they must survive a restart, then pushed to every worker
over its control pipe: they take effect at the worker's next scan (milliseconds).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, assert_never

import msgspec

from engine.control import (
    bulk,
    drain_to,
    protocol,
    queue_view,
    replies,
    shaping_view,
    warmup_view,
    wire,
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
    Throttle,
    decode_holds,
    encode_holds,
)
from engine.observe import log
from engine.observe.metrics import gauge, render
from engine.queue.ids import IdAllocator, id_bytes
from engine.queue.store import QueueStore
from engine.version import __version__

_T = TypeVar("_T")
_P = ParamSpec("_P")
# Who sent the request being handled; each connection is its own task, so its own context.
_peer: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="unknown")
_READS = (protocol.Status, protocol.Queue, protocol.List, protocol.Show, protocol.Metrics,
          protocol.SuppressList, protocol.Campaigns, protocol.Shaping, protocol.Warmup)
WORKER_ANSWER = 5.0  # seconds to wait for a worker's answer (mx)
# What metrics scrapes show before the first walk of the queue.
_NO_COUNTS = replies.QueueCounts(messages=0, units=0, bytes=0, ready=0, deferred=0, suspended=0)


class ControlPlane:
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
        _peer.set(peer)
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

    def _wake(self, domain: str | None) -> None:
        self.sup.broadcast(wire.Flush(domain=domain))

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
            suspensions=[_suspension(s) for s in held.values()],
            throttles=[_throttle(t) for t in self.holds.throttles.values()],
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
            _parse_id(req.after, "after")
        return await self._thread(
            queue_view.list_messages, self.store, domain=req.domain, sender=req.sender,
            state=req.state, limit=req.limit, after=req.after,
            suspended=self.suspended(now))

    async def show(self, req: protocol.Show) -> replies.Show:
        now = time.time()
        message = await self._thread(queue_view.show, self.store, _parse_id(req.id, "id"),
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

    # --- steering ----------------------------------------------------------------------
    async def suspend(self, req: protocol.Suspend) -> replies.Suspend:
        now = time.time()
        domain = _domain(req.domain)
        until = now + req.duration if req.duration else None
        s = Suspension(domain, since=now, until=until, reason=req.reason, by=_peer.get())
        self.holds.suspensions[domain] = s
        await self._save_holds()
        log.info("suspended", domain=domain, until=until, reason=req.reason)
        if self.on_suspension is not None:
            self.on_suspension(domain, s)
        return replies.Suspend(suspension=_suspension(s))

    async def resume(self, req: protocol.Resume) -> replies.Resume:
        # A provider's name lifts its [[reactions]]; a domain's, its suspension; or both.
        lifted, rows, freed = await self.reactions.resume(req.domain.strip(), self._flush_domain)
        if lifted and self.on_lift is not None:
            self.on_lift(req.domain.strip())
        if lifted and domain_key(req.domain) not in self.holds.suspensions:
            return replies.Resume(resumed=True, released=freed, lifted=rows)
        domain = _domain(req.domain)
        resumed = self.holds.suspensions.pop(domain, None) is not None
        if resumed:
            await self._save_holds()
            if self.on_suspension is not None:
                self.on_suspension(domain, None)
        # Parked entries wait until the end of the suspension: bring them back now.
        done = await self._bulk("flush", domain=domain)
        self._wake(domain)
        log.info("resumed", domain=domain, released=done.done)
        return replies.Resume(resumed=resumed or lifted, released=done.done + freed, lifted=rows)

    async def apply_remote_suspension(self, domain: str, s: Suspension | None) -> None:
        """A suspension set (or, None, lifted) on another node of the cluster: held here
        as an operator's would be; a lift brings the parked mail back as resume does."""
        if s is None:
            if self.holds.suspensions.pop(domain, None) is None:
                return
            await self._save_holds()
            await self._flush_domain(domain)
        else:
            self.holds.suspensions[domain] = s
            await self._save_holds()
        log.info("suspension_from_cluster", domain=domain, lifted=s is None,
                 by=s.by if s else None, until=s.until if s else None)

    async def _flush_domain(self, domain: str) -> int:
        done = await self._bulk("flush", domain=domain)
        self._wake(domain)
        return done.done

    async def throttle(self, req: protocol.Throttle) -> replies.Throttle:
        domain = _domain(req.domain)
        t: Throttle | None = None
        if req.clear:
            self.holds.throttles.pop(domain, None)
        else:
            old = self.holds.throttles.get(domain)
            t = Throttle(domain,
                         max_connections=req.max_connections if req.max_connections is not None
                         else (old.max_connections if old else None),
                         rate=req.rate if req.rate is not None else (old.rate if old else None),
                         since=time.time())
            self.holds.throttles[domain] = t
        await self._save_holds()
        log.info("throttled", domain=domain, throttle=_throttle(t) if t else None)
        return replies.Throttle(throttle=_throttle(t) if t else None)

    async def flush(self, req: protocol.Flush) -> replies.Flush:
        # Workers end the destination's backoff first, so entries made due below are
        # not deferred again by a pool that still backs off; and they scan again after.
        domain = _domain(req.domain) if req.domain else None
        self._wake(domain)
        if req.id:
            done = await self._bulk("flush", id=_parse_id(req.id, "id"))
        else:
            done = await self._bulk("flush", domain=domain or "", all=domain is None)
        self._wake(domain)
        # Made due is not sent: an operator's suspension keeps holding the flushed mail
        # (a backoff, the automatic kind, was ended by the wake above).
        now = time.time()
        held = {d: s for d, s in self.holds.suspensions.items() if s.in_force(now)}
        shown = [] if req.id else [held[domain]] if domain in held else [] if domain else list(held.values())
        return replies.Flush(messages=done.done, held_by=[_suspension(s) for s in shown])

    async def bounce(self, req: protocol.Bounce) -> replies.Bulk:
        return await self._filtered("bounce", req)

    async def delete(self, req: protocol.Delete) -> replies.Bulk:
        return await self._filtered("delete", req)

    async def _filtered(self, action: str, req: protocol.Bounce | protocol.Delete) -> replies.Bulk:
        kw: dict[str, Any] = {"dry_run": req.dry_run}
        if req.id:
            kw["id"] = _parse_id(req.id, "id")
        else:
            kw.update(domain=req.domain, sender=req.sender, state=req.state, all=req.all)
        if isinstance(req, protocol.Bounce):
            kw["reason"] = req.reason
        started = time.monotonic()
        result = await self._bulk(action, **kw)
        if not req.dry_run:
            self._wake(None)  # DSNs were queued (bounce) or capacity freed
            log.info(f"operator_{action}", matched=result.matched, done=result.done,
                     seconds=round(time.monotonic() - started, 3))
        return result

    async def _bulk(self, action: str, **kw: Any) -> replies.Bulk:
        now = time.time()
        report = await bulk.run_bulk(
            self.store, action, now=now, suspended=self.suspended(now),
            run_in_thread=self._thread, id_alloc=self.ids,
            hostname=self.sup.cfg.server.hostname, **kw)
        self.fleet.count("dsns_queued", report.pop("reports"))
        return replies.Bulk(**report)

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


def _domain(text: str) -> str:
    domain = domain_key(text)
    if not domain or any(c.isspace() for c in domain) or "@" in domain:
        raise protocol.RequestError(f"not a domain: {text!r}")
    return domain


def _parse_id(text: str, what: str) -> bytes:
    try:
        return id_bytes(text)
    except ValueError:
        raise protocol.RequestError(f"{what}: not a queue id (16 hex digits): {text!r}") from None


def _suspension(s: Suspension) -> replies.SuspensionRow:
    return replies.SuspensionRow(domain=s.domain, by=s.by, reason=s.reason, since=s.since, until=s.until)


def _throttle(t: Throttle) -> replies.ThrottleRow:
    return replies.ThrottleRow(domain=t.domain, max_connections=t.max_connections, rate=t.rate)
