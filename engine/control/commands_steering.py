"""The steering commands of the control plane (commands.py has the theory of
operation, ControlPlane the dispatch): suspend, resume, throttle, flush and the
operator's bounce and delete, which change how mail is delivered. A hold is saved in
the store when it must survive a restart, then pushed to every worker over its control
pipe (`_save_holds`); the bulk changes run in a thread (bulk.py), and the workers are
woken to scan again.

`Steering` is the part of `ControlPlane` that does this; the attributes it declares are
the plane's own, set up by `ControlPlane.__init__`.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from engine.control import bulk, protocol, replies, wire
from engine.control.fleet import Fleet
from engine.control.message_view import domain_key
from engine.control.reactions_view import ReactionsPlane
from engine.control.supervisor_api import SupervisorHandle
from engine.delivery.holds import Holds, Suspension, Throttle
from engine.observe import log
from engine.queue.ids import IdAllocator, id_bytes
from engine.queue.store import QueueStore

_T = TypeVar("_T")
_P = ParamSpec("_P")
# Who sent the request being handled; each connection is its own task, so its own context.
request_peer: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="unknown")


class Steering:
    sup: SupervisorHandle
    store: QueueStore
    fleet: Fleet
    holds: Holds
    ids: IdAllocator
    reactions: ReactionsPlane
    on_suspension: Callable[[str, Suspension | None], None] | None
    on_lift: Callable[[str], None] | None

    async def _thread(self, fn: Callable[_P, _T], *args: _P.args, **kw: _P.kwargs) -> _T:
        raise NotImplementedError

    async def _save_holds(self) -> None:
        raise NotImplementedError

    def suspended(self, now: float) -> dict[str, Suspension]:
        raise NotImplementedError

    def _wake(self, domain: str | None) -> None:
        self.sup.broadcast(wire.Flush(domain=domain))

    async def suspend(self, req: protocol.Suspend) -> replies.Suspend:
        now = time.time()
        domain = parse_domain(req.domain)
        until = now + req.duration if req.duration else None
        s = Suspension(domain, since=now, until=until, reason=req.reason, by=request_peer.get())
        self.holds.suspensions[domain] = s
        await self._save_holds()
        log.info("suspended", domain=domain, until=until, reason=req.reason)
        if self.on_suspension is not None:
            self.on_suspension(domain, s)
        return replies.Suspend(suspension=suspension_row(s))

    async def resume(self, req: protocol.Resume) -> replies.Resume:
        # A provider's name lifts its [[reactions]]; a domain's, its suspension; or both.
        lifted, rows, freed = await self.reactions.resume(req.domain.strip(), self._flush_domain)
        if lifted and self.on_lift is not None:
            self.on_lift(req.domain.strip())
        if lifted and domain_key(req.domain) not in self.holds.suspensions:
            return replies.Resume(resumed=True, released=freed, lifted=rows)
        domain = parse_domain(req.domain)
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
        domain = parse_domain(req.domain)
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
        log.info("throttled", domain=domain, throttle=throttle_row(t) if t else None)
        return replies.Throttle(throttle=throttle_row(t) if t else None)

    async def flush(self, req: protocol.Flush) -> replies.Flush:
        # Workers end the destination's backoff first, so entries made due below are
        # not deferred again by a pool that still backs off; and they scan again after.
        domain = parse_domain(req.domain) if req.domain else None
        self._wake(domain)
        if req.id:
            done = await self._bulk("flush", id=parse_id(req.id, "id"))
        else:
            done = await self._bulk("flush", domain=domain or "", all=domain is None)
        self._wake(domain)
        # Made due is not sent: an operator's suspension keeps holding the flushed mail
        # (a backoff, the automatic kind, was ended by the wake above).
        now = time.time()
        held = {d: s for d, s in self.holds.suspensions.items() if s.in_force(now)}
        shown = [] if req.id else [held[domain]] if domain in held else [] if domain else list(held.values())
        return replies.Flush(messages=done.done, held_by=[suspension_row(s) for s in shown])

    async def bounce(self, req: protocol.Bounce) -> replies.Bulk:
        return await self._filtered("bounce", req)

    async def delete(self, req: protocol.Delete) -> replies.Bulk:
        return await self._filtered("delete", req)

    async def _filtered(self, action: str, req: protocol.Bounce | protocol.Delete) -> replies.Bulk:
        kw: dict[str, Any] = {"dry_run": req.dry_run}
        if req.id:
            kw["id"] = parse_id(req.id, "id")
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


def parse_domain(text: str) -> str:
    domain = domain_key(text)
    if not domain or any(c.isspace() for c in domain) or "@" in domain:
        raise protocol.RequestError(f"not a domain: {text!r}")
    return domain


def parse_id(text: str, what: str) -> bytes:
    try:
        return id_bytes(text)
    except ValueError:
        raise protocol.RequestError(f"{what}: not a queue id (16 hex digits): {text!r}") from None


def suspension_row(s: Suspension) -> replies.SuspensionRow:
    return replies.SuspensionRow(domain=s.domain, by=s.by, reason=s.reason, since=s.since, until=s.until)


def throttle_row(t: Throttle) -> replies.ThrottleRow:
    return replies.ThrottleRow(domain=t.domain, max_connections=t.max_connections, rate=t.rate)
