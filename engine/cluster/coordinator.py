"""The supervisor's side of a fleet's provider limits: once a heartbeat, for every
[[shaping]] entry with a connection cap or a rate (per source address, as the
workers key them), read what this node's workers are doing from the shared table,
ask Redis for this node's share (caps.py: leases; rates.py: a batch of messages) in
one pipelined round trip, and write the answer back into the table.

The workers never wait on Redis: they read the share and spend the credit in the
table (fleet_share.py). When Redis does not answer, the link turns degraded and
every slot goes back to the local share (cap ÷ live nodes last seen, rate ÷ live
nodes); when it answers again the next round takes leases again by itself, no more
than that local share while the cap key's hold stands (caps.py: the other nodes may
not have published the connections they kept open yet).

Slots are laid out for every key before the workers start, so a worker never finds
a slot of a fleet without its local share in force (the header's fleet count).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.cluster.caps import CapLeases, Lease
from engine.cluster.link import LINK_ERRORS, ClusterLink, stop_tasks
from engine.cluster.loops import rounds
from engine.cluster.rates import RateGrants, batch_want
from engine.config import Config
from engine.delivery.shared_limits import LimitTable, table_path

EARLY = 0.1  # seconds: the soonest round after the last when a worker waits


@dataclass(frozen=True, slots=True)
class KeySpec:
    key: str  # the table's key: "provider" or "provider|source address"
    cap: int  # max_connections (0: none)
    rate: float  # messages per second (0: none)


@dataclass(slots=True)
class KeyState:
    spec: KeySpec
    slot: int
    lease: Lease | None = None
    credit_after: float = 0.0  # the slot's credit as the last round left it
    spent: float = 0.0  # messages spent during the last heartbeat
    seen: bool = False  # a round published this node's want on the cap key
    by_node: dict[str, int] = field(default_factory=dict)


def key_specs(cfg: Config) -> list[KeySpec]:
    """The keys the workers may use: each shaped provider with a cap or a rate, alone
    and per source address configured ([delivery] and [[egress]])."""
    sources = sorted({cfg.delivery.source_address, *(e.source_address for e in cfg.egress)} - {""})
    out = []
    for rule in cfg.shaping:
        cap, rate = rule.max_connections or 0, rule.per_second
        if cap or rate:
            out.append(KeySpec(rule.label, cap, rate))
            out += [KeySpec(f"{rule.label}|{src}", cap, rate) for src in sources]
    return out


def reset_fleet(queue_path: str) -> None:
    """A node alone: clear a fleet count a former run with [cluster] left in the table."""
    table = LimitTable.open_readonly(table_path(queue_path))
    if table is None or not table.fleet():
        if table is not None:
            table.close()
        return
    table.close()
    shared = LimitTable.open_shared(table_path(queue_path))
    shared.set_fleet(0)
    shared.close()


class Coordinator:
    """Supervisor loop only."""

    def __init__(self, cfg: Callable[[], Config], link: ClusterLink) -> None:
        self.cfg = cfg  # the configuration in force (a reload replaces it)
        self.link = link
        self.caps = CapLeases(link)
        self.rates = RateGrants(link)
        self.table = LimitTable.open_shared(table_path(cfg().queue.path))
        self.states: dict[str, KeyState] = {}
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._last = time.monotonic()
        self._back = False  # Redis answers again: the next round starts a hold
        # The most live nodes counted lately, and when (see _fleet_seen).
        self._peak, self._peak_at = 1, 0.0

    def _layout(self) -> None:
        """A slot per key (new ones in the local share until Redis answers)."""
        specs = {s.key: s for s in key_specs(self.cfg())}
        for key in list(self.states):
            if key not in specs:
                del self.states[key]
        for key, spec in specs.items():
            state = self.states.get(key)
            if state is not None:
                state.spec = spec
                continue
            slot = self.table.slot_of(key)
            if slot is not None:  # a full table answers "no limit" (logged there)
                self.states[key] = KeyState(spec, slot)
        self.table.set_fleet(self._fleet_seen(time.monotonic()))

    async def start(self) -> None:
        """Lay the slots out and start the rounds (the link is started already)."""
        self._layout()
        self.link.on_health(self._on_health)
        if self.link.healthy:
            await self.round()
        # Coordination must not end the supervisor: a failed round is logged (a link
        # error is logged once by the link, as it turns degraded).
        self._task = asyncio.create_task(
            rounds(self._round_if_due, lambda: min(EARLY, float(self.link.cfg.heartbeat)),
                   "cluster_round_failed"), name="cluster-limits")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
        if self.link.healthy:  # give the leases back now rather than by TTL
            for key in self.states:
                with contextlib.suppress(*LINK_ERRORS):
                    await self.caps.release(key)
        self.table.close()

    def starved(self, now: float) -> bool:
        """Whether a worker waits for what this node does not have at all: no lease
        (a connection wanted) or no credit (a message wanted) since the last round.
        A node that has some and wants more waits for the heartbeat: under a steady
        backlog its pools always want more. One look at the table per key, no Redis."""
        for state in self.states.values():
            view = self.table.node_view(state.slot)
            if not view.leased:
                continue
            if state.spec.cap and view.share == 0 and view.wanted > self._last:
                return True
            if state.spec.rate and view.credit < 1.0 and view.rwanted > self._last:
                return True
        return False

    async def _round_if_due(self) -> None:
        """A round every heartbeat, and sooner (at most every EARLY s) when a worker
        waits for a lease or credit: mail arriving at an idle node starts within a
        fraction of a second rather than one or two heartbeats."""
        period = float(self.link.cfg.heartbeat)
        now = time.monotonic()
        if now - self._last < period and not (now - self._last >= EARLY and self.starved(now)):
            return
        self._layout()
        if self.link.healthy:
            await self.round()

    def _fleet_seen(self, now: float) -> int:
        """The live nodes the local shares and a hold's ceiling divide by: the most
        counted within the last hold. After Redis restarted empty the liveness set fills
        back one node at a time, while each node may still have open what cap ÷ the
        former count allowed: dividing by the new count would let a slot not yet leased
        again open the whole cap."""
        live = self.link.live_nodes()
        if live >= self._peak or now - self._peak_at > self.caps.hold:
            self._peak, self._peak_at = live, now
        return self._peak

    def _on_health(self, healthy: bool) -> None:
        if healthy:
            # The outage does not age the count the local shares were divided by.
            self._back, self._peak_at = True, time.monotonic()
            return
        # No word from Redis: every slot on its local share.
        self.table.set_fleet(self._fleet_seen(time.monotonic()))
        for state in self.states.values():
            self.table.set_share(state.slot, None)
            state.lease, state.credit_after = None, 0.0

    async def round(self) -> None:
        """One pipelined round trip: leases and grants for every key."""
        if not self.states:
            return
        now = time.monotonic()
        period = max(now - self._last, 1e-3)
        self._last = now
        heartbeat = float(self.link.cfg.heartbeat)
        pipe = self.link.redis.pipeline(transaction=False)
        asked: list[tuple[KeyState, str, Any]] = []
        fleet = self._fleet_seen(now)
        for state in self.states.values():
            spec, view = state.spec, self.table.node_view(state.slot)
            if spec.cap:
                # Want: the whole cap while a worker waits for a connection (or for
                # rate credit: it will want a connection next), else what is open;
                # keep: never fewer leases than connections open.
                waiting = view.wanted > now - period or view.rwanted > now - period
                want = spec.cap if waiting else view.total
                await self.caps.queue(pipe, spec.key, spec.cap, want, view.total,
                                      most=max(1, spec.cap // fleet), seen=state.seen, back=self._back)
                asked.append((state, "cap", view))
            if spec.rate:
                state.spent = max(0.0, state.credit_after - view.credit) if view.leased else 0.0
                ask = batch_want(spec.rate, heartbeat, view.credit if view.leased else 0.0,
                                 state.spent, starved=view.rwanted > now - period)
                await self.rates.queue(pipe, spec.key, spec.rate, ask)
                asked.append((state, "rate", view))
        results = await self.link.call(pipe.execute())
        self._back = False  # the hold is set in Redis now, for every node to see
        self.rounds += 1
        self.table.set_fleet(fleet)
        self._apply(asked, results, now)

    def _apply(self, asked: list[tuple[KeyState, str, Any]], results: list[Any], now: float) -> None:
        shares: dict[str, int] = {}
        credits: dict[str, float] = {}
        for (state, kind, view), res in zip(asked, results, strict=True):
            if kind == "cap":
                state.seen = True
                lease = state.lease = self.caps.parse(res)
                # The workers may use the leases up to the fair target: the leases
                # above it only cover connections still open, and are given back
                # as those close.
                shares[state.spec.key] = usable = min(lease.share, lease.target)
                if usable < view.total:
                    # Above our part: idle sessions QUIT (the gates' sweep), so the
                    # nodes waiting get theirs instead of waiting for idle_timeout.
                    self.table.want(state.slot, now + 2 * float(self.link.cfg.heartbeat))
            else:
                credits[state.spec.key] = float(self.rates.parse(res).granted)
        for key, state in self.states.items():
            if key not in shares and key not in credits:
                continue
            held = state.lease
            share = shares.get(key, min(held.share, held.target) if held else 0)
            self.table.set_share(state.slot, share, credits.get(key, 0.0))
            state.credit_after = self.table.node_view(state.slot).credit

    def status(self) -> dict[str, Any]:
        """The link's state and this node's share of each limit (ctl status)."""
        rows = []
        for key, state in sorted(self.states.items()):
            view = self.table.node_view(state.slot)
            lease = state.lease
            rows.append({
                "key": key, "cap": state.spec.cap, "rate": state.spec.rate,
                "mode": "leased" if view.leased else "local",
                "share": view.share if view.leased else self.table.node_cap(state.slot, state.spec.cap),
                "leases": lease.share if lease and view.leased else None,
                "open": view.total, "credit": round(view.credit, 1), "granted": int(view.granted),
                "by_node": dict(lease.by_node) if lease and view.leased else {},
            })
        return {**self.link.status(), "rounds": self.rounds, "rate_calls": self.rates.calls,
                "limits": rows}
