"""DNS answers shared by the workers of one server, so a domain is looked up once per
TTL, not once per worker.

Why: every worker delivers a share of every domain's mail (queue layout format 4,
layout.owner_of) and keeps its own DnsCache, so without this each domain's MX, its
hosts' A/AAAA and its `_mta-sts` TXT were queried by every worker that got one of its
messages. With 10,000 domains at one message each, half the messages found their
worker's cache cold although the other worker had just resolved the domain: a 10k-domain
relay ran at 16% of the 50-domain figure on two workers, 143% on one.

`SharingResolver` answers from the table when a live answer is there and publishes
every fact it fetches (OK, NXDOMAIN, NODATA; failures are not shared, they are brief
and say nothing about the zone, P11). The worker's own DnsCache stays in front of it,
with its TTL floors and ceilings; the table only saves the network query.

Layout of `<queue.path>/dns.shm` (mapped shared like sites.shm, mapped_file.py):
a 64-byte header (magic, then a u64 generation that `clear` counts up: it is part of
every key's hash, so the old entries are unreachable at once without touching them),
then BUCKETS buckets of WAYS slots of SLOT_SIZE bytes.
A slot: crc32 (u32) over the rest, payload length (u16), 2 pad bytes, key hash (u64),
expiry (f64, CLOCK_MONOTONIC: one clock for every process of the machine), then the
payload, a msgpack array (kind, name, status, ttl, records). No lock: a writer puts a
whole slot with one copy, and a reader that meets a slot half written by another
process (or two writers that raced) sees a crc that does not match and treats it as a
miss. The name in the payload is compared too, so a hash collision is a miss, never
another domain's answer. A lossy cache: a full bucket gives up its slot nearest expiry,
and an answer larger than a slot is simply not shared.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgspec

from engine.delivery.mapped_file import MappedTable, map_shared
from engine.dns.mx import Answer, MxRecord, Status
from engine.dns.resolver import Resolver

MAGIC = b"VDNSSH01"
HEADER_SIZE = 64
SLOT_SIZE = 256
WAYS = 8  # 10,000 domains (30,000 answers) fill a quarter of the slots: none overflows
BUCKETS = 16384  # 131,072 slots, 32 MiB mapped; pages untouched take no memory
FILE_SIZE = HEADER_SIZE + BUCKETS * WAYS * SLOT_SIZE
_HEAD = struct.Struct("<IHxxQd")  # crc, payload length, key hash, expiry
_CHECKED = struct.Struct("<HxxQd")  # what the crc covers before the payload
MAX_PAYLOAD = SLOT_SIZE - _HEAD.size

MX, ADDRESSES, TXT = 0, 1, 2
_STATUSES = tuple(Status)
_SHARED = frozenset({Status.OK, Status.NXDOMAIN, Status.NODATA})


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    kind: int
    name: str
    status: int  # index into Status
    ttl: int  # as the nameserver gave it, for the entry's expiry
    records: tuple[Any, ...]


class _MxEntry(msgspec.Struct, array_like=True, frozen=True):
    kind: int
    name: str
    status: int
    ttl: int
    records: tuple[tuple[int, str], ...]  # (preference, host): half the bytes of a map


_encode = msgspec.msgpack.Encoder().encode
_decode_any = msgspec.msgpack.Decoder(_Entry).decode
_decode_mx = msgspec.msgpack.Decoder(_MxEntry).decode


def table_path(queue_path: str) -> str:
    """Where the table of the queue at `queue_path` lives (beside its LMDB files)."""
    return os.path.join(queue_path, "dns.shm")


_GENERATION = struct.Struct("<Q")
_GENERATION_AT = len(MAGIC)


def _key_hash(generation: int, kind: int, name: str) -> int:
    # A hash every process computes alike (Python's hash() is salted per process).
    text = f"{generation}:{kind}:{name}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") or 1


class AnswerTable(MappedTable):
    """The mapped table of one process; any thread (no locks, see the module notes)."""

    def __init__(self, fd: int, mm: mmap.mmap, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(fd, mm)
        self._clock = clock
        self.hits_by_kind = [0, 0, 0]  # MX, ADDRESSES, TXT: answers another handle fetched
        self.published = 0

    @property
    def hits(self) -> int:
        return sum(self.hits_by_kind)

    @classmethod
    def open(cls, path: str) -> AnswerTable:
        """Open (creating) the file. Raises OSError."""
        return cls(*map_shared(path, FILE_SIZE, MAGIC, MAGIC.ljust(HEADER_SIZE, b"\0")))

    @classmethod
    def private(cls, clock: Callable[[], float] = time.monotonic) -> AnswerTable:
        """A table of this process alone (no file): for tests and a worker without one."""
        mm = mmap.mmap(-1, FILE_SIZE)
        mm[:HEADER_SIZE] = MAGIC.ljust(HEADER_SIZE, b"\0")
        return cls(-1, mm, clock)

    def _bucket(self, key: int) -> int:
        return HEADER_SIZE + (key % BUCKETS) * WAYS * SLOT_SIZE

    def _key(self, kind: int, name: str) -> int:
        return _key_hash(_GENERATION.unpack_from(self._mm, _GENERATION_AT)[0], kind, name)

    def clear(self) -> None:
        """Forget every answer, for every worker (`volley ctl mx --flush` of all)."""
        if not self._mm.closed:
            generation = _GENERATION.unpack_from(self._mm, _GENERATION_AT)[0]
            _GENERATION.pack_into(self._mm, _GENERATION_AT, generation + 1)

    def forget(self, kind: int, name: str) -> None:
        """Forget the answer for (kind, name), for every worker."""
        if self._mm.closed:
            return
        key = self._key(kind, name)
        base = self._bucket(key)
        for off in range(base, base + WAYS * SLOT_SIZE, SLOT_SIZE):
            if _HEAD.unpack_from(self._mm, off)[2] == key:
                self._mm[off:off + _HEAD.size] = bytes(_HEAD.size)

    def forget_domain(self, domain: str) -> None:
        """Forget what delivery to `domain` looked up: its MX, the addresses of its MX
        hosts (or of the domain, implicit MX) and its MTA-STS record."""
        mx = self.get(MX, domain)
        for host in {domain, *(r.host for r in (mx.records if mx is not None else ()) if r.host)}:
            self.forget(ADDRESSES, host)
        self.forget(MX, domain)
        self.forget(TXT, f"_mta-sts.{domain}")

    def get(self, kind: int, name: str) -> Answer | None:
        """The live answer for (kind, name), its TTL what is left of it; None if absent,
        expired, torn or the table is closed."""
        if self._mm.closed:
            return None
        key, now, mm = self._key(kind, name), self._clock(), self._mm
        base = self._bucket(key)
        for off in range(base, base + WAYS * SLOT_SIZE, SLOT_SIZE):
            crc, length, slot_key, expiry = _HEAD.unpack_from(mm, off)
            if slot_key != key or expiry <= now or length > MAX_PAYLOAD:
                continue
            raw = mm[off + 4:off + _HEAD.size + length]
            if zlib.crc32(raw) != crc:
                continue  # being written by another process
            try:
                payload = raw[_CHECKED.size:]
                entry: _Entry | _MxEntry = _decode_mx(payload) if kind == MX else _decode_any(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if entry.kind != kind or entry.name != name:
                continue
            self.hits_by_kind[kind] += 1
            records = tuple(MxRecord(p, h) for p, h in entry.records) if kind == MX else entry.records
            return Answer(_STATUSES[entry.status], records, max(1, int(expiry - now)))
        return None

    def put(self, kind: int, name: str, answer: Answer) -> None:
        """Publish a fact for its TTL (failures and zero TTLs are not shared)."""
        if self._mm.closed or answer.status not in _SHARED or answer.ttl <= 0:
            return
        records = tuple((r.preference, r.host) for r in answer.records) if kind == MX else answer.records
        payload = _encode(_Entry(kind, name, _STATUSES.index(answer.status), answer.ttl, records))
        if len(payload) > MAX_PAYLOAD:
            return
        key, now, mm = self._key(kind, name), self._clock(), self._mm
        expiry = now + answer.ttl
        base = self._bucket(key)
        target, soonest = base, float("inf")
        for off in range(base, base + WAYS * SLOT_SIZE, SLOT_SIZE):
            _crc, _length, slot_key, slot_expiry = _HEAD.unpack_from(mm, off)
            if slot_key == key:
                target = off  # the same name again: replace it, keep one copy
                break
            if slot_expiry < soonest:  # empty (0.0) and expired slots come first
                target, soonest = off, slot_expiry
        checked = _CHECKED.pack(len(payload), key, expiry) + payload
        mm[target:target + 4 + len(checked)] = struct.pack("<I", zlib.crc32(checked)) + checked
        self.published += 1


class SharingResolver(Resolver):
    """A Resolver that asks the workers' shared table before the network and publishes
    what the network said."""

    def __init__(self, nameservers: list[str], timeout: float, table: AnswerTable) -> None:
        super().__init__(nameservers, timeout)
        self.table = table

    async def mx(self, domain: str) -> Answer:
        return await self._shared(MX, domain, super().mx)

    async def addresses(self, host: str) -> Answer:
        return await self._shared(ADDRESSES, host, super().addresses)

    async def txt(self, name: str) -> Answer:
        return await self._shared(TXT, name, super().txt)

    async def _shared(self, kind: int, name: str, fetch: Callable[[str], Any]) -> Answer:
        answer = self.table.get(kind, name)
        if answer is None:
            answer = await fetch(name)
            self.table.put(kind, name, answer)
        return answer
