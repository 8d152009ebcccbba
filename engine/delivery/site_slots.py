"""Server-wide connection counts per destination site, so a site's cap holds for the
whole server now that one hot domain is delivered by every worker.

Why: a due unit's owner is a function of the domain and the message id (queue
layout format 4, engine/queue/layout.py `owner_of`), so every worker has a `SitePool`
for a busy site. `max_connections_per_domain`, a [[routes]] `max_connections` and an
operator's `volley ctl throttle --connections` are caps of the destination, not of
one worker: each connection attempt first takes a count in this table, keyed by the
pool's key (site, port, TLS policy, AUTH user, throttled domain, provider, source,
EHLO name), and gives it back when the attempt fails or the connection closes
(engine/delivery/pool_connect.py `_take_connection` / `_give_connection`). A cap of 1
holds with any number of workers.

Layout of `<queue.path>/sites.shm` (mapped like shaping.shm, through mapped_file.py):
a 64-byte header (magic, slot count, column count), then `SLOTS` slots of

    key         u64   hash of the pool key (0 = never used); open addressing, linear probing
    total       i32   connections open (or opening) from all workers
    wanted_by   i32   the worker column that last found the cap reached
    wanted      f64   until when that worker waits (CLOCK_MONOTONIC)
    cols        i32 x COLUMNS   connections per worker column

Unlike the provider table, sites come and go (a bulk relay meets thousands): a slot
whose total is 0 may be taken over by another key once no slot is empty. A slot is
never emptied, so probe chains stay whole; a claim (or a take-over) holds the header
lock, and a process that remembers a key's slot checks the key under the slot's lock
before counting, so two slots never count one key. A key whose slot is taken over is
looked up again. With every slot holding open connections (4,096 sites at once) a new
site is not counted: logged once, its connections then follow its pool's own limit.

Every change holds an fcntl byte-range lock on the slot's bytes (a few µs, dropped by
the kernel if the holder dies). A worker killed with connections open leaves them in
its column: its successor (same slot number) zeroes the column at start, as any
worker zeroes the columns of slot numbers past the worker count (`reset_columns`).

Sharing a cap between workers: a worker that finds the cap reached marks the slot
wanted (its column, until when) and looks again every `RECHECK` seconds. A worker
that sees another's mark keeps at most its share (`share`: the cap over the workers,
rounded up) of sessions: the pool's limit shrinks (pool_connect.py), busy sessions over
it QUIT when they ask for their next job and idle ones at the next look; under a cap
smaller than the worker count the share is the whole cap for `TURN` seconds, then none,
so every worker gets turns.
Backoff stays per worker: each worker learns on its own that a site is dead.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import mmap
import os
import struct
from typing import Protocol

from engine.delivery.mapped_file import MappedTable, map_shared
from engine.observe import log

MAGIC = b"VOLSITE1"
SLOTS = 4096
COLUMNS = 128  # worker slot numbers 0..127 have a column, as in shared_limits.py
_HEADER = struct.Struct("<8sII")
HEADER_SIZE = 64
_HEAD = struct.Struct("<Qiid")  # key, total, wanted_by, wanted
_COLS = struct.Struct(f"<{COLUMNS}i")
SLOT_SIZE = _HEAD.size + _COLS.size  # 24 + 512
FILE_SIZE = HEADER_SIZE + SLOTS * SLOT_SIZE
_I32 = struct.Struct("<i")
_KEY = struct.Struct("<Q")
_WANT = struct.Struct("<id")  # wanted_by, wanted
_TOTAL, _WANTED_BY, _COL0 = 8, 12, 24
UNCOUNTED = -1  # `acquire`'s slot when the table had none for the key
RECHECK = 0.1  # seconds between looks at a reached cap (another worker's close)
TURN = 1.0  # seconds a worker keeps a connection another waits for, under cap < workers


def table_path(queue_path: str) -> str:
    """Where the table of the queue at `queue_path` lives (beside its LMDB files)."""
    return os.path.join(queue_path, "sites.shm")


def site_hash(name: str) -> int:
    """The slot key of a pool key's text: a non-zero 64-bit hash."""
    key = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"),
                                         digest_size=8).digest(), "little")
    return key or 1


class SiteTable(MappedTable):
    """The mapped table of one process. Loop thread only (POSIX record locks are per
    process: one holder at a time per process)."""

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        super().__init__(fd, mm)
        self._slots: dict[int, int] = {}  # key → slot, checked under the slot's lock
        self._warned = False

    @classmethod
    def open(cls, path: str, column: int, columns_in_use: int) -> SiteTable:
        """Open (creating) the file for the worker of `column`: zero its column and
        those of slot numbers >= `columns_in_use`. Raises OSError."""
        header = _HEADER.pack(MAGIC, SLOTS, COLUMNS).ljust(HEADER_SIZE, b"\0")
        table = cls(*map_shared(path, FILE_SIZE, MAGIC, header))
        table.reset_columns([column, *range(max(0, columns_in_use), COLUMNS)])
        return table

    @classmethod
    def private(cls) -> SiteTable:
        """A table of this process alone (no file, no locks)."""
        return cls(-1, mmap.mmap(-1, FILE_SIZE))

    def _lock(self, start: int, length: int) -> None:
        if self._fd >= 0:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, length, start)

    def _unlock(self, start: int, length: int) -> None:
        if self._fd >= 0:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start)

    @staticmethod
    def _off(slot: int) -> int:
        return HEADER_SIZE + slot * SLOT_SIZE

    def _key_at(self, slot: int) -> int:
        return int(_KEY.unpack_from(self._mm, self._off(slot))[0])

    def _claim(self, key: int) -> int | None:
        """The key's slot: found, a never-used one claimed, or (none left) one with no
        connection taken over. Under the header lock, so one key never gets two."""
        self._lock(0, HEADER_SIZE)
        try:
            spare = None
            start = key % SLOTS
            for probe in range(SLOTS):
                i = (start + probe) % SLOTS
                found = self._key_at(i)
                if found == key:
                    return i
                if found == 0:
                    spare = i
                    break
                if spare is None and _I32.unpack_from(self._mm, self._off(i) + _TOTAL)[0] == 0:
                    spare = i
            if spare is None:
                return None
            off = self._off(spare)
            self._lock(off, SLOT_SIZE)
            try:
                if _I32.unpack_from(self._mm, off + _TOTAL)[0] != 0:
                    return None  # taken meanwhile (rare: the next attempt probes again)
                self._mm[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
                _KEY.pack_into(self._mm, off, key)
            finally:
                self._unlock(off, SLOT_SIZE)
            return spare
        finally:
            self._unlock(0, HEADER_SIZE)

    def acquire(self, key: int, column: int, cap: int) -> tuple[int, bool]:
        """One connection for `column` under `cap` (0: none): (slot, True) counted in
        the slot, (slot, False) when `cap` connections are open server-wide, and
        (UNCOUNTED, True) when the table has no slot to spare."""
        for _ in range(3):
            slot = self._slots.get(key)
            if slot is None:
                slot = self._claim(key)
                if slot is None:
                    break
                self._slots[key] = slot
            off = self._off(slot)
            self._lock(off, SLOT_SIZE)
            try:
                if self._key_at(slot) != key:  # taken over: look it up again
                    del self._slots[key]
                    continue
                total = _I32.unpack_from(self._mm, off + _TOTAL)[0]
                if cap and total >= cap:
                    return slot, False
                _I32.pack_into(self._mm, off + _TOTAL, total + 1)
                if 0 <= column < COLUMNS:
                    at = off + _COL0 + 4 * column
                    _I32.pack_into(self._mm, at, _I32.unpack_from(self._mm, at)[0] + 1)
                return slot, True
            finally:
                self._unlock(off, SLOT_SIZE)
        if not self._warned:
            self._warned = True
            log.warning("site_table_full", slots=SLOTS)
        return UNCOUNTED, True

    def release(self, slot: int, column: int) -> None:
        """Give back one connection `acquire` counted in `slot` for `column`."""
        off = self._off(slot)
        self._lock(off, SLOT_SIZE)
        try:
            if 0 <= column < COLUMNS:
                at = off + _COL0 + 4 * column
                held = _I32.unpack_from(self._mm, at)[0]
                if held <= 0:
                    return  # zeroed by a reset meanwhile: nothing of ours is counted
                _I32.pack_into(self._mm, at, held - 1)
            total = _I32.unpack_from(self._mm, off + _TOTAL)[0]
            _I32.pack_into(self._mm, off + _TOTAL, max(0, total - 1))
        finally:
            self._unlock(off, SLOT_SIZE)

    def want(self, slot: int, column: int, until: float) -> None:
        """`column` waits for a connection until `until` (no lock: a lost race only
        delays another worker's yielding by a recheck)."""
        _WANT.pack_into(self._mm, self._off(slot) + _WANTED_BY, column, until)

    def wanted_by_other(self, slot: int, column: int, now: float) -> bool:
        """Whether a worker other than `column` waits for a connection now."""
        by, until = _WANT.unpack_from(self._mm, self._off(slot) + _WANTED_BY)
        return bool(by != column and until > now)

    def count(self, key: int) -> tuple[int, dict[int, int]]:
        """(total, column → count) of a key, without locks (tests and tools)."""
        start = key % SLOTS
        for probe in range(SLOTS):
            i = (start + probe) % SLOTS
            found = self._key_at(i)
            if found == key:
                off = self._off(i)
                cols = _COLS.unpack_from(self._mm, off + _COL0)
                return (_I32.unpack_from(self._mm, off + _TOTAL)[0],
                        {c: n for c, n in enumerate(cols) if n})
            if found == 0:
                break
        return 0, {}

    def reset_columns(self, columns: list[int]) -> None:
        """Zero the counts of `columns` in every slot (their processes are gone)."""
        cols = [c for c in columns if 0 <= c < COLUMNS]
        for i in range(SLOTS):
            if self._key_at(i) == 0:
                continue
            off = self._off(i)
            self._lock(off, SLOT_SIZE)
            try:
                total = _I32.unpack_from(self._mm, off + _TOTAL)[0]
                for c in cols:
                    at = off + _COL0 + 4 * c
                    held = _I32.unpack_from(self._mm, at)[0]
                    if held:
                        total -= held
                        _I32.pack_into(self._mm, at, 0)
                _I32.pack_into(self._mm, off + _TOTAL, max(0, total))
            finally:
                self._unlock(off, SLOT_SIZE)


class SiteUser(Protocol):
    def on_gate_open(self) -> None:
        """The site may have room again: dispatch if work remains."""

    def yield_site(self, contended: bool) -> bool:
        """When `contended` (another worker waits for the site), QUIT an idle session
        if this pool can spare one; True while the pool still has idle sessions."""


class SiteGate:
    """One pool's side of its site's server-wide count. Loop thread only."""

    def __init__(self, table: SiteTable, name: str, column: int, workers: int,
                 loop: asyncio.AbstractEventLoop, user: SiteUser) -> None:
        self.table = table
        self.key = site_hash(name)
        self.column = column
        self.workers = max(1, workers)
        self.loop = loop
        self.user = user
        self.held = 0  # connections counted in `slot`
        self.uncounted = 0  # connections granted with no slot (table full)
        self.slot = -1
        self.turn_since = 0.0  # loop.time() when `held` last went from 0 to 1
        self._timer: asyncio.TimerHandle | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._squeezed = False  # `limit` answered below the pool's own limit
        self._yielded_until = 0.0  # a squeezed connection was given up: others first
        self._forgotten = False

    def try_connect(self, cap: int) -> bool:
        """One connection under `cap`; False (the pool is called back) when the site
        has `cap` open server-wide. Each True needs one `release`."""
        if self.table.closed:
            return True
        if self._yielded_until > self.loop.time() and self.contended():
            # We just gave our connection up to a waiting worker: leave it the time of
            # its next look, or we would take it back at once (we are woken first).
            if self._timer is None:
                self._timer = self.loop.call_later(RECHECK, self._recheck)
            return False
        slot, granted = self.table.acquire(self.key, self.column, cap)
        if slot == UNCOUNTED:
            self.uncounted += 1
            return True
        self.slot = slot
        if granted:
            if not self.held:
                self.turn_since = self.loop.time()
            self.held += 1
            return True
        self.table.want(slot, self.column, self.loop.time() + 3 * RECHECK)
        if self._timer is None:
            self._timer = self.loop.call_later(RECHECK, self._recheck)
        return False

    def release(self) -> None:
        """A connection counted by `try_connect` is gone. When the pool's limit was
        squeezed to its share (`limit`), it dispatches again soon: the squeeze ended
        with this connection and nothing else would call it."""
        if self.uncounted:
            self.uncounted -= 1
        elif self.held > 0 and not self.table.closed:
            self.held -= 1
            self.table.release(self.slot, self.column)
            if self._squeezed:
                self._squeezed = False
                self._yielded_until = self.loop.time() + 3 * RECHECK
                self.loop.call_soon(self._wake)

    def limit(self, limit: int) -> int:
        """The pool's connection limit `limit`, or while another worker waits for the
        site and this one holds connections, at most its `share` of it."""
        if self.held and self.contended():
            share = self.share(limit)
            if share < limit:
                self._squeezed = True
                return share
        return limit

    def contended(self) -> bool:
        """Another worker waits for a connection to the site."""
        return (self.slot >= 0 and not self.table.closed
                and self.table.wanted_by_other(self.slot, self.column, self.loop.time()))

    def share(self, cap: int) -> int:
        """The connections this worker keeps while another waits: its part of the cap,
        rounded up; under a cap smaller than the worker count, its turn (0 after TURN)."""
        if cap >= self.workers:
            return -(-cap // self.workers)
        return 0 if self.loop.time() - self.turn_since >= TURN else cap

    def note_idle(self) -> None:
        """The pool has an idle session: look every RECHECK for a worker waiting."""
        if self._sweep is None and not self.table.closed:
            self._sweep = self.loop.call_later(RECHECK, self._on_sweep)

    def forget(self) -> None:
        self._forgotten = True
        for timer in (self._timer, self._sweep):
            if timer is not None:
                timer.cancel()
        self._timer = self._sweep = None

    def _recheck(self) -> None:
        self._timer = None
        self.user.on_gate_open()  # may wait again

    def _wake(self) -> None:
        if not self._forgotten:
            self.user.on_gate_open()

    def _on_sweep(self) -> None:
        self._sweep = None
        if self.table.closed:
            return
        if self.user.yield_site(self.contended()):
            self._sweep = self.loop.call_later(RECHECK, self._on_sweep)


class SiteGates:
    """One worker's site gates over one table; none with a single worker (its pools'
    own limits are the caps then, as before format 4)."""

    def __init__(self, table: SiteTable, column: int, workers: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.table = table
        self.column = column
        self.workers = workers
        self.loop = loop

    def gate_for(self, name: str, user: SiteUser) -> SiteGate | None:
        if self.workers <= 1:
            return None
        return SiteGate(self.table, name, self.column, self.workers, self.loop, user)
