"""The suppression outbox: local changes of the list waiting to reach the fleet's Redis.

With `[cluster]` on, every change a node makes to its own list (an operator's add,
remove or import, a bounce's automatic entry in an outcome, a feedback complaint) is
also written here, in the SAME write transaction as the change (`suppression.add` and
`remove` call `record`): a change that committed is in the outbox, so it reaches Redis
however long Redis is down or however often the node restarts. The supervisor drains
the outbox in key order (engine/cluster/suppression_sync.py: HSET/HDEL + XADD) and
deletes what Redis accepted; a crash between the two publishes it again, which is
harmless (adds keep the first entry, a remove of nothing is nothing).

Changes that arrive FROM Redis are written without the outbox (`record` is not
called by `suppression.apply_remote`), so nothing echoes back.

Stored in the `ctl` DB (no named DB of its own: the environment's DB slots are few):
  b"supp-outbox-on"            present while the node is in a cluster; without it
                               `record` writes nothing (one node alone runs as before)
  b"supp-outbox-seq"           u64 BE, the last sequence number given out
  b"supp-outbox/" + u64 BE seq msgpack `Change`
Sequence numbers come from the transaction itself (read, +1, write), so the order is
the commit order across every process, and an op stays re-runnable.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from engine.queue.writetxn import WriteTxn

if TYPE_CHECKING:
    import lmdb

_T = TypeVar("_T")
ON_KEY = b"supp-outbox-on"
SEQ_KEY = b"supp-outbox-seq"
PREFIX = b"supp-outbox/"
_U64 = struct.Struct(">Q")


class Change(msgspec.Struct, array_like=True, frozen=True):
    """One change of the list: `op` "add" (with the entry's reason, source, time) or
    "remove"; `kind` "address" | "domain"; `value` normalized."""

    op: str
    tenant: str
    kind: str
    value: str
    reason: str = ""
    source: str = ""
    created: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Change)


def encode(c: Change) -> bytes:
    return _encoder.encode(c)


def decode(data: bytes) -> Change:
    """Raises msgspec.DecodeError / ValidationError on bytes that are not a Change."""
    return _decoder.decode(data)


def record(w: WriteTxn, changes: Iterable[Change]) -> int:
    """Append `changes` to the outbox when the node is in a cluster (the ON_KEY mark);
    returns how many were written (0 alone). Nothing to record costs nothing: no read."""
    todo = list(changes)
    if not todo:
        return 0
    txn, db = w.txn, w._store._ctl
    if txn.get(ON_KEY, db=db) is None:
        return 0
    raw = txn.get(SEQ_KEY, db=db)
    seq = _U64.unpack(raw)[0] if raw else 0
    for c in todo:
        seq += 1
        txn.put(PREFIX + _U64.pack(seq), encode(c), db=db)
    txn.put(SEQ_KEY, _U64.pack(seq), db=db)
    return len(todo)


def set_on(w: WriteTxn, on: bool) -> bool:
    """Mark the node in a cluster (or not); returns whether the mark was newly set, so
    the caller can seed the outbox with the list the node already had."""
    txn, db = w.txn, w._store._ctl
    if not on:
        txn.delete(ON_KEY, db=db)
        return False
    return bool(txn.put(ON_KEY, b"1", db=db, overwrite=False))


def pending(txn: lmdb.Transaction[bytes], db: lmdb._Database,
            limit: int) -> list[tuple[bytes, Change]]:
    """Up to `limit` (key, change) of the outbox, oldest first. An entry that does not
    decode (written by a newer engine?) is returned as a "skip" change so the drain
    deletes it instead of stopping on it for ever."""
    out: list[tuple[bytes, Change]] = []
    with txn.cursor(db=db) as cur:
        if not cur.set_range(PREFIX):
            return out
        for k, data in cur:
            if not k.startswith(PREFIX) or len(out) >= limit:
                break
            try:
                out.append((bytes(k), decode(data)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                out.append((bytes(k), Change("skip", "", "", "")))
    return out


def delete(keys: Iterable[bytes]) -> Callable[[WriteTxn], int]:
    """An op deleting the outbox entries Redis has accepted; returns how many."""
    wanted = list(keys)

    def op(w: WriteTxn) -> int:
        return sum(1 for k in wanted if w.txn.delete(k, db=w._store._ctl))

    return op


class OutboxViews:
    """The read side: methods of `QueueStore` (mixed in through SuppressionViews)."""

    _ctl: lmdb._Database  # provided by QueueStore (store.py)

    def _read(self, fn: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        raise NotImplementedError

    def supp_outbox(self, limit: int = 500) -> list[tuple[bytes, Change]]:
        """Up to `limit` waiting changes, oldest first. Raises StorageError."""
        return self._read(lambda t: pending(t, self._ctl, limit))

    def supp_outbox_count(self) -> int:
        """Changes waiting (a scan of the outbox keys: for status and tests, not a hot
        path). Raises StorageError."""
        def count(t: lmdb.Transaction[bytes]) -> int:
            n = 0
            with t.cursor(db=self._ctl) as cur:
                if cur.set_range(PREFIX):
                    for k in cur.iternext(keys=True, values=False):
                        if not k.startswith(PREFIX):
                            break
                        n += 1
            return n

        return self._read(count)
