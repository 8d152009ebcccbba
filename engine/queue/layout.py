"""The due index's key layout: pure functions, shared by the store and its readers.

    owner u16 BE | due u64 BE (ms since epoch) | message id (8) | domain utf-8

One key per (message, recipient domain with PENDING recipients); the owner is the
shard of the domain, so each worker reads its own share with one forward cursor.
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

DUE_HEAD = struct.Struct(">HQ")  # owner, due ms
DUE_FIXED = DUE_HEAD.size + ID_LEN  # 18 bytes before the domain
DUE_VALUE = struct.Struct(">I")  # arrival, epoch seconds
MAX_KEY = 511  # lmdb.h: MDB_MAXKEYSIZE default
# A due key's domain, still utf-8 (C-level, for map() over pages of keys).
key_domain = itemgetter(slice(DUE_FIXED, None))


def stable_shard(domain: str, shards: int) -> int:
    """Owner shard of a domain: crc32 of the lower-cased utf-8 domain, mod `shards`.

    Stable across processes and restarts, unlike hash() (PYTHONHASHSEED).
    """
    if shards <= 1:
        return 0
    return zlib.crc32(domain.lower().encode("utf-8", "surrogatepass")) % shards


def due_key(owner: int, due_ms: int, msg_id: bytes, domain: str) -> bytes:
    """Build one due-index key.

    Raises:
        ValueError: the key would exceed LMDB's 511-byte key limit (domain too long).
    """
    key = DUE_HEAD.pack(owner, due_ms) + msg_id + domain.encode("utf-8", "surrogatepass")
    if len(key) > MAX_KEY:
        raise ValueError(f"recipient domain too long for the due index: {len(key)} bytes")
    return key


def due_keys(rec: MessageRecord, shards: int) -> list[bytes]:
    return [
        due_key(stable_shard(d, shards), int(t * 1000), rec.id, d)
        for d, t in pending_domains(rec).items()
    ]


def due_value(rec: MessageRecord) -> bytes:
    """The value stored under each of the record's due keys: its arrival second."""
    return DUE_VALUE.pack(min(0xFFFFFFFF, max(0, int(rec.received_at))))
