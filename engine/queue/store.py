"""The queue store: the ONLY module of the engine that imports lmdb.

Layout (named DBs in one environment):
  meta  b"boot" → u32 BE boot counter; b"shards" → u16 BE shard count of the due index;
        b"format" → u8 layout version
  msg   id (8 bytes) → encoded MessageRecord
  body  id → raw message bytes
  due   owner u16 BE | lane u8 | due u64 BE (ms since epoch) | id | domain utf-8 → arrival
        u32 BE; one entry per (message, recipient domain with PENDING recipients); the
        lane is 9 - the message's priority (engine/queue/layout.py)
  ctl   control state that must survive a restart (suspensions, throttles): name → bytes
  supp  the suppression list (engine/queue/suppression.py says the key layout)
  camp  campaign counters per tenant and campaign (engine/queue/campaigns.py)

Due keys are a pure function of the stored record and the shard count (see
`records.pending_domains`), so deleting or updating a message recomputes its old keys
from the old record: no reverse index is needed. If the shard count changes between
runs, or the layout's format is older than this engine's, the due index is rebuilt at
open, in the same write transaction that records the new format.

Errors: every lmdb error is mapped to engine.errors at this boundary, so no caller
ever sees an lmdb exception (P4): MAP_FULL/ENOSPC → QueueFull, MDB_PANIC →
StoragePanic, anything else → StorageError.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from typing import TypeVar, cast

import lmdb

from engine.errors import QueueFull, StorageError, StoragePanic
from engine.queue.campaigns import CampaignViews
from engine.queue.layout import due_keys, due_value, stable_shard
from engine.queue.records import decode_record
from engine.queue.store_views import StoreViews
from engine.queue.suppression import SuppressionViews
from engine.queue.writetxn import WriteTxn

# WriteTxn and stable_shard are re-exported: callers name the store and what it hands out.
__all__ = ["DURABILITIES", "FORMAT", "QueueStore", "WriteTxn", "map_error", "stable_shard"]

_T = TypeVar("_T")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# 4: a due key's owner is owner_of(domain, id) (layout.py); 3: due keys carry a priority
# lane; 2: due values carry the arrival time (1: empty). An older queue's index is rebuilt.
FORMAT = 4
DURABILITIES = ("fsync", "batch", "memory")

# lmdb errors raised INSIDE one op's child transaction that leave the parent intact:
# MDB_MAP_FULL and friends are detected while allocating or before touching pages, and
# aborting the child restores the parent exactly (mdb.c nested txns). Any other lmdb
# error inside an op (EIO from a page spill, PANIC, CORRUPTED) aborts the whole batch.
_OP_LOCAL = (
    lmdb.MapFullError,
    lmdb.TxnFullError,
    lmdb.PageFullError,
    lmdb.CursorFullError,
    lmdb.BadValsizeError,
    lmdb.KeyExistsError,
    lmdb.NotFoundError,
)


def map_error(err: lmdb.Error) -> StorageError:
    """Translate an lmdb error into the engine's storage errors (finding 8)."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, lmdb.PanicError):
        return StoragePanic(text)
    if isinstance(err, (lmdb.MapFullError, lmdb.DiskError)):
        return QueueFull(text)
    return StorageError(text)


def _open_environment(path: str, map_size: int, *, flush: bool) -> lmdb.Environment:
    os.makedirs(path, mode=0o700, exist_ok=True)  # P10: not world-writable
    try:
        # finding 4 / P1: sync+metasync and no writemap make commit() the durability
        # point; max_spare_txns=0 so no cached read txn holds a reader slot (finding 7).
        # metasync=False (MDB_NOMETASYNC) under "fsync" too: lmdb.h says the meta
        # page is then flushed by "the next non-MDB_RDONLY commit or
        # mdb_env_sync()", and integrity is kept either way. commit.py acks a batch
        # only after one of those two, so each commit costs one flush, not two.
        return lmdb.open(
            path, map_size=map_size, subdir=True, max_dbs=8, mode=0o600,
            sync=flush, metasync=False, writemap=False, map_async=False,
            max_spare_txns=0, meminit=True,
        )
    except lmdb.Error as err:
        raise map_error(err) from err


class QueueStore(StoreViews, SuppressionViews, CampaignViews):
    """The LMDB environment holding the queue. Open it in the process that uses it:
    never before fork() (finding 9).

    Threads: `write()` may run on one thread (the committer) while reads run on
    another; each read uses its own short read transaction.
    """

    def __init__(self, path: str, *, map_size: int, durability: str = "fsync",
                 shards: int = 1, reserve: int | None = None) -> None:
        """Open (creating if needed) the queue at `path`.

        `reserve` bytes of the map (default: 1% of map_size, at least 128 KiB; a worker
        passes `queue.high_water`'s headroom) are kept free of new messages so outcomes,
        deletes and bounce reports can still commit when the queue is full; otherwise a
        full map could never drain (copy-on-write deletes need pages).

        Raises:
            ValueError: bad durability or shard count.
            StorageError: the environment cannot be opened (including "already open in
                this process", e.g. after fork, finding 9).
        """
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, got {durability!r}")
        if not 1 <= shards <= 0xFFFF:
            raise ValueError(f"shards must be 1..65535, got {shards}")
        self.path = path
        self.durability = durability
        self.shards = shards
        self._resize_lock = threading.Lock()
        self._env = _open_environment(path, map_size, flush=durability == "fsync")
        try:
            self._meta = self._env.open_db(b"meta")
            self._msg = self._env.open_db(b"msg")
            self._body = self._env.open_db(b"body")
            self._due = self._env.open_db(b"due")
            self._ctl = self._env.open_db(b"ctl")
            self._supp = self._env.open_db(b"supp")
            self._camp = self._env.open_db(b"camp")
            self._psize: int = self._env.stat()["psize"]
            self._env.reader_check()  # finding 7: clear slots of dead readers at start
        except lmdb.Error as err:
            self._env.close()
            raise map_error(err) from err
        self._map_pages = self._env.info()["map_size"] // self._psize
        if reserve is None:
            reserve = max(128 * 1024, map_size // 100)
        self._reserve_pages = -(-reserve // self._psize)
        self._used_est = 0  # pages, see _account_put; only touched by the writing thread
        self._closed = False
        try:
            self._check_layout()
            self._used_est = self._read(self._pages_used)
        except BaseException:
            self.close()  # else the path stays "already open in this process"
            raise

    # ---- layout ---------------------------------------------------------------

    def _check_layout(self) -> None:
        def op(w: WriteTxn) -> None:
            txn = w.txn
            fmt = txn.get(b"format", db=self._meta)
            if fmt is not None and fmt[0] > FORMAT:
                raise StorageError(f"queue format {fmt[0]} is newer than this engine")
            old_format = fmt[0] if fmt is not None else FORMAT
            if fmt is None or fmt[0] < FORMAT:
                txn.put(b"format", bytes([FORMAT]), db=self._meta)
            raw = txn.get(b"shards", db=self._meta)
            if raw is None or _U16.unpack(raw)[0] != self.shards or old_format < FORMAT:
                self._rebuild_due(txn)
                txn.put(b"shards", _U16.pack(self.shards), db=self._meta)

        self.write_one(op)

    def _rebuild_due(self, txn: lmdb.Transaction[bytes]) -> None:
        # Owners moved (shard count changed) or the key layout changed (format): recompute
        # every due key from its record. One write transaction: a crash before its commit
        # leaves the old index and the old format, and the next open rebuilds again.
        txn.drop(self._due, delete=False)
        with txn.cursor(db=self._msg) as cur:
            for _, data in cur:
                rec = decode_record(data)
                arrival = due_value(rec)
                for k in due_keys(rec, self.shards):
                    txn.put(k, arrival, db=self._due)

    def _pages_used(self, txn: lmdb.Transaction[bytes]) -> int:
        # Pages in use as this txn sees them (mdb_stat reads the txn's own DB records).
        # Free pages pinned by live readers are not counted, so this is an estimate;
        # the hard MAP_FULL still maps to QueueFull if it is wrong.
        used = 4  # two meta pages, main DB root, slack
        for db in (self._meta, self._msg, self._body, self._due, self._supp, self._camp):
            st = txn.stat(db)
            used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return used

    def _account_put(self, txn: lmdb.Transaction[bytes], body_len: int, n_keys: int, *,
                     headroom: bool = False) -> None:
        # Four mdb_stat calls cost ~10 us and four GIL hand-offs, so keep a pessimistic
        # running count (every record and key may take a page of its own, deletes are
        # not subtracted) and pay for the exact count only when it nears the reserve.
        # `headroom`: a report queued with an outcome may use the reserve (P4).
        self._used_est += 2 + n_keys + body_len // self._psize
        if headroom:
            return
        limit = self._map_pages - self._reserve_pages
        if self._used_est > limit:
            self._used_est = self._pages_used(txn)
            if self._used_est > limit:
                raise QueueFull("queue store full (space reserved for deletes)")

    # ---- writes ---------------------------------------------------------------

    def _begin_write(self) -> lmdb.Transaction[bytes]:
        try:
            return self._env.begin(write=True)
        except lmdb.MapResizedError:
            # lmdb.h mdb_env_set_mapsize: another process grew the map; adopt it once.
            self._adopt_mapsize()
        try:
            return self._env.begin(write=True)
        except lmdb.Error as err:
            raise map_error(err) from err

    def _adopt_mapsize(self) -> None:
        try:
            with self._resize_lock:
                self._env.set_mapsize(0)
                self._map_pages = self._env.info()["map_size"] // self._psize
        except lmdb.Error as err:
            raise map_error(err) from err

    def write(self, ops: list[Callable[[WriteTxn], object]]) -> list[object | BaseException]:
        """Run every op in ONE write transaction and ONE commit (group commit).

        An op that raises an ordinary exception (or hits MAP_FULL / the delete
        reserve, → QueueFull) is rolled back alone and gets the exception as its
        result; the others still commit. Results are in op order. When this returns
        under "fsync" durability, every successful op's pages are on disk, and the
        transaction itself is once the next commit or `sync()` returns (P1; the
        committer waits for one of them before it acks).

        Ops run straight in the batch transaction first: a child transaction per op
        (two more LMDB calls, each handing the GIL to the busy event loop thread and
        back) was measured at +35 us per message under load. (py-lmdb 3.0's get, put
        and delete themselves keep the GIL, measured; the commit and its flush release
        it.) Only when an op fails is the batch redone with
        one child transaction per op, which isolates the failure. Ops must therefore
        be re-runnable: pure functions of the transaction they are given.

        Raises:
            QueueFull: MAP_FULL/ENOSPC at commit; nothing was written.
            StoragePanic: MDB_PANIC; the environment is unusable, restart the worker.
            StorageError: any other lmdb failure; nothing was written.
        """
        if self._closed:
            raise StorageError("queue store is closed")
        results = self._write(ops, isolate=False)
        if results is None:
            results = self._write(ops, isolate=True)
        assert results is not None
        return results

    def _write(
        self, ops: list[Callable[[WriteTxn], object]], *, isolate: bool
    ) -> list[object | BaseException] | None:
        """One attempt; None when an op failed in the shared (not isolated) mode."""
        results: list[object | BaseException] = []
        txn = self._begin_write()
        try:
            for op in ops:
                if not isolate:
                    w = WriteTxn(self, txn)
                    try:
                        results.append(op(w))
                    except (lmdb.Error, Exception) as err:
                        if isinstance(err, lmdb.Error) and not isinstance(err, _OP_LOCAL):
                            raise
                        txn.abort()
                        return None
                    finally:
                        w._txn = None
                    continue
                child = self._env.begin(write=True, parent=txn)
                w = WriteTxn(self, child)
                try:
                    res = op(w)
                    child.commit()
                except lmdb.Error as err:
                    child.abort()
                    if not isinstance(err, _OP_LOCAL):
                        raise
                    results.append(map_error(err))
                except Exception as err:  # the op's own failure: roll back only it
                    child.abort()
                    results.append(err)
                except BaseException:
                    child.abort()
                    raise
                else:
                    results.append(res)
                finally:
                    w._txn = None
            txn.commit()
        except lmdb.Error as err:
            txn.abort()
            raise map_error(err) from err
        except BaseException:
            txn.abort()
            raise
        return results

    def write_one(self, op: Callable[[WriteTxn], _T]) -> _T:
        """Run a single op in its own committed transaction; re-raise its failure.

        Raises:
            Whatever the op raised, or QueueFull/StoragePanic/StorageError as `write`.
        """
        (res,) = self.write([op])
        if isinstance(res, BaseException):
            raise res
        if self.durability == "fsync":
            self.sync()  # durable on return: the meta page too (see lmdb.open above)
        return cast(_T, res)  # not an exception: what `op` returned

    def next_boot(self) -> int:
        """Increment and return the u32 boot counter, committed before it returns.

        Raises:
            StorageError: the counter would overflow u32, or the write failed.
        """

        def op(w: WriteTxn) -> int:
            raw = w.txn.get(b"boot", db=self._meta)
            n = (_U32.unpack(raw)[0] if raw else 0) + 1
            if n > 0xFFFFFFFF:
                raise StorageError("boot counter exhausted")
            w.txn.put(b"boot", _U32.pack(n), db=self._meta)
            return n

        boot = self.write_one(op)
        if self.durability != "fsync":  # write_one already flushed under "fsync"
            self.sync()  # a reused boot number would reuse ids (P12): always flush it
        return boot

    # ---- reads ----------------------------------------------------------------

    def _read(self, fn: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        for attempt in (0, 1):
            try:
                with self._env.begin(write=False) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                if attempt:
                    raise StorageError("map resized twice during one read") from None
                self._adopt_mapsize()
            except lmdb.Error as err:
                raise map_error(err) from err
        raise AssertionError("unreachable")

    # ---- maintenance ----------------------------------------------------------

    def sync(self) -> None:
        """Force a flush to disk (used by "batch" durability).

        Raises:
            StorageError/QueueFull/StoragePanic: the flush failed; treat as data loss risk.
        """
        try:
            self._env.sync(True)
        except lmdb.Error as err:
            raise map_error(err) from err

    def reader_check(self) -> int:
        """Clear reader slots of dead processes (finding 7); returns how many."""
        try:
            return int(self._env.reader_check())
        except lmdb.Error as err:
            raise map_error(err) from err

    def close(self) -> None:
        """Close the environment; idempotent. No write may be running."""
        if not self._closed:
            self._closed = True
            self._env.close()
