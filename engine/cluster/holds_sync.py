"""Suspensions and [[reactions]] fleet-wide: one node's `volley ctl suspend`, `resume`
and fired reactions hold on every node.

Redis (under `key_prefix`):
  holds:susp   a hash, domain → the msgpack `Shared` of the suspension in force (what a
               node joining or rejoining reads whole)
  holds:log    a stream of changes, XADD ... MAXLEN ~ 10,000: field e (the msgpack
               `Event`) and o (the node it came from)

Out: the control plane calls `on_suspension` / `on_lift` for an operator's change and
the reactions plane `on_fired` for a reaction fired here (engine/control/commands.py,
reactions_view.py); each becomes an event, queued in memory and sent in order, retried
while Redis is down (they are few; a node restarted meanwhile has its own copy in its
store, and the operator's change still holds there).

In: XREAD BLOCK from the id noted at (re)join, after reading the hash whole. An
event of this node's own name is skipped (no echo). Each node applies a suspension
through its own control plane (saved in its store, sent to its workers) with `by`
naming the node it came from, and lets it end by itself at `until`; a lift of a
reaction by name lifts it here as `ctl resume NAME` would (without publishing again).
"""

from __future__ import annotations

import asyncio
import secrets
import time

import msgspec

from engine.cluster.link import LINK_ERRORS, ClusterLink, stop_tasks
from engine.cluster.link import call_loose as _call
from engine.cluster.loops import follow
from engine.control.commands import ControlPlane
from engine.control.reactions_view import Saved
from engine.delivery.holds import Suspension

STREAM_MAX = 10_000


class Event(msgspec.Struct, array_like=True, frozen=True):
    """One change: kind "suspend" (`suspension`), "resume" (`domain`), "reaction"
    (`reaction`) or "lift" (`domain` is the provider's name)."""

    kind: str
    domain: str = ""
    suspension: Suspension | None = None
    reaction: Saved | None = None


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Event)
_sdec = msgspec.msgpack.Decoder(Suspension)


class HoldsSync:
    def __init__(self, link: ClusterLink, plane: ControlPlane) -> None:
        self.link = link
        self.plane = plane
        self.hash = link.key("holds", "susp")
        self.stream = link.key("holds", "log")
        # The suppression list's epoch (suppression_sync.py): a new one means Redis
        # lost its data, holds included.
        self.epoch_key = link.key("supp", "epoch")
        self._epoch: bytes | None = None
        self._out: list[Event] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.applied = 0  # events of other nodes applied here (tests)

    async def start(self) -> None:
        self.plane.on_suspension = self._suspension
        self.plane.on_lift = lambda name: self._queue(Event("lift", domain=name))
        self.plane.reactions.on_fired = lambda s: self._queue(Event("reaction", reaction=s))
        self._tasks = [asyncio.create_task(self._send_loop(), name="cluster-holds-send"),
                       asyncio.create_task(follow(self.link, self._join, self._follow_once,
                                                  "cluster_holds_follow_failed"),
                                           name="cluster-holds-follow")]

    async def stop(self) -> None:
        self.plane.on_suspension = self.plane.on_lift = self.plane.reactions.on_fired = None
        await stop_tasks(self._tasks)
        self._tasks = []

    # --- out -----------------------------------------------------------------------------
    def _suspension(self, domain: str, s: Suspension | None) -> None:
        self._queue(Event("suspend", domain=domain, suspension=s) if s is not None
                    else Event("resume", domain=domain))

    def _queue(self, e: Event) -> None:
        self._out.append(e)
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._out:
                try:
                    await self._send(self._out[0])
                except LINK_ERRORS:
                    await asyncio.sleep(float(self.link.cfg.heartbeat))
                    continue
                self._out.pop(0)

    async def _send(self, e: Event) -> None:
        pipe = self.link.redis.pipeline(transaction=True)
        if e.kind == "suspend" and e.suspension is not None:
            pipe.hset(self.hash, e.domain, _enc.encode(_from(e.suspension, self.link.node)))
        elif e.kind == "resume":
            pipe.hdel(self.hash, e.domain)
        pipe.xadd(self.stream, {"e": _enc.encode(e), "o": self.link.node},
                  maxlen=STREAM_MAX, approximate=True)
        await _call(self.link, pipe.execute())

    # --- in ------------------------------------------------------------------------------
    async def _join(self) -> bytes:
        """Note the stream's end, then take every suspension in force elsewhere."""
        r = self.link.redis
        last = await _call(self.link, r.xrevrange(self.stream, "+", "-", count=1))
        position = bytes(last[0][0]) if last else b"0-0"
        table = await _call(self.link, r.hgetall(self.hash))
        now = time.time()
        over: list[bytes] = []
        for raw_domain, raw in table.items():
            try:
                s = _sdec.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            domain = raw_domain.decode()
            if not s.in_force(now):
                over.append(raw_domain)  # ended by itself on every node: tidy the hash
                continue
            mine = self.plane.holds.suspensions.get(domain)
            if not s.by.endswith(f"@{self.link.node}") and mine != s:
                await self.plane.apply_remote_suspension(domain, s)
        if over:
            await _call(self.link, r.hdel(self.hash, *over))
        await self._reconcile(table, now)
        return position

    async def _reconcile(self, table: dict[bytes, bytes], now: float) -> None:
        """After a Redis that lost its data (a new epoch, or our first join since we
        started: we cannot tell), publish this node's own suspensions again; otherwise
        lift those that came from another node ("user (pid N)@node2") and were lifted
        while we were away: the hash no longer has them."""
        r = self.link.redis
        await _call(self.link, r.setnx(self.epoch_key, secrets.token_hex(8)))
        epoch = await _call(self.link, r.get(self.epoch_key))
        same, self._epoch = epoch == self._epoch, epoch
        listed = {d.decode() for d in table}
        for domain, s in list(self.plane.holds.suspensions.items()):
            if not same:
                if "@" not in s.by and s.in_force(now):
                    self._queue(Event("suspend", domain=domain, suspension=s))
            elif "@" in s.by and not s.by.endswith(f"@{self.link.node}") and domain not in listed:
                await self.plane.apply_remote_suspension(domain, None)

    async def _follow_once(self, position: bytes) -> bytes:
        block = max(50, int(self.link.timeout * 500))
        got = await _call(self.link, self.link.redis.xread({self.stream: position}, count=100, block=block))
        if not got:
            return position
        me = self.link.node.encode()
        for entry_id, fields in got[0][1]:
            position = bytes(entry_id)
            if fields.get(b"o") == me:
                continue
            try:
                e = _dec.decode(fields.get(b"e", b""))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            await self._apply(e, fields.get(b"o", b"?").decode())
            self.applied += 1
        return position

    async def _apply(self, e: Event, origin: str) -> None:
        if e.kind == "suspend" and e.suspension is not None:
            await self.plane.apply_remote_suspension(e.domain, _from(e.suspension, origin))
        elif e.kind == "resume":
            await self.plane.apply_remote_suspension(e.domain, None)
        elif e.kind == "reaction" and e.reaction is not None:
            await self.plane.reactions.apply_remote(e.reaction)
        elif e.kind == "lift":
            await self.plane.reactions.resume(e.domain, self._flush)

    async def _flush(self, domain: str) -> int:
        return await self.plane._flush_domain(domain)


def _from(s: Suspension, node: str) -> Suspension:
    """`s` with `by` naming the node it was set on ("uid 0@node1"), once."""
    by = s.by if s.by.endswith(f"@{node}") else f"{s.by}@{node}"
    return msgspec.structs.replace(s, by=by)
