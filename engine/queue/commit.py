"""Group commit: one thread, one LMDB transaction and one flush per batch.

PERFORMANCE.md "Group commit is the lever": one flushed commit per message gives about
1,100 msgs/s, one commit for everything pending about 10,000. The committer thread
waits for work, takes everything pending (up to max_batch), runs it through
`QueueStore.write` (one transaction, one fsync), and wakes the whole batch with ONE
`loop.call_soon_threadsafe`. Ops submitted while a commit runs queue up and form the
next batch, so batches grow exactly when load does.

Gathering: a commit costs ~300 us of CPU whatever its size (page writes, fdatasync, the
hand-offs) and ~20 us per op, so with many lock-step sessions the size of the batch sets
the cost per message. When the previous batch held N >= 2 ops, the thread waits up to
`gather_wait` (3 ms) for N ops to be pending before it commits. A lone client (batches
of one) never waits; stop() ends a wait at once.

Under "fsync" durability a callback runs only after the commit (and so the flush)
returned: the inbound side may answer 250 from it (P1). Under "batch", callbacks run
after the commit and the thread flushes every batch_interval (a crash of the machine
may lose that window); "memory" never flushes.

The event loop thread never blocks here: `submit` appends to a deque and, only when the
thread is idle, wakes it by releasing a lock the thread waits on (C code: no
Python-level Condition on either side of the hand-off). Not a queue.SimpleQueue: its
get(timeout) can wait forever on CPython 3.11 (after a spurious acquire it recomputes
the timeout, and a negative one means "block"), seen here as a hung worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

from engine.errors import StorageError, StoragePanic
from engine.queue.committer import Callback, CommitStats, Op
from engine.queue.store import QueueStore

# How long a commit may wait for its batch to reach the previous batch's size.
GATHER_WAIT = 0.003


class Committer:
    """Owns the store's write side for one worker process (a `QueueCommitter`)."""

    def __init__(
        self,
        store: QueueStore,
        loop: asyncio.AbstractEventLoop,
        *,
        durability: str = "fsync",
        batch_interval: float = 0.05,
        max_batch: int = 512,
        gather_wait: float = GATHER_WAIT,
    ) -> None:
        """Raises:
            ValueError: durability differs from the store's (a "batch" store under an
                "fsync" committer would never be flushed, so acks would lie), or bad
                batch parameters.
        """
        if durability != store.durability:
            raise ValueError(
                f"committer durability {durability!r} != store durability {store.durability!r}"
            )
        if max_batch < 1 or batch_interval <= 0:
            raise ValueError("max_batch must be >= 1 and batch_interval > 0")
        self._store = store
        self._loop = loop
        self._durability = durability
        self._interval = batch_interval
        self._max_batch = max_batch
        self._pending: deque[tuple[Op, Callback]] = deque()
        # A one-token semaphore: released = "wake up", acquired by the thread's waits.
        self._wake = threading.Lock()
        self._wake.acquire()
        self._lock = threading.Lock()  # the stop()/thread-exit handoff only
        self._idle = False
        self._stopping = False
        self._exited = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None
        self._dirty = False  # written since the last flush ("batch" only)
        self._next_flush = 0.0
        self.stats = CommitStats()
        self.panicked = False
        # "fsync": the last committed batch, acked only once its meta page is flushed
        # by the next commit's data flush or an explicit sync (store.py, lmdb.open).
        self._held: tuple[list[Callback], list[object]] | None = None
        self._panic: StoragePanic | None = None
        self._gather_wait = gather_wait
        self._last_batch = 0  # size of the previous batch: the next one's target
        self._want = 1  # pending ops that make submit() wake an idle thread

    def start(self) -> None:
        """Start the commit thread (once).

        Raises:
            RuntimeError: already started or stopped.
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("committer already started or stopped")
        self._thread = threading.Thread(target=self._run, name="volley-commit", daemon=True)
        self._thread.start()

    def submit(self, op: Op, callback: Callback) -> None:
        """Queue `op` for the next batch; `callback(result_or_exception)` is called on
        the loop thread after the batch committed (or failed). Call on the loop thread.

        Raises:
            RuntimeError: after stop() began.
        """
        if self._closed:
            raise RuntimeError("committer is stopped")
        self._pending.append((op, callback))
        # The thread sets _idle BEFORE it looks at the deque, so either it sees this
        # item, or we see _idle and wake it: no lost wakeup, nothing done while it is
        # busy. A spare wake-up (it saw the item anyway) costs it one empty loop.
        if self._idle and len(self._pending) >= self._want:
            self._idle = False
            self._signal()

    async def stop(self) -> None:
        """Commit everything already submitted, deliver its callbacks, stop the thread."""
        if self._closed:
            if self._done is not None:
                await asyncio.shield(self._done)
            return
        self._closed = True
        done = self._done = self._loop.create_future()
        if self._thread is None:  # never started: still honour what was submitted
            self._thread = threading.Thread(target=self._run, name="volley-commit", daemon=True)
            self._thread.start()
        with self._lock:
            self._stopping = True
            if self._exited:  # the thread died earlier and cannot resolve it
                _resolve(done)
        self._signal()
        await asyncio.shield(done)

    # ---- commit thread --------------------------------------------------------

    def _wait_for_work(self) -> bool:
        """Block until work, stop, or a due flush; False when the thread should exit."""
        while True:
            self._idle = True
            if self._pending or self._held is not None:
                break
            if self._stopping:
                self._idle = False
                return False
            timeout = None
            if self._dirty:
                timeout = max(0.0, self._next_flush - time.monotonic())
                if timeout == 0.0:
                    break
            self._sleep(timeout)
        self._idle = False
        return True

    def _sleep(self, timeout: float | None) -> bool:
        """Block until submit() or stop() wakes the thread (True) or `timeout` (> 0, or
        None: no limit) passes (False)."""
        return self._wake.acquire(timeout=-1 if timeout is None else timeout)

    def _signal(self) -> None:
        """Wake the thread (any thread may call it); a token already there is enough."""
        try:
            self._wake.release()
        except RuntimeError:  # not acquired: a wake-up is already pending
            pass

    def _run(self) -> None:
        self._next_flush = time.monotonic() + self._interval
        try:
            while self._wait_for_work():
                if self._pending:
                    self._gather()
                    self._commit_batch()
                elif self._held is not None:
                    self._release_held(sync=True)  # nothing else to commit: flush now
                self._maybe_flush(force=False)
            self._release_held(sync=True)
            self._maybe_flush(force=True)
        except BaseException as err:  # never die silently: report, fail what is left
            self._report("volley-commit thread crashed", err)
            if self._panic is None:
                self._panic = StoragePanic("commit thread crashed")
            self.panicked = True
            self._closed = True  # nobody would serve later submits
            held, self._held = self._held, None
            if held is not None:  # committed, but not known to be flushed: no 250
                panic = self._panic
                self._call_soon(lambda: self._deliver(held[0], [panic] * len(held[0])))
            while self._pending:
                self._commit_batch()
        finally:
            with self._lock:  # handoff with stop(): exactly one side resolves `done`
                self._exited = True
                done = self._done
            if done is not None:
                self._call_soon(lambda: _resolve(done))

    def _gather(self) -> None:
        """Wait (bounded) until as many ops are pending as the previous batch had."""
        target = min(self._last_batch, self._max_batch)
        pending = self._pending
        if target < 2 or len(pending) >= target or self._gather_wait <= 0:
            return
        deadline = time.monotonic() + self._gather_wait
        self._want = target  # one wake-up when the batch is full, not one per op
        while not self._stopping:
            self._idle = True  # before the check: see submit()
            if len(pending) >= target:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not self._sleep(left):
                break
        self._idle = False
        self._want = 1

    def _commit_batch(self) -> None:
        pending = self._pending
        n = min(len(pending), self._max_batch)
        self._last_batch = n
        batch = [pending.popleft() for _ in range(n)]
        ops = [op for op, _ in batch]
        results: list[object]
        if self._panic is not None:
            results = [self._panic] * n
        else:
            try:
                results = list(self._store.write(ops))
            except StoragePanic as err:
                self._panic = err
                self.panicked = True
                results = [err] * n
            except StorageError as err:  # QueueFull included: nothing of the batch landed
                results = [err] * n
            except Exception as err:  # a bug below us: never a 250 for it
                self._report("group commit failed unexpectedly", err)
                failure = StorageError(f"commit failed: {type(err).__name__}")
                failure.__cause__ = err
                results = [failure] * n
            except BaseException:
                # The thread is going down: this batch must still hear back, or its
                # sessions wait forever; _run reports the error and drains the rest.
                panic = self._panic = StoragePanic("commit thread crashed")
                self.panicked = True
                callbacks = [cb for _, cb in batch]
                self._call_soon(lambda: self._deliver(callbacks, [panic] * n))
                raise
            else:
                if self._durability == "batch":
                    self._dirty = True
                elif self._durability == "fsync":
                    # This commit flushed the file before writing its own meta page,
                    # so the previous batch is now wholly on disk; this one waits.
                    self._release_held(sync=False)
                    self._held = ([cb for _, cb in batch], results)
                    self._count(n)
                    return
        # A failed commit flushed nothing: the batch before it needs its own flush.
        self._release_held(sync=True)
        self._count(n)
        callbacks = [cb for _, cb in batch]
        self._call_soon(lambda: self._deliver(callbacks, results))

    def _count(self, n: int) -> None:
        st = self.stats
        st.batches += 1
        st.ops += n
        if n > st.largest_batch:
            st.largest_batch = n

    def _release_held(self, *, sync: bool) -> None:
        """Ack the held batch; with `sync`, flush first (its meta page may be unflushed)."""
        held, self._held = self._held, None
        if held is None:
            return
        callbacks, results = held
        if sync and not self._flush():
            results = [self._panic] * len(callbacks)  # not known to be on disk: no 250 (P1)
        self._call_soon(lambda: self._deliver(callbacks, results))

    def _flush(self) -> bool:
        """store.sync(); on failure panic (False): a failed fsync may have dropped dirty
        pages (the kernel marks them clean), so acknowledged mail may be lost: stop
        taking mail and let the worker restart."""
        try:
            self._store.sync()
            self.stats.syncs += 1
            return True
        except StorageError as err:
            self._report("queue flush failed", err)
            self._panic = StoragePanic(f"flush failed: {err}")
            self.panicked = True
            return False

    def _maybe_flush(self, *, force: bool) -> None:
        if not self._dirty:
            return
        now = time.monotonic()
        if not force and now < self._next_flush:
            return
        self._dirty = False
        self._next_flush = now + self._interval
        self._flush()

    def _deliver(self, callbacks: list[Callback], results: list[object]) -> None:
        # Runs on the loop thread. One failing callback must not starve the others.
        for cb, res in zip(callbacks, results):
            try:
                cb(res)
            except Exception as err:
                self._loop.call_exception_handler(
                    {"message": "commit callback raised", "exception": err}
                )

    def _call_soon(self, fn: Callable[[], object]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed: nobody is left to tell
            pass

    def _report(self, message: str, err: BaseException) -> None:
        self._call_soon(
            lambda: self._loop.call_exception_handler({"message": message, "exception": err})
        )


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
