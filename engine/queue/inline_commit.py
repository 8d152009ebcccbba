"""Group commit on the event loop thread, for the "batch" and "memory" durability levels.

Without a flush inside the commit, an LMDB write transaction of a batch takes tens of
microseconds, so handing it to a thread costs more than it saves: every py-lmdb call
releases the GIL, and with the loop thread busy each release is a thread switch. Measured
in-process (one worker, 50 pipelining sessions, 1 KB, memory level, 3 runs each):
threaded 141-188 us of server CPU per message, inline 119-128 us (the protocol alone,
with no storage, costs ~125). So these levels commit here, once per loop iteration:
everything submitted while the loop handled one round of reads is one transaction.

"fsync" keeps the thread (engine.queue.commit): its flush takes a fraction of a
millisecond to milliseconds, which must never stall the loop (house rule 4).
"batch" flushes every batch_interval in the default executor; `mdb_env_sync` takes no
lock, so commits go on meanwhile.

Same interface as `Committer`: both are a `committer.QueueCommitter`.
"""

from __future__ import annotations

import asyncio

from engine.errors import StorageError, StoragePanic
from engine.observe import log
from engine.queue.committer import Callback, CommitStats, Op
from engine.queue.store import QueueStore


class InlineCommitter:
    """Commits once per loop iteration on the loop thread (a `QueueCommitter`)."""

    def __init__(self, store: QueueStore, loop: asyncio.AbstractEventLoop, *,
                 durability: str, batch_interval: float = 0.05, max_batch: int = 512) -> None:
        """Raises ValueError for the "fsync" level (it needs the threaded Committer)
        or a durability different from the store's."""
        if durability == "fsync" or durability != store.durability:
            raise ValueError(f"inline commit is for batch/memory stores, not {durability!r}")
        self._store = store
        self._loop = loop
        self._durability = durability
        self._interval = batch_interval
        self._max_batch = max_batch
        self._pending: list[tuple[Op, Callback]] = []
        self._scheduled = False
        self._closed = False
        self._dirty = False
        self._flusher: asyncio.TimerHandle | None = None
        self._syncing: asyncio.Future[None] | None = None
        self._panic: StoragePanic | None = None
        self.stats = CommitStats()
        self.panicked = False

    def start(self) -> None:
        if self._durability == "batch":
            self._flusher = self._loop.call_later(self._interval, self._flush_tick)

    def submit(self, op: Op, callback: Callback) -> None:
        """Queue `op` for this loop iteration's transaction; `callback(result)` runs
        after the commit. Raises RuntimeError after stop()."""
        if self._closed:
            raise RuntimeError("committer is stopped")
        self._pending.append((op, callback))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._commit)

    def _commit(self) -> None:
        # Take what this iteration gathered; ops submitted by the callbacks below (a
        # pipelined next message) form the next iteration's batch.
        self._scheduled = False
        taken, self._pending = self._pending, []
        for start in range(0, len(taken), self._max_batch):
            batch = taken[start : start + self._max_batch]
            results = self._write([op for op, _ in batch])
            st = self.stats
            st.batches += 1
            st.ops += len(batch)
            st.largest_batch = max(st.largest_batch, len(batch))
            for (_, callback), result in zip(batch, results):
                try:
                    callback(result)
                except Exception as err:  # one bad callback must not starve the rest
                    self._loop.call_exception_handler(
                        {"message": "commit callback raised", "exception": err})

    def _write(self, ops: list[Op]) -> list[object]:
        n = len(ops)
        if self._panic is not None:
            return [self._panic] * n
        try:
            results = list(self._store.write(ops))
        except StoragePanic as err:
            self._panic, self.panicked = err, True
            return [err] * n
        except StorageError as err:  # QueueFull included: nothing of the batch landed
            return [err] * n
        except Exception as err:  # a bug below us: never a 250 for it
            log.error("group_commit_failed", error=repr(err))
            failure = StorageError(f"commit failed: {type(err).__name__}")
            failure.__cause__ = err
            return [failure] * n
        self._dirty = True
        return results

    def _flush_tick(self) -> None:
        self._flusher = None
        if self._closed:
            return
        if self._dirty and (self._syncing is None or self._syncing.done()):
            self._dirty = False
            self._syncing = self._loop.run_in_executor(None, self._sync)
        self._flusher = self._loop.call_later(self._interval, self._flush_tick)

    def _sync(self) -> None:
        try:
            self._store.sync()
            self.stats.syncs += 1
        except StorageError as err:
            # A failed flush may have dropped dirty pages: stop acking and restart.
            log.error("queue_flush_failed", error=str(err))
            self._panic, self.panicked = StoragePanic(f"flush failed: {err}"), True

    async def stop(self) -> None:
        """Commit what is pending, flush once more ("batch"), refuse later submits."""
        if self._closed:
            return
        self._commit()
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
        if self._syncing is not None:
            await self._syncing
        if self._durability == "batch" and self._dirty:
            await self._loop.run_in_executor(None, self._sync)
