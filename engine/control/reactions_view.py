"""The supervisor's side of [[reactions]] (engine/delivery/reactions.py has the theory):
what is in force, for `volley ctl status`; saving it so a restart keeps it; lifting it
on `volley ctl resume NAME`.

A worker that fires a reaction has already written it into the shared table
(engine/delivery/shared_limits.py), where every worker obeys it; it then tells us
(`wire.ReactionFired`) with the reply that caused it. We keep the last of each
(provider, action), save the list in the queue's control state (`REACTIONS_KEY`) and
drop it when its time is up. At start the table's reaction fields are cleared and the
saved reactions still in force are written back, converted from epoch seconds to the
table's CLOCK_MONOTONIC (which restarts with the machine).

A lift clears the provider's slot in the table ourselves (mapped read-write: no
round trip to the workers is needed for them to obey), then asks each worker which
domains' mail it deferred meanwhile (`wire.LiftReaction`) and makes that mail due
now, as `resume DOMAIN` does for a parked domain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from engine.control import replies, wire
from engine.control.supervisor_api import SupervisorHandle
from engine.delivery.ramp import NONE, Halving, factor_at, in_force
from engine.delivery.shared_limits import LimitTable, table_path
from engine.observe import log
from engine.queue.store import QueueStore

REACTIONS_KEY = b"reactions"  # QueueStore control-state name of the saved list
WORKER_ANSWER = 5.0  # seconds to wait for each worker's held domains


class Saved(msgspec.Struct, frozen=True):
    """One reaction in force, as saved (epoch seconds)."""

    provider: str
    action: str
    rule: int
    since: float
    until: float
    reply: str
    factor: float = 1.0
    hold_until: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Saved])

Thread = Callable[..., Awaitable[Any]]


class ReactionsPlane:
    def __init__(self, sup: SupervisorHandle, store: QueueStore, run_in_thread: Thread) -> None:
        self.sup = sup
        self.store = store
        self._thread = run_in_thread
        self.records: dict[tuple[str, str], Saved] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._table: LimitTable | None = None
        raw = store.get_control(REACTIONS_KEY)
        try:
            saved = _decoder.decode(raw) if raw else []
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.error("reactions_not_restored", error=str(err))
            saved = []
        now = time.time()
        self.records = {(s.provider, s.action): s for s in saved if s.until > now}
        # Set in a cluster (engine/cluster/holds_sync.py): told of each reaction fired
        # here, so every node applies it (`apply_remote`, which does not call it back).
        self.on_fired: Callable[[Saved], None] | None = None

    def restore(self) -> None:
        """Clear the table's reaction fields and write back the saved ones in force
        (before any worker starts)."""
        table = self.table()
        if table is None:
            return
        table.clear_reactions()
        wall, mono = time.time(), time.monotonic()
        for s in self.records.values():
            slot = table.slot_of(s.provider)
            if slot is None:
                continue
            _write(table, slot, s, wall, mono)
            log.info("reaction_restored", provider=s.provider, action=s.action, until=s.until)

    def table(self) -> LimitTable | None:
        if self._table is None:
            try:
                self._table = LimitTable.open_shared(table_path(self.sup.cfg.queue.path))
            except OSError as err:
                log.error("shaping_table_unavailable", error=str(err))
        return self._table

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None

    # --- what workers tell -------------------------------------------------------------
    def fired(self, m: wire.ReactionFired) -> None:
        s = Saved(m.provider, m.action, m.rule, m.since, m.until, m.reply, m.factor, m.hold_until)
        self.records[(m.provider, m.action)] = s
        self._save_soon()
        if self.on_fired is not None:
            self.on_fired(s)

    async def apply_remote(self, s: Saved) -> bool:
        """A reaction fired on another node of the cluster: written into this node's
        table (every worker obeys it at once) and saved, as if fired here. False when it
        is over or this node has no such provider."""
        wall, mono = time.time(), time.monotonic()
        table = self.table()
        slot = table.slot_of(s.provider) if table is not None and s.until > wall else None
        if table is None or slot is None:
            return False
        _write(table, slot, s, wall, mono)
        self.records[(s.provider, s.action)] = s
        await self._save()
        log.info("reaction_from_cluster", provider=s.provider, action=s.action, until=s.until)
        return True

    async def expire(self) -> None:
        """Forget reactions whose time is up (the supervisor's tick, every second)."""
        now = time.time()
        gone = [k for k, s in self.records.items() if s.until <= now]
        for key in gone:
            del self.records[key]
            log.info("reaction_ended", provider=key[0], action=key[1])
        if gone:
            await self._save()

    def rows(self, now: float) -> list[replies.ReactionRow]:
        return [_row(s, now) for s in self.records.values() if s.until > now]

    # --- lifting -----------------------------------------------------------------------
    async def resume(self, name: str, flush: Callable[[str], Awaitable[int]]
                     ) -> tuple[bool, list[replies.ReactionRow], int]:
        """Lift every reaction of provider `name`: (whether any was in force, the rows
        lifted, messages made due again through `flush(domain)`)."""
        now = time.time()
        lifted = [s for k, s in self.records.items() if k[0] == name]
        for s in lifted:
            del self.records[(s.provider, s.action)]
        found = bool(lifted)
        table = self.table()
        slot = table.slot_of(name, create=False) if table is not None else None
        if table is not None and slot is not None:
            mono = time.monotonic()
            found = found or table.suspended_until(slot) > mono or in_force(table.halving(slot), mono)
            table.set_reaction(slot, suspended_until=0.0, halving=NONE)
        if not found:
            return False, [], 0
        if lifted:
            await self._save()
        answers = await asyncio.gather(*[s.ask(wire.LiftReaction(provider=name), WORKER_ANSWER)
                                         for s in self.sup.slots])
        domains = sorted({d for a in answers if isinstance(a, wire.Lifted) for d in a.domains})
        released = 0
        for domain in domains:
            released += await flush(domain)
        log.info("reaction_lifted", provider=name, actions=[s.action for s in lifted],
                 domains=len(domains), released=released)
        return True, [_row(s, now) for s in lifted], released

    # --- saving ------------------------------------------------------------------------
    def _save_soon(self) -> None:
        task = asyncio.ensure_future(self._save())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _save(self) -> None:
        data = _encoder.encode(list(self.records.values()))
        try:
            await self._thread(self.store.put_control, REACTIONS_KEY, data)
        except Exception as err:  # the table holds it anyway; a restart would lose it
            log.error("reactions_not_saved", error=repr(err))


def _write(table: LimitTable, slot: int, s: Saved, wall: float, mono: float) -> None:
    """Write a saved reaction into the table, its epoch times turned into CLOCK_MONOTONIC."""
    if s.action == "suspend":
        table.set_reaction(slot, suspended_until=mono + s.until - wall)
    else:
        table.set_reaction(slot, halving=Halving(
            s.factor, mono + s.hold_until - wall, mono + s.until - wall, mono + s.since - wall))


def _row(s: Saved, now: float) -> replies.ReactionRow:
    if s.action == "suspend":
        factor = 0.0 if s.until > now else 1.0
    else:
        factor = round(factor_at(Halving(s.factor, s.hold_until, s.until, s.since), now), 4)
    return replies.ReactionRow(provider=s.provider, action=s.action, rule=s.rule, since=s.since,
                               until=s.until, factor=factor, reply=s.reply)
