"""Queue ids: 8 bytes = boot number (u32 BE) + sequence (u32 BE).

Uniqueness comes from the store, never from the clock (P12): every worker process
takes a fresh boot number from `QueueStore.next_boot()` (a committed counter), so two
workers, or one worker before and after a restart, can never hand out the same id even
if the wall clock jumps backwards. Big-endian keeps ids of one boot in allocation order
under LMDB's bytewise key comparison.
"""

from __future__ import annotations

import itertools
import struct

_U32_MAX = 0xFFFFFFFF
_ID = struct.Struct(">II")
ID_LEN = 8


class SequenceExhausted(OverflowError):
    """This boot number has handed out all 2**32 - 1 ids; take a new boot."""


class IdAllocator:
    """Hands out queue ids for one boot number.

    `next()` is safe to call from several threads: `itertools.count` advances
    atomically under the GIL, so no lock is needed on the event loop's hot path.
    """

    __slots__ = ("boot", "_prefix", "_seq")

    def __init__(self, boot: int) -> None:
        """Start allocating at sequence 1 under `boot`.

        Raises:
            ValueError: `boot` is not a u32.
        """
        if not 0 <= boot <= _U32_MAX:
            raise ValueError(f"boot number out of u32 range: {boot}")
        self.boot = boot
        self._prefix = boot.to_bytes(4, "big")
        self._seq = itertools.count(1)

    def next(self) -> bytes:
        """Return the next 8-byte id.

        Raises:
            SequenceExhausted: the u32 sequence would overflow; the caller must take
                a new boot number (and a new allocator) rather than wrap around,
                because wrapping would reuse ids that may still be queued.
        """
        seq = next(self._seq)
        if seq > _U32_MAX:
            raise SequenceExhausted(f"boot {self.boot}: id sequence exhausted")
        return self._prefix + seq.to_bytes(4, "big")


def id_text(raw: bytes) -> str:
    """16 lowercase hex chars for an 8-byte id (logs, DSNs, the control socket).

    Raises:
        ValueError: `raw` is not 8 bytes.
    """
    if len(raw) != ID_LEN:
        raise ValueError(f"queue id must be {ID_LEN} bytes, got {len(raw)}")
    return raw.hex()


def id_bytes(text: str) -> bytes:
    """Parse the 16-hex-char form back into the 8-byte id (either case accepted).

    Raises:
        ValueError: not exactly 16 hex digits.
    """
    # bytes.fromhex() tolerates whitespace; an id typed by an operator must not.
    if len(text) != 2 * ID_LEN or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"not a queue id: {text!r}")
    return bytes.fromhex(text)


def split_id(raw: bytes) -> tuple[int, int]:
    """(boot, sequence) of an id.

    Raises:
        struct.error: `raw` is not 8 bytes.
    """
    boot, seq = _ID.unpack(raw)
    return boot, seq
