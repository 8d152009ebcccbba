"""The worker-wide cap on outbound connections (`delivery.max_connections`), shared by
every site pool.

Per-site limits alone do not bound a worker: mail spread over 10,000 destinations
would open up to 10,000 × max_connections_per_domain sessions, each costing a socket,
a TLS state and a handshake. Postfix bounds it with `default_process_limit` (100 smtp
processes), PowerMTA with `total-max-smtp-out`. Here a pool takes a slot before it
opens a connection and gives it back when that connection is gone.

A pool that finds no slot free waits in line (first come, first served) and is called
back (`BudgetUser.on_slot_free`) when a slot frees. Slots held by idle sessions are the
cheapest to free: a pool that has to wait makes the coldest idle session of another
pool QUIT (`reclaim`), so a cap full of warm-but-idle connections never starves a site
with work until their `idle_timeout`.
"""

from __future__ import annotations

from typing import Protocol


class BudgetUser(Protocol):
    """What the budget asks of a pool drawing on it (SitePool)."""

    def on_slot_free(self) -> None:
        """A slot is free for the pool that waited in line: take it if work remains."""

    def retire_coldest_idle(self) -> bool:
        """QUIT one idle session (its slot comes back through `give`); False if none."""


class ConnectionBudget:
    """Slots for outbound connections (connecting or open). Loop thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self._waiting: dict[BudgetUser, None] = {}  # insertion-ordered set: FIFO
        self._idle: dict[BudgetUser, None] = {}  # pools that lately had idle sessions

    def take(self, pool: BudgetUser) -> bool:
        """One slot for `pool`; False (and `pool` waits in line) when none is free."""
        if self.used < self.limit:
            self.used += 1
            return True
        if pool not in self._waiting:
            self._waiting[pool] = None
            self.reclaim(pool)
        return False

    def give(self) -> None:
        """A connection is gone: its slot goes to the pools waiting, in order."""
        self.used -= 1
        self._serve_line()

    def resize(self, limit: int) -> None:
        """A reload changed the cap: a larger one serves the line at once; a smaller
        one takes effect as connections close."""
        self.limit = max(1, limit)
        self._serve_line()

    def _serve_line(self) -> None:
        while self.used < self.limit and self._waiting:
            pool = next(iter(self._waiting))
            del self._waiting[pool]
            pool.on_slot_free()  # takes slots if it still has work; may wait again

    def note_idle(self, pool: BudgetUser) -> None:
        """`pool` has an idle session (a slot `reclaim` may free)."""
        self._idle[pool] = None

    def forget(self, pool: BudgetUser) -> None:
        """`pool` is dropped or closing: no callbacks to it any more."""
        self._waiting.pop(pool, None)
        self._idle.pop(pool, None)

    def reclaim(self, asking: BudgetUser) -> bool:
        """Make one idle session of another pool QUIT (its slot returns through `give`
        when the connection is closed). False if no pool has one."""
        while self._idle:
            pool = next(iter(self._idle))
            del self._idle[pool]
            if pool is not asking and pool.retire_coldest_idle():
                self._idle[pool] = None  # it may have more; checked again next time
                return True
        return False

    @property
    def waiting(self) -> int:
        return len(self._waiting)
