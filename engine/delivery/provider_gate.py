"""One worker's side of the server-wide provider limits (shared_limits.py holds the
figures): a `ProviderGate` per [[shaping]] entry in use, shared by every pool of this
worker that serves the provider.

A pool asks the gate before it opens a connection (`try_connect`) and before it hands
a job to a session (`take_message`). When the answer is no, the pool waits in the
gate's line and is called back (`GateUser.on_gate_open`):
- for the rate, when the GCRA says the next message (or connection) may go: a timer;
- for the connection cap, when one of this worker's connections to the provider
  closes (`release`), and every `RECHECK` seconds, since another worker's close is
  not signalled to us.

Idle sessions hold their connection until their idle_timeout; under a cap that would
starve the provider's other sites (pools) and workers. So a pool that finds the cap
reached makes an idle session of another pool of ours QUIT (`_reclaim`) and marks the
provider wanted in the table; every worker's gate with idle sessions to the provider
looks at that mark every `RECHECK` seconds and QUITs one of them while it is set.

Per source address: a pool that binds a source address (egress) counts in the slot
of "provider|address", so the caps hold per sending address; [[reactions]]
(reactions.py) live in the slot of the provider's name, so a suspension or a halved
rate holds for all its addresses. The halving factor (ramp.py) scales the rate, or
without a rate the connection cap, each time it is used.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from engine.delivery.job import PoolSettings
from engine.delivery.ramp import factor_at
from engine.delivery.reactions import ReactionBook, Rule
from engine.delivery.shared_limits import FULL, LimitTable

RECHECK = 0.1  # seconds between looks at a full connection cap (another worker's close)


class GateUser(Protocol):
    def on_gate_open(self) -> None:
        """The provider may have room again: dispatch if work remains."""

    def retire_coldest_idle(self) -> bool:
        """QUIT one idle session (its connection comes back through `release`);
        False if none."""


class ProviderGate:
    """Loop thread only."""

    def __init__(self, name: str, table: LimitTable, column: int,
                 loop: asyncio.AbstractEventLoop, key: str = "",
                 book: ReactionBook | None = None, workers: int = 1) -> None:
        self.name = name  # the provider
        self.table = table
        self.column = column
        self.loop = loop
        # The caps' slot ("provider|source" with a source address); None: the table is
        # full, no server-wide limit. The reactions' slot is the provider's name's.
        self.slot = table.slot_of(key or name)
        self.rslot = self.slot if not key or key == name else table.slot_of(name)
        self.book = book
        self.rules: tuple[Rule, ...] = ()  # the [[reactions]] watching the provider
        self.cap = 0
        self.rate = 0.0
        self.connect_rate = 0.0
        self.held = 0  # connections of this worker counted in the table
        self.workers = max(1, workers)
        self._waiting: dict[GateUser, None] = {}  # insertion-ordered set
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle: dict[GateUser, None] = {}  # pools that lately had idle sessions
        self._sweep: asyncio.TimerHandle | None = None

    def configure(self, settings: PoolSettings) -> None:
        self.cap = settings.provider_connections
        self.rate = settings.provider_rate
        self.connect_rate = settings.provider_connect_rate
        if self.book is not None:
            self.rules = self.book.rules_for(self.name)

    # --- reactions ---------------------------------------------------------------------
    def suspended(self) -> float:
        """loop.time() end of the provider's suspension, or 0.0 when none is in force."""
        if self.rslot is None or self.table.closed:
            return 0.0
        until = self.table.suspended_until(self.rslot)
        return until if until > self.loop.time() else 0.0

    def factor(self) -> float:
        """The halve_rate multiplier in force (1.0: none)."""
        if self.rslot is None or self.table.closed:
            return 1.0
        return factor_at(self.table.halving(self.rslot), self.loop.time())

    def _rate(self) -> float:
        return self.rate * self.factor()

    def _cap(self) -> int:
        if not self.cap or self.rate:
            return self.cap
        return max(1, int(self.cap * self.factor()))

    def try_connect(self, user: GateUser) -> bool:
        """One connection counted server-wide (counted with no cap too: the tools show
        the figure); False (and `user` waits) when the cap is reached or the connect
        rate has no room. Each True needs one `release`."""
        if self.slot is None or self.table.closed:
            return True
        wait = self.table.acquire_connection(self.slot, self.column, self._cap(),
                                             self.connect_rate, self.loop.time())
        if not wait:
            self.held += 1
            return True
        if wait is FULL:
            self.table.want(self.slot, self.loop.time() + 3 * RECHECK)
            self._reclaim(user)
            wait = RECHECK
        self._wait(user, wait)
        return False

    def release(self) -> None:
        """A connection counted by `try_connect` is gone: the pools in line look again."""
        if self.slot is None or self.held <= 0 or self.table.closed:
            return
        self.held -= 1
        self.table.release_connection(self.slot, self.column)
        self._wake()

    def message_wait(self) -> float:
        """Seconds until the rate lets a message go (0 = now); takes nothing."""
        if self.slot is None or not self.rate or self.table.closed:
            return 0.0
        return self.table.message_wait(self.slot, self._rate(), self.loop.time())

    def take_message(self, user: GateUser) -> bool:
        """One message under the rate; False (and `user` waits) when not yet."""
        if self.slot is None or not self.rate or self.table.closed:
            return True
        wait = self.table.take_message(self.slot, self._rate(), self.loop.time())
        if not wait:
            return True
        self._wait(user, wait)
        return False

    def wait(self, user: GateUser, seconds: float) -> None:
        """Call `user` back in `seconds` (or sooner, at a release)."""
        self._wait(user, seconds)

    def note_idle(self, user: GateUser) -> None:
        """`user` has an idle session to the provider (one `_reclaim` may QUIT)."""
        if self.slot is None or not self.cap:
            return
        self._idle[user] = None
        if self._sweep is None:
            self._sweep = self.loop.call_later(RECHECK, self._on_sweep)

    def forget(self, user: GateUser) -> None:
        self._waiting.pop(user, None)
        self._idle.pop(user, None)

    def _reclaim(self, asking: GateUser | None) -> bool:
        """QUIT the coldest idle session of one of our pools (not `asking`)."""
        while self._idle:
            user = next(iter(self._idle))
            del self._idle[user]
            if user is not asking and user.retire_coldest_idle():
                self._idle[user] = None  # it may have more
                return True
        return False

    def fair_share(self) -> int:
        """The connections this worker keeps when another worker waits for one: the cap
        split over the workers (rounded up)."""
        cap = self._cap()
        if self.slot is not None and not self.table.closed:
            cap = self.table.node_cap(self.slot, cap)  # this node's share in a fleet
        return max(1, -(-cap // self.workers))

    def _on_sweep(self) -> None:
        """While we hold idle sessions: QUIT one if another worker waits and we hold
        more than our share. Without the share, a session idle only between two rate
        slots was given up, the other worker's taken back the same way, and a provider
        capped at 2 saw a new connection every second message (bench/shaping.py)."""
        self._sweep = None
        if self.slot is None or self.table.closed or not self._idle:
            return
        if self.held > self.fair_share() and self.table.wanted(self.slot, self.loop.time()):
            # In a fleet, every idle session above our part at once: the nodes
            # waiting get the leases a heartbeat later, not one per sweep.
            excess = self.held - self.fair_share() if self.table.fleet() else 1
            for _ in range(excess):
                if not self._reclaim(None):
                    break
        if self._idle:
            self._sweep = self.loop.call_later(RECHECK, self._on_sweep)

    def _wait(self, user: GateUser, seconds: float) -> None:
        self._waiting[user] = None
        at = self.loop.time() + max(seconds, 0.0005)
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(at, self._on_timer), at

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for user in waiting:
            user.on_gate_open()  # may wait again


class ProviderGates:
    """Every gate of one worker, by provider name, over one table."""

    def __init__(self, table: LimitTable, column: int, loop: asyncio.AbstractEventLoop,
                 workers: int = 1) -> None:
        self.table = table
        self.column = column
        self.loop = loop
        self.workers = workers
        self.gates: dict[str, ProviderGate] = {}  # by gate key
        self.book: ReactionBook | None = None  # [[reactions]], when the worker has them

    def gate_for(self, settings: PoolSettings) -> ProviderGate | None:
        """The gate of `settings.provider` (and its source address, `gate_key`) with
        its limits updated; None when the pool serves no [[shaping]] entry."""
        name = settings.provider
        if not name:
            return None
        key = gate_key(settings)
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = ProviderGate(name, self.table, self.column, self.loop,
                                                  key, self.book, self.workers)
        gate.configure(settings)
        return gate

    def reconfigure(self) -> None:
        """The [[reactions]] changed (a reload): every gate takes its rules again."""
        for gate in self.gates.values():
            gate.rules = self.book.rules_for(gate.name) if self.book is not None else ()


def gate_key(settings: PoolSettings) -> str:
    """The shared table's key of a pool's caps: the provider, per source address."""
    if settings.source_address:
        return f"{settings.provider}|{settings.source_address}"
    return settings.provider
