"""Server-wide limits per provider: a small table in shared memory that every worker
maps, so a provider capped at 4 connections sees 4 from all workers together and a
rate holds for the whole server.

Why shared memory: the (message, domain) units are spread over all workers (a hash of
the domain and the message id, layout.owner_of), so the mail of one provider (every
domain whose MX is Google's) is delivered by all of them. The
supervisor could broker tokens over the pipes, but a message would then wait for a
round trip through another process; a lock held for a few microseconds costs less.

Every change of a slot holds an fcntl byte-range lock on that slot's bytes (lockf,
a few µs; the kernel drops it if the holder dies). CLOCK_MONOTONIC is one clock for
every process of the machine (loop.time() is time.monotonic()), so the TATs compare.

A worker killed with connections open leaves them counted in its column: the worker
that replaces it (same slot number) zeroes its column at start (`reset_column`), and
any worker zeroes the columns of slot numbers beyond the worker count (a restart with
fewer workers). Slots are never freed: a few hundred providers fit, and a table that
is full (many renamed entries over many reloads) answers "no limit" for the overflow,
logged once; removing the file while stopped empties it.

The file's layout (header, slot fields, offsets) is in shared_limits_layout.py; the
[[reactions]] fields of a slot are read and written by shared_limits_reactions.py.

GCRA (the generic cell rate algorithm, ITU-T I.371): with emission interval T = 1/rate
and tolerance tau = (burst - 1) * T, an event at `now` is allowed when
now >= TAT - tau; then TAT = max(TAT, now) + T. The burst is `burst_of(rate)`:
one, or a tenth of a second's worth above 10/s, never more than one second's worth,
so "600/min" lets 10 go at once at most, never a minute's worth.
"""

from __future__ import annotations

import fcntl
import mmap
from dataclasses import dataclass

from engine.delivery.fleet_share import (
    NODE_CREDIT,
    NODE_WANTED,
    FleetSlots,
    fleet_cap,
    fleet_rate,
    needs_credit,
)
from engine.delivery.mapped_file import MappedTable, map_readonly, map_shared
from engine.delivery.shared_limits_layout import (
    COL0,
    COLS,
    COLUMNS,
    CREDIT_WAIT,
    CTAT,
    F64,
    FILE_SIZE,
    FULL,
    HEAD,
    HEADER,
    HEADER_SIZE,
    I32,
    MAGIC,
    NODE0,
    SLOT_SIZE,
    SLOTS,
    TAT,
    TOTAL,
    WANTED,
    provider_key,
    table_path,
)
from engine.delivery.shared_limits_reactions import ReactionSlots
from engine.observe import log

# Names the rest of the engine, the tools and the tests import from here.
__all__ = ["COLUMNS", "CREDIT_WAIT", "FULL", "LimitTable", "SlotView", "burst_of", "gcra",
           "provider_key", "table_path"]


def burst_of(rate: float) -> float:
    """Events that may go at once: 1, or a tenth of a second's worth above 10/s."""
    return max(1.0, rate / 10)


def gcra(tat: float, now: float, rate: float) -> tuple[float, float]:
    """(wait, new_tat): wait 0 = allowed now (and the TAT to store), else the seconds
    until it would be (and the TAT unchanged). A TAT beyond what the algorithm can
    reach (a reboot reset the clock, the rate was raised) is clamped."""
    interval = 1.0 / rate
    tau = (burst_of(rate) - 1.0) * interval
    tat = min(tat, now + tau + interval)
    if now < tat - tau - 1e-9:
        return tat - tau - now, tat
    return 0.0, max(tat, now) + interval


@dataclass(frozen=True, slots=True)
class SlotView:
    """What a slot holds, read without its lock (for the tools)."""

    total: int
    columns: dict[int, int]  # worker slot → connections, non-zero ones only
    tat: float
    ctat: float


class LimitTable(MappedTable, FleetSlots, ReactionSlots):
    """The mapped table of one process. Loop thread only (one lock holder at a time
    per process is what POSIX record locks assume: they are per process)."""

    def __init__(self, fd: int, mm: mmap.mmap, *, writable: bool) -> None:
        super().__init__(fd, mm)
        self.writable = writable
        self._slots: dict[int, int] = {}  # key → slot index
        self._warned = False

    @classmethod
    def open(cls, path: str, column: int, columns_in_use: int) -> LimitTable:
        """Open (creating) the file at `path` for a worker owning `column`: zero its
        column and the columns of slot numbers >= `columns_in_use`.

        Raises OSError when the file cannot be created or mapped.
        """
        table = cls.open_shared(path)
        table.reset_columns([column, *range(max(0, columns_in_use), COLUMNS)])
        return table

    @classmethod
    def open_shared(cls, path: str) -> LimitTable:
        """Open (creating) the file at `path` read-write, touching no column: the
        supervisor's handle, to restore and lift reactions.

        Raises OSError when the file cannot be created or mapped.
        """
        header = HEADER.pack(MAGIC, SLOTS, COLUMNS, 0).ljust(HEADER_SIZE, b"\0")
        fd, mm = map_shared(path, FILE_SIZE, MAGIC, header)
        return cls(fd, mm, writable=True)

    @classmethod
    def open_readonly(cls, path: str) -> LimitTable | None:
        """The table for reading (the supervisor's `ctl shaping`); None if absent."""
        mapped = map_readonly(path, FILE_SIZE, MAGIC)
        return None if mapped is None else cls(*mapped, writable=False)

    @classmethod
    def private(cls) -> LimitTable:
        """A table of this process alone (no file): for pools built without a queue."""
        mm = mmap.mmap(-1, FILE_SIZE)
        return cls(-1, mm, writable=True)

    # --- locking -----------------------------------------------------------------------
    def _lock(self, slot: int) -> None:
        if self._fd >= 0:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, SLOT_SIZE, HEADER_SIZE + slot * SLOT_SIZE)

    def _unlock(self, slot: int) -> None:
        if self._fd >= 0:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, SLOT_SIZE, HEADER_SIZE + slot * SLOT_SIZE)

    # --- slots -------------------------------------------------------------------------
    def slot_of(self, name: str, *, create: bool = True) -> int | None:
        """The slot of provider `name` (claimed when new and `create`); None when
        the table is full or (read-only / not `create`) the name has none."""
        key = provider_key(name)
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        mm = self._mm
        start = key % SLOTS
        for probe in range(SLOTS):
            i = (start + probe) % SLOTS
            off = HEADER_SIZE + i * SLOT_SIZE
            found = int.from_bytes(mm[off:off + 8], "little")
            if found == key:
                self._slots[key] = i
                return i
            if found == 0:
                if not (create and self.writable):
                    return None
                self._lock(i)
                try:
                    found = int.from_bytes(mm[off:off + 8], "little")
                    if found == 0:
                        mm[off:off + 8] = key.to_bytes(8, "little")
                        found = key
                finally:
                    self._unlock(i)
                if found == key:
                    self._slots[key] = i
                    return i
        if not self._warned:
            self._warned = True
            log.warning("shaping_table_full", provider=name, slots=SLOTS)
        return None

    def reset_columns(self, columns: list[int]) -> None:
        """Zero the connection counts of `columns` in every slot (their processes are
        gone), taking them off each slot's total."""
        cols = [c for c in columns if 0 <= c < COLUMNS]
        mm = self._mm
        for i in range(SLOTS):
            off = HEADER_SIZE + i * SLOT_SIZE
            if mm[off:off + 8] == b"\0" * 8:
                continue
            self._lock(i)
            try:
                total = I32.unpack_from(mm, off + TOTAL)[0]
                for c in cols:
                    at = off + COL0 + 4 * c
                    held = I32.unpack_from(mm, at)[0]
                    if held:
                        total -= held
                        I32.pack_into(mm, at, 0)
                I32.pack_into(mm, off + TOTAL, max(0, total))
            finally:
                self._unlock(i)

    def acquire_connection(self, slot: int, column: int, cap: int, rate: float,
                           now: float) -> float:
        """One connection for `column`: 0.0 when granted (counted), FULL when `cap`
        connections are open server-wide, else the seconds until `rate` allows one."""
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        fleet = self.fleet()
        if fleet:  # this node's part of a fleet's cap and connect rate
            cap = fleet_cap(mm, off + NODE0, cap, fleet)
            rate /= fleet
        self._lock(slot)
        try:
            total = I32.unpack_from(mm, off + TOTAL)[0]
            if cap and total >= cap:
                return FULL
            if rate:
                wait, tat = gcra(F64.unpack_from(mm, off + CTAT)[0], now, rate)
                if wait:
                    return wait
                F64.pack_into(mm, off + CTAT, tat)
            I32.pack_into(mm, off + TOTAL, total + 1)
            if 0 <= column < COLUMNS:
                at = off + COL0 + 4 * column
                I32.pack_into(mm, at, I32.unpack_from(mm, at)[0] + 1)
            return 0.0
        finally:
            self._unlock(slot)

    def release_connection(self, slot: int, column: int) -> None:
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        self._lock(slot)
        try:
            if 0 <= column < COLUMNS:
                at = off + COL0 + 4 * column
                held = I32.unpack_from(mm, at)[0]
                if held <= 0:
                    return  # zeroed by a reset meanwhile: nothing of ours to release
                I32.pack_into(mm, at, held - 1)
            total = I32.unpack_from(mm, off + TOTAL)[0]
            I32.pack_into(mm, off + TOTAL, max(0, total - 1))
        finally:
            self._unlock(slot)

    def take_message(self, slot: int, rate: float, now: float) -> float:
        """One message under `rate`: 0.0 when it may go now (counted), else the
        seconds until one may."""
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        at = off + TAT
        fleet = self.fleet()
        credit = fleet and needs_credit(mm, off + NODE0)
        if fleet and not credit:
            rate = fleet_rate(rate, fleet)
        self._lock(slot)
        try:
            if credit:
                # A fleet's rate: each message spends one of the messages Redis
                # granted this node (rates.py); the local GCRA still paces them.
                left = F64.unpack_from(mm, off + NODE0 + NODE_CREDIT)[0]
                if left < 1.0:
                    F64.pack_into(mm, off + NODE0 + NODE_WANTED, now)
                    return CREDIT_WAIT
            wait, tat = gcra(F64.unpack_from(mm, at)[0], now, rate)
            if not wait:
                F64.pack_into(mm, at, tat)
                if credit:
                    F64.pack_into(mm, off + NODE0 + NODE_CREDIT, left - 1.0)
            return wait
        finally:
            self._unlock(slot)

    def message_wait(self, slot: int, rate: float, now: float) -> float:
        """Seconds until a message may go (0 = now), read without the lock: a hint
        for whether to wake a session; `take_message` decides."""
        off = HEADER_SIZE + slot * SLOT_SIZE
        fleet = self.fleet()
        if fleet:
            if needs_credit(self._mm, off + NODE0):
                if F64.unpack_from(self._mm, off + NODE0 + NODE_CREDIT)[0] < 1.0:
                    # Demand the supervisor must see (a pool may ask here and never
                    # reach take_message): one 8-byte store, as `want`.
                    F64.pack_into(self._mm, off + NODE0 + NODE_WANTED, now)
                    return CREDIT_WAIT
            else:
                rate = fleet_rate(rate, fleet)
        tat = F64.unpack_from(self._mm, off + TAT)[0]
        return gcra(tat, now, rate)[0]

    def want(self, slot: int, until: float) -> None:
        """Say that a connection is awaited until `until` (no lock: one 8-byte store,
        and a lost race only delays an idle session's QUIT by a recheck)."""
        F64.pack_into(self._mm, HEADER_SIZE + slot * SLOT_SIZE + WANTED, until)

    def wanted(self, slot: int, now: float) -> bool:
        """Whether some worker waits for a connection to the provider now."""
        return bool(F64.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE + WANTED)[0] > now)

    def view(self, slot: int) -> SlotView:
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        _key, total, _pad, tat, ctat, _wanted = HEAD.unpack_from(mm, off)
        cols = COLS.unpack_from(mm, off + COL0)
        return SlotView(total, {i: n for i, n in enumerate(cols) if n}, tat, ctat)

    # --- a fleet ([cluster]): FleetSlots (fleet_share.py) reads and writes the node part
    def _node_at(self, slot: int) -> int:
        return HEADER_SIZE + slot * SLOT_SIZE + NODE0

    def _usage(self, slot: int) -> tuple[int, float]:
        off = HEADER_SIZE + slot * SLOT_SIZE
        return I32.unpack_from(self._mm, off + TOTAL)[0], F64.unpack_from(self._mm, off + WANTED)[0]
