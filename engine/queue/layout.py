"""The due index's key layout: pure functions, shared by the store and its readers.

    owner u16 BE | lane u8 | due u64 BE (ms since epoch) | message id (8) | domain utf-8

One key per (message, recipient domain with PENDING recipients); the owner is the
worker that delivers the unit (`owner_of`), so each worker reads its own share with one
forward cursor. The owner is a function of the domain AND the message id (format 4):
one hot destination's units are spread over every worker, while the units of one
message still land deterministically (a rewrite of the record finds its keys again).
The connection caps that a single owner used to enforce alone are server-wide since
(engine/delivery/site_slots.py).
The lane is 9 - the message's priority (0-9, default 5): within an owner the keys of
priority 9 come first, so the scheduler reads the lanes highest priority first, each
from its own resume point, and a priority message queued behind 100,000 newsletter
units is the first thing its scan finds (engine/delivery/scheduler.py). Within one
(owner, lane) run the keys are in due order, as they were before lanes existed.
The value is the message's arrival time (u32 BE epoch seconds): the control socket's
queue summary (ages by domain, like qshape) then reads only this index, never the
records (1,000,000 records take ~2 s to decode; the index ~0.5 s to walk).
"""

from __future__ import annotations

import struct
import zlib
from operator import itemgetter

from engine.queue.ids import ID_LEN
from engine.queue.records import MessageRecord, pending_domains

DUE_HEAD = struct.Struct(">HBQ")  # owner, lane, due ms
DUE_FIXED = DUE_HEAD.size + ID_LEN  # 19 bytes before the domain
RUN_LEN = 3  # owner | lane: the prefix of one run of keys in due order
DUE_VALUE = struct.Struct(">I")  # arrival, epoch seconds
MAX_KEY = 511  # lmdb.h: MDB_MAXKEYSIZE default
PRIORITIES = 10  # priorities 0..9, one lane each
DEFAULT_PRIORITY = 5
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: a Weyl sequence's step (owner_of)
# A due key's domain, still utf-8, and its message id (C-level, for map() over pages of keys).
key_domain = itemgetter(slice(DUE_FIXED, None))
key_id = itemgetter(slice(DUE_HEAD.size, DUE_FIXED))
key_run = itemgetter(slice(0, RUN_LEN))


def lane_of(priority: int) -> int:
    """The lane of a priority: 0 for 9 (scanned first) ... 9 for 0. Out of range
    priorities are clamped (a record is validated where it is made; this never fails)."""
    return 9 - min(9, max(0, priority))


DEFAULT_LANE = lane_of(DEFAULT_PRIORITY)


def key_due(key: bytes) -> int:
    """A due key's due time, ms since the epoch."""
    return int(DUE_HEAD.unpack_from(key)[2])


def next_run(run: bytes) -> bytes:
    """The smallest key after every key of the run `run` (owner | lane, 3 bytes)."""
    return (int.from_bytes(run, "big") + 1).to_bytes(RUN_LEN, "big")


def stable_shard(domain: str, shards: int) -> int:
    """Home shard of a domain: crc32 of the lower-cased utf-8 domain, mod `shards`.
    (Before format 4 it owned every unit of the domain; `owner_of` spreads them.)

    Stable across processes and restarts, unlike hash() (PYTHONHASHSEED).
    """
    if shards <= 1:
        return 0
    return zlib.crc32(domain.lower().encode("utf-8", "surrogatepass")) % shards


def owner_of(domain: str, msg_id: bytes, shards: int) -> int:
    """The worker (shard) that delivers the unit (message `msg_id`, `domain`).

    The domain's home shard (`stable_shard`) plus the place of the id's sequence
    (ids.py: boot u32 | sequence u32, counting up per worker) in a Weyl sequence:
    frac(sequence x golden ratio) scaled to `shards`. Consecutive ids, and ids of any
    stride (a client alternating between 2 domains gives each domain every other id),
    fall evenly on every shard; a plain `sequence % shards` gave every other id to
    the same shard. Stable across processes and restarts: only the domain, the id
    and the shard count go in.
    """
    if shards <= 1:
        return 0
    home = zlib.crc32(domain.lower().encode("utf-8", "surrogatepass"))
    weyl = (int.from_bytes(msg_id[-4:], "big") * _GOLDEN) & 0xFFFFFFFF
    return (home + ((weyl * shards) >> 32)) % shards


def due_key(owner: int, due_ms: int, msg_id: bytes, domain: str, lane: int = DEFAULT_LANE) -> bytes:
    """Build one due-index key.

    Raises:
        ValueError: the key would exceed LMDB's 511-byte key limit (domain too long).
    """
    key = DUE_HEAD.pack(owner, lane, due_ms) + msg_id + domain.encode("utf-8", "surrogatepass")
    if len(key) > MAX_KEY:
        raise ValueError(f"recipient domain too long for the due index: {len(key)} bytes")
    return key


def due_keys(rec: MessageRecord, shards: int) -> list[bytes]:
    lane = lane_of(rec.priority)
    return [
        due_key(owner_of(d, rec.id, shards), int(t * 1000), rec.id, d, lane)
        for d, t in pending_domains(rec).items()
    ]


def due_value(rec: MessageRecord) -> bytes:
    """The value stored under each of the record's due keys: its arrival second."""
    return DUE_VALUE.pack(min(0xFFFFFFFF, max(0, int(rec.received_at))))
