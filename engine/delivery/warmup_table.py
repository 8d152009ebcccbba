"""Warm-up volume per (source address, provider) this hour, shared by every worker: a
small table in shared memory beside the queue, as shared_limits.py keeps the
[[shaping]] caps (one worker owns a domain, but one provider's domains are spread over
all of them, and a source's allowance is for the whole server).

Layout of the file (`<queue.path>/warmup.shm`, created by the first worker to open it):
a 64-byte header (magic, slot count), then `SLOTS` slots of

    key   u64  hash of "address provider" (0 = free); open addressing, linear probing
    hour  i64  the UTC clock hour (epoch seconds // 3600) that `used` counts
    used  i64  messages handed to connections from the address for the provider

A slot whose hour is not the current one counts 0: the count starts again each clock
hour, with no sweep. Each change holds an fcntl lock on the slot's bytes (the kernel
drops it if the holder dies). Slots are never freed; a full table (thousands of
source × provider pairs) answers "no count" for the rest, logged once, and the
overflow is then not held to its schedule until the file is removed while stopped.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct

from engine.delivery.mapped_file import MappedTable, map_readonly, map_shared
from engine.observe import log

MAGIC = b"VOLWARM1"
SLOTS = 4096
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sI")
_SLOT = struct.Struct("<Qqq")
SLOT_SIZE = _SLOT.size
FILE_SIZE = HEADER_SIZE + SLOTS * SLOT_SIZE


def table_path(queue_path: str) -> str:
    """Where the table of the queue at `queue_path` lives (beside its LMDB files)."""
    return os.path.join(queue_path, "warmup.shm")


def pair_key(address: str, provider: str) -> int:
    digest = hashlib.blake2b(f"{address} {provider}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class WarmupTable(MappedTable):
    """One process's mapping. Loop thread only (POSIX record locks are per process)."""

    def __init__(self, fd: int, mm: mmap.mmap, *, writable: bool) -> None:
        super().__init__(fd, mm)
        self.writable = writable
        self._slots: dict[int, int] = {}
        self._warned = False

    @classmethod
    def open(cls, path: str) -> WarmupTable:
        """Open (creating) the table at `path`. Raises OSError."""
        header = _HEADER.pack(MAGIC, SLOTS).ljust(HEADER_SIZE, b"\0")
        fd, mm = map_shared(path, FILE_SIZE, MAGIC, header)
        return cls(fd, mm, writable=True)

    @classmethod
    def open_readonly(cls, path: str) -> WarmupTable | None:
        """For `volley ctl warmup` (the supervisor); None when no worker made it yet."""
        mapped = map_readonly(path, FILE_SIZE, MAGIC)
        return None if mapped is None else cls(*mapped, writable=False)

    @classmethod
    def private(cls) -> WarmupTable:
        """A table of this process alone (no file): pools built without a queue."""
        return cls(-1, mmap.mmap(-1, FILE_SIZE), writable=True)

    def _lock(self, slot: int, op: int) -> None:
        if self._fd >= 0:
            fcntl.lockf(self._fd, op, SLOT_SIZE, HEADER_SIZE + slot * SLOT_SIZE)

    def _slot(self, key: int, create: bool) -> int | None:
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        mm = self._mm
        for probe in range(SLOTS):
            i = (key + probe) % SLOTS
            off = HEADER_SIZE + i * SLOT_SIZE
            found = int.from_bytes(mm[off:off + 8], "little")
            if found == 0 and create and self.writable:
                self._lock(i, fcntl.LOCK_EX)
                try:
                    found = int.from_bytes(mm[off:off + 8], "little")
                    if found == 0:
                        _SLOT.pack_into(mm, off, key, 0, 0)
                        found = key
                finally:
                    self._lock(i, fcntl.LOCK_UN)
            if found == key:
                self._slots[key] = i
                return i
            if found == 0:
                return None
        if not self._warned:
            self._warned = True
            log.warning("warmup_table_full", slots=SLOTS)
        return None

    def take(self, address: str, provider: str, hour: int, limit: int) -> bool:
        """Count one message for (address, provider) in `hour` if fewer than `limit`
        were counted; False (nothing counted) when the allowance is used up."""
        slot = self._slot(pair_key(address, provider), True)
        if slot is None:
            return True
        mm = self._mm
        off = HEADER_SIZE + slot * SLOT_SIZE
        self._lock(slot, fcntl.LOCK_EX)
        try:
            key, at, used = _SLOT.unpack_from(mm, off)
            if at != hour:
                used = 0
            if used >= limit:
                return False
            _SLOT.pack_into(mm, off, key, hour, used + 1)
            return True
        finally:
            self._lock(slot, fcntl.LOCK_UN)

    def used(self, address: str, provider: str, hour: int) -> int:
        """Messages counted for (address, provider) in `hour` (read without the lock)."""
        slot = self._slot(pair_key(address, provider), False)
        if slot is None:
            return 0
        _key, at, used = _SLOT.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE)
        return int(used) if at == hour else 0
