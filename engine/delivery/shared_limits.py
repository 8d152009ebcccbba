"""Server-wide limits per provider: a small table in shared memory that every worker
maps, so a provider capped at 4 connections sees 4 from all workers together and a
rate holds for the whole server.

Why shared memory: the (message, domain) units are spread over all workers (a hash of
the domain and the message id, layout.owner_of), so the mail of one provider (every
domain whose MX is Google's) is delivered by all of them. The
supervisor could broker tokens over the pipes, but a message would then wait for a
round trip through another process; a lock held for a few microseconds costs less.

Layout of the file (`<queue.path>/shaping.shm`, created by the first worker to open it):
a 64-byte header (magic, slot count, column count, `fleet`: the live nodes of a
[cluster], 0 when alone), then `SLOTS` fixed slots, each

    key    u64   hash of the provider's name (0 = free); open addressing, linear probing
    total  i32   connections open (or opening) from all workers
    tat    f64   GCRA theoretical arrival time of the next message (CLOCK_MONOTONIC)
    ctat   f64   the same for new connections (connect_rate)
    wanted f64   until when some worker waits for a connection (the cap is reached):
                 the others QUIT idle sessions to the provider instead of keeping them
    suspended_until f64   a [[reactions]] suspension: no connection or transaction
                 before this (CLOCK_MONOTONIC; 0 = none)
    factor, hold_until, ramp_end, stepped_at  f64   a halve_rate reaction: the rate
                 (or cap) is multiplied by `factor` until `hold_until`, then ramps back
                 to 1 by `ramp_end` (ramp.py); `stepped_at` is the last halving
    cols   i32 × COLUMNS  connections per worker slot (the worker's column)
    mode, share, credit, rwanted, granted   this node's part of a fleet's limits
                 (fleet_share.py; written by the supervisor's coordination)

A provider's caps are keyed by its name, or by "name|source address" when its pools
bind a source address (egress pools): the caps then hold per sending address, while
the reaction fields live in the slot of the name alone, so a reaction holds for every
source of the provider.

Every change of a slot holds an fcntl byte-range lock on that slot's bytes (lockf,
a few µs; the kernel drops it if the holder dies). CLOCK_MONOTONIC is one clock for
every process of the machine (loop.time() is time.monotonic()), so the TATs compare.

A worker killed with connections open leaves them counted in its column: the worker
that replaces it (same slot number) zeroes its column at start (`reset_column`), and
any worker zeroes the columns of slot numbers beyond the worker count (a restart with
fewer workers). Slots are never freed: a few hundred providers fit, and a table that
is full (many renamed entries over many reloads) answers "no limit" for the overflow,
logged once; removing the file while stopped empties it.

GCRA (the generic cell rate algorithm, ITU-T I.371): with emission interval T = 1/rate
and tolerance tau = (burst - 1) * T, an event at `now` is allowed when
now >= TAT - tau; then TAT = max(TAT, now) + T. The burst is `burst_of(rate)`:
one, or a tenth of a second's worth above 10/s, never more than one second's worth,
so "600/min" lets 10 go at once at most, never a minute's worth.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass

from engine.delivery.fleet_share import (
    NODE,
    NODE_CREDIT,
    NODE_WANTED,
    FleetSlots,
    fleet_cap,
    fleet_rate,
    needs_credit,
)
from engine.delivery.mapped_file import map_readonly, map_shared
from engine.delivery.ramp import Halving, halve
from engine.observe import log

MAGIC = b"VOLSHAP4"
SLOTS = 512
COLUMNS = 128  # worker slot numbers 0..127 have a column; others are not counted
_HEADER = struct.Struct("<8sIIi")  # magic, slots, columns, fleet
HEADER_SIZE = 64
_HEAD = struct.Struct("<QiIddd")  # key, total, (pad), tat, ctat, wanted
_REACT = struct.Struct("<ddddd")  # suspended_until, factor, hold_until, ramp_end, stepped_at
_COLS = struct.Struct(f"<{COLUMNS}i")
SLOT_SIZE = _HEAD.size + _REACT.size + _COLS.size + NODE.size  # 40 + 40 + 512 + 32
FILE_SIZE = HEADER_SIZE + SLOTS * SLOT_SIZE
_I32 = struct.Struct("<i")
_F64 = struct.Struct("<d")
_TOTAL, _TAT, _CTAT, _WANTED, _REACT0, _COL0 = 8, 16, 24, 32, 40, 80
_NODE0 = _COL0 + _COLS.size
CREDIT_WAIT = 0.05  # seconds before a worker out of fleet credit looks again
FULL = math.inf  # the answer of `acquire_connection` when the cap is reached


def table_path(queue_path: str) -> str:
    """Where the table of the queue at `queue_path` lives (beside its LMDB files)."""
    return os.path.join(queue_path, "shaping.shm")


def provider_key(name: str) -> int:
    """The slot key of a provider's name: a non-zero 64-bit hash."""
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return key or 1


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


class LimitTable(FleetSlots):
    """The mapped table of one process. Loop thread only (one lock holder at a time
    per process is what POSIX record locks assume: they are per process)."""

    def __init__(self, fd: int, mm: mmap.mmap, *, writable: bool) -> None:
        self._fd = fd
        self._mm = mm
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
        header = _HEADER.pack(MAGIC, SLOTS, COLUMNS, 0).ljust(HEADER_SIZE, b"\0")
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

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def close(self) -> None:
        """Unmap (a pool still ending afterwards finds no limit; nothing to release:
        the worker's column is zeroed by its successor)."""
        if not self._mm.closed:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
                total = _I32.unpack_from(mm, off + _TOTAL)[0]
                for c in cols:
                    at = off + _COL0 + 4 * c
                    held = _I32.unpack_from(mm, at)[0]
                    if held:
                        total -= held
                        _I32.pack_into(mm, at, 0)
                _I32.pack_into(mm, off + _TOTAL, max(0, total))
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
            cap = fleet_cap(mm, off + _NODE0, cap, fleet)
            rate /= fleet
        self._lock(slot)
        try:
            total = _I32.unpack_from(mm, off + _TOTAL)[0]
            if cap and total >= cap:
                return FULL
            if rate:
                wait, tat = gcra(_F64.unpack_from(mm, off + _CTAT)[0], now, rate)
                if wait:
                    return wait
                _F64.pack_into(mm, off + _CTAT, tat)
            _I32.pack_into(mm, off + _TOTAL, total + 1)
            if 0 <= column < COLUMNS:
                at = off + _COL0 + 4 * column
                _I32.pack_into(mm, at, _I32.unpack_from(mm, at)[0] + 1)
            return 0.0
        finally:
            self._unlock(slot)

    def release_connection(self, slot: int, column: int) -> None:
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        self._lock(slot)
        try:
            if 0 <= column < COLUMNS:
                at = off + _COL0 + 4 * column
                held = _I32.unpack_from(mm, at)[0]
                if held <= 0:
                    return  # zeroed by a reset meanwhile: nothing of ours to release
                _I32.pack_into(mm, at, held - 1)
            total = _I32.unpack_from(mm, off + _TOTAL)[0]
            _I32.pack_into(mm, off + _TOTAL, max(0, total - 1))
        finally:
            self._unlock(slot)

    def take_message(self, slot: int, rate: float, now: float) -> float:
        """One message under `rate`: 0.0 when it may go now (counted), else the
        seconds until one may."""
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        at = off + _TAT
        fleet = self.fleet()
        credit = fleet and needs_credit(mm, off + _NODE0)
        if fleet and not credit:
            rate = fleet_rate(rate, fleet)
        self._lock(slot)
        try:
            if credit:
                # A fleet's rate: each message spends one of the messages Redis
                # granted this node (rates.py); the local GCRA still paces them.
                left = _F64.unpack_from(mm, off + _NODE0 + NODE_CREDIT)[0]
                if left < 1.0:
                    _F64.pack_into(mm, off + _NODE0 + NODE_WANTED, now)
                    return CREDIT_WAIT
            wait, tat = gcra(_F64.unpack_from(mm, at)[0], now, rate)
            if not wait:
                _F64.pack_into(mm, at, tat)
                if credit:
                    _F64.pack_into(mm, off + _NODE0 + NODE_CREDIT, left - 1.0)
            return wait
        finally:
            self._unlock(slot)

    def message_wait(self, slot: int, rate: float, now: float) -> float:
        """Seconds until a message may go (0 = now), read without the lock: a hint
        for whether to wake a session; `take_message` decides."""
        off = HEADER_SIZE + slot * SLOT_SIZE
        fleet = self.fleet()
        if fleet:
            if needs_credit(self._mm, off + _NODE0):
                if _F64.unpack_from(self._mm, off + _NODE0 + NODE_CREDIT)[0] < 1.0:
                    # Demand the supervisor must see (a pool may ask here and never
                    # reach take_message): one 8-byte store, as `want`.
                    _F64.pack_into(self._mm, off + _NODE0 + NODE_WANTED, now)
                    return CREDIT_WAIT
            else:
                rate = fleet_rate(rate, fleet)
        tat = _F64.unpack_from(self._mm, off + _TAT)[0]
        return gcra(tat, now, rate)[0]

    def want(self, slot: int, until: float) -> None:
        """Say that a connection is awaited until `until` (no lock: one 8-byte store,
        and a lost race only delays an idle session's QUIT by a recheck)."""
        _F64.pack_into(self._mm, HEADER_SIZE + slot * SLOT_SIZE + _WANTED, until)

    def wanted(self, slot: int, now: float) -> bool:
        """Whether some worker waits for a connection to the provider now."""
        return bool(_F64.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE + _WANTED)[0] > now)

    def view(self, slot: int) -> SlotView:
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        _key, total, _pad, tat, ctat, _wanted = _HEAD.unpack_from(mm, off)
        cols = _COLS.unpack_from(mm, off + _COL0)
        return SlotView(total, {i: n for i, n in enumerate(cols) if n}, tat, ctat)

    # --- a fleet ([cluster]): FleetSlots (fleet_share.py) reads and writes the node part
    def _node_at(self, slot: int) -> int:
        return HEADER_SIZE + slot * SLOT_SIZE + _NODE0

    def _usage(self, slot: int) -> tuple[int, float]:
        off = HEADER_SIZE + slot * SLOT_SIZE
        return _I32.unpack_from(self._mm, off + _TOTAL)[0], _F64.unpack_from(self._mm, off + _WANTED)[0]

    # --- reactions (in the slot of the provider's name alone) --------------------------
    def suspended_until(self, slot: int) -> float:
        """CLOCK_MONOTONIC end of the provider's suspension (0 = none); no lock: one
        aligned 8-byte load, and every decision that writes takes the lock."""
        return float(_F64.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE + _REACT0)[0])

    def halving(self, slot: int) -> Halving:
        """The provider's halve_rate state (ramp.py), read without the lock."""
        _s, *h = _REACT.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE + _REACT0)
        return Halving(*h)

    def suspend(self, slot: int, until: float, now: float) -> bool:
        """Suspend the provider until `until`; False (and nothing changes) when a
        suspension is in force already: two workers seeing the same reply fire once."""
        at = HEADER_SIZE + slot * SLOT_SIZE + _REACT0
        self._lock(slot)
        try:
            if _F64.unpack_from(self._mm, at)[0] > now:
                return False
            _F64.pack_into(self._mm, at, until)
            return True
        finally:
            self._unlock(slot)

    def halve(self, slot: int, now: float, duration: float) -> Halving | None:
        """Halve the provider's rate factor (ramp.halve); None when too soon after the
        last halving."""
        off = HEADER_SIZE + slot * SLOT_SIZE + _REACT0
        self._lock(slot)
        try:
            suspended, *old = _REACT.unpack_from(self._mm, off)
            new = halve(Halving(*old), now, duration)
            if new is not None:
                _REACT.pack_into(self._mm, off, suspended, *new)
            return new
        finally:
            self._unlock(slot)

    def set_reaction(self, slot: int, *, suspended_until: float | None = None,
                     halving: Halving | None = None) -> None:
        """Write a reaction's state as given (restored after a restart, or lifted with
        0 / ramp.NONE); a None part is left as it is."""
        off = HEADER_SIZE + slot * SLOT_SIZE + _REACT0
        self._lock(slot)
        try:
            old_s, *old_h = _REACT.unpack_from(self._mm, off)
            _REACT.pack_into(self._mm, off,
                             old_s if suspended_until is None else suspended_until,
                             *(old_h if halving is None else halving))
        finally:
            self._unlock(slot)

    def clear_reactions(self) -> None:
        """Zero every slot's reaction fields (the supervisor at start, before it
        restores the reactions it saved: CLOCK_MONOTONIC restarts with the machine)."""
        for i in range(SLOTS):
            off = HEADER_SIZE + i * SLOT_SIZE
            if self._mm[off:off + 8] != b"\0" * 8:
                self.set_reaction(i, suspended_until=0.0, halving=Halving(0.0, 0.0, 0.0, 0.0))
