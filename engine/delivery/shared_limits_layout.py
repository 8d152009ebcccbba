"""The layout of the server-wide limits table (`shared_limits.py` has the theory of
operation: why shared memory, the locking, GCRA): where the file lives, how a
provider's name becomes a slot key, and the offsets of each slot's fields.

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
"""

from __future__ import annotations

import hashlib
import math
import os
import struct

from engine.delivery.fleet_share import NODE

MAGIC = b"VOLSHAP4"
SLOTS = 512
COLUMNS = 128  # worker slot numbers 0..127 have a column; others are not counted
HEADER = struct.Struct("<8sIIi")  # magic, slots, columns, fleet
HEADER_SIZE = 64
HEAD = struct.Struct("<QiIddd")  # key, total, (pad), tat, ctat, wanted
REACT = struct.Struct("<ddddd")  # suspended_until, factor, hold_until, ramp_end, stepped_at
COLS = struct.Struct(f"<{COLUMNS}i")
SLOT_SIZE = HEAD.size + REACT.size + COLS.size + NODE.size  # 40 + 40 + 512 + 32
FILE_SIZE = HEADER_SIZE + SLOTS * SLOT_SIZE
I32 = struct.Struct("<i")
F64 = struct.Struct("<d")
TOTAL, TAT, CTAT, WANTED, REACT0, COL0 = 8, 16, 24, 32, 40, 80
NODE0 = COL0 + COLS.size
CREDIT_WAIT = 0.05  # seconds before a worker out of fleet credit looks again
FULL = math.inf  # the answer of `acquire_connection` when the cap is reached


def table_path(queue_path: str) -> str:
    """Where the table of the queue at `queue_path` lives (beside its LMDB files)."""
    return os.path.join(queue_path, "shaping.shm")


def provider_key(name: str) -> int:
    """The slot key of a provider's name: a non-zero 64-bit hash."""
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return key or 1
