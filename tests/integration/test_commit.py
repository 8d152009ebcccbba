"""Committer: group commit under a running uvloop loop, real LMDB in tmp_path."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from engine.errors import QueueFull, StorageError, StoragePanic
from engine.queue.commit import Committer
from engine.queue.ids import IdAllocator
from engine.queue.records import MessageRecord, Recipient
from engine.queue.store import QueueStore, WriteTxn

# The "signal" method cannot interrupt a uvloop blocked in epoll, so the backstop is a
# thread; the in-loop deadline below is what normally bounds a hung test.
pytestmark = pytest.mark.timeout(30, method="thread")


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coro(), 10))


def put_op(msg_id: bytes, body: bytes = b"x" * 1024) -> Callable[[WriteTxn], bytes]:
    r = MessageRecord(msg_id, "s@x.org", [Recipient("r@example.com")], 1.0, len(body))

    def op(w: WriteTxn) -> bytes:
        w.put_message(r, body)
        return msg_id

    return op


def gather_callbacks(n: int) -> tuple[list[object], Callable[[object], None], asyncio.Future[None]]:
    results: list[object] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    loop_thread = threading.get_ident()

    def cb(res: object) -> None:
        assert threading.get_ident() == loop_thread  # callbacks run on the loop thread
        results.append(res)
        if len(results) == n:
            done.set_result(None)

    return results, cb, done


@pytest.mark.parametrize("durability", ["fsync", "batch", "memory"])
def test_thousand_ops_in_few_batches(tmp_path: Path, durability: str) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability=durability)
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop(), durability=durability, batch_interval=0.01)
        c.start()
        results, cb, done = gather_callbacks(1000)
        wanted = []
        for k in range(1000):
            i = ids.next()
            wanted.append(i)
            c.submit(put_op(i), cb)
            if k % 100 == 99:
                await asyncio.sleep(0)  # let some batches commit while more arrive
        await done
        assert sorted(results) == wanted  # type: ignore[type-var]
        assert c.stats.ops == 1000 and c.stats.batches < 1000
        assert c.stats.largest_batch > 1
        await c.stop()
        # batch: the flush timer; fsync: the last batch's meta page is flushed by an
        # explicit sync when nothing follows it (commit.py, _release_held).
        assert (c.stats.syncs > 0) == (durability != "memory")
        with pytest.raises(RuntimeError):
            c.submit(put_op(ids.next()), cb)

    run(main)
    assert store.count() == 1000
    store.close()


def test_stop_drains_everything_submitted(tmp_path: Path) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20)
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop(), max_batch=7)
        results: list[object] = []
        for _ in range(100):
            c.submit(put_op(ids.next()), results.append)  # before start: queued
        c.start()
        for _ in range(100):
            c.submit(put_op(ids.next()), results.append)
        await c.stop()
        assert len(results) == 200 and not any(isinstance(r, BaseException) for r in results)
        assert c.stats.largest_batch == 7 and c.stats.batches >= 200 // 7
        await c.stop()  # idempotent

    run(main)
    assert store.count() == 200
    store.close()


def test_queue_full_and_op_errors_reach_callbacks(tmp_path: Path) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=1 << 20)
    ids = IdAllocator(store.next_boot())
    body = os.urandom(64 * 1024)

    def broken(w: WriteTxn) -> None:
        raise ValueError("bad op")

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop())
        c.start()
        results, cb, done = gather_callbacks(41)
        for _ in range(40):
            c.submit(put_op(ids.next(), body), cb)  # 2.5 MiB into a 1 MiB map
        c.submit(broken, cb)
        await done
        full = [r for r in results if isinstance(r, QueueFull)]
        ok = [r for r in results if isinstance(r, bytes)]
        assert full and ok and len(full) + len(ok) == 40
        assert sum(isinstance(r, ValueError) for r in results) == 1
        assert all(store.get_body(i) == body for i in ok)
        # Still usable: a delete and a small message commit.
        results2, cb2, done2 = gather_callbacks(2)
        c.submit(lambda w: w.delete_message(ok[0]), cb2)
        c.submit(put_op(ids.next(), b"small"), cb2)
        await done2
        assert results2[0] is True and isinstance(results2[1], bytes)
        await c.stop()

    run(main)
    store.close()


def test_commit_failure_fails_whole_batch_and_panic_sticks(tmp_path: Path) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=8 << 20)
    ids = IdAllocator(store.next_boot())
    # A failpoint at the store boundary: the real write, then a simulated commit error.
    real_write = store.write
    failures: list[BaseException] = [StorageError("EIO at commit"), StoragePanic("MDB_PANIC")]

    def failing_write(ops: list[Callable[[WriteTxn], object]]) -> list[object | BaseException]:
        if failures:
            raise failures.pop(0)
        return real_write(ops)

    store.write = failing_write  # type: ignore[method-assign]

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop())
        results, cb, done = gather_callbacks(3)
        for _ in range(3):
            c.submit(put_op(ids.next()), cb)
        c.start()
        await done
        assert all(type(r) is StorageError for r in results) and not c.panicked
        results, cb, done = gather_callbacks(2)
        c.submit(put_op(ids.next()), cb)
        c.submit(put_op(ids.next()), cb)
        await done
        assert all(isinstance(r, StoragePanic) for r in results) and c.panicked
        results, cb, done = gather_callbacks(1)
        c.submit(put_op(ids.next()), cb)  # after a panic nothing touches the store again
        await done
        assert isinstance(results[0], StoragePanic)
        await c.stop()

    run(main)
    assert store.count() == 0
    store.close()


def test_durability_mismatch_refused(tmp_path: Path) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=1 << 20, durability="batch")

    async def main() -> None:
        with pytest.raises(ValueError):
            Committer(store, asyncio.get_running_loop())  # fsync committer, batch store

    run(main)
    store.close()


def test_callback_error_does_not_starve_the_batch(tmp_path: Path) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=8 << 20)
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _l, ctx: seen.append(ctx))
        c = Committer(store, loop)
        results: list[object] = []

        def bad(_: object) -> None:
            raise RuntimeError("callback bug")

        c.submit(put_op(ids.next()), bad)
        c.submit(put_op(ids.next()), results.append)
        c.start()
        await c.stop()
        assert len(results) == 1 and len(seen) == 1

    run(main)
    store.close()


def test_thread_crash_fails_callbacks_and_stop_returns(tmp_path: Path) -> None:
    store = QueueStore(str(tmp_path / "q"), map_size=8 << 20)
    ids = IdAllocator(store.next_boot())

    class Boom(BaseException):
        pass

    def crash(ops: list[Callable[[WriteTxn], object]]) -> list[object | BaseException]:
        raise Boom()

    store.write = crash  # type: ignore[method-assign]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _l, ctx: seen.append(ctx))
        c = Committer(store, loop)
        results, cb, done = gather_callbacks(2)
        c.submit(put_op(ids.next()), cb)
        c.submit(put_op(ids.next()), cb)
        c.start()
        await done
        assert c.panicked and all(isinstance(r, StoragePanic) for r in results)
        await c.stop()
        with pytest.raises(RuntimeError):
            c.submit(put_op(ids.next()), cb)
        assert any(isinstance(ctx.get("exception"), Boom) for ctx in seen)

    run(main)
    store.close()


def test_fsync_ack_waits_for_a_later_commit_or_a_flush(tmp_path: Path) -> None:
    """P1 with MDB_NOMETASYNC: a batch's meta page is flushed by the next commit or by
    an explicit sync, so no callback may run before one of those happened."""
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="fsync")
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop(), durability="fsync")
        c.start()
        seen: list[tuple[int, int]] = []  # (batches, syncs) when each callback ran
        n = 200
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def cb(res: object) -> None:
            assert not isinstance(res, BaseException)
            seen.append((c.stats.batches, c.stats.syncs))
            if len(seen) == n and not done.done():
                done.set_result(None)

        for k in range(n):
            c.submit(put_op(ids.next()), cb)
            if k % 20 == 19:
                await asyncio.sleep(0)
        await done
        first_batch_done = seen[0]
        assert first_batch_done[0] >= 2 or first_batch_done[1] >= 1
        # The last batch has nothing after it: only an explicit flush can release it.
        assert seen[-1][1] >= 1
        await c.stop()

    run(main)
    store.close()


async def commit_first_batch(c: Committer, ids: IdAllocator, n: int) -> None:
    """Submit n ops before the thread starts (so they form one batch), start, await."""
    results, cb, done = gather_callbacks(n)
    for _ in range(n):
        c.submit(put_op(ids.next()), cb)
    c.start()
    await done
    assert not any(isinstance(r, BaseException) for r in results)


def test_a_batch_gathers_as_many_ops_as_the_previous_one(tmp_path: Path) -> None:
    """After a batch of 4 the next commit waits (bounded by gather_wait, here far longer
    than the test) until 4 ops are pending: 2 + 2 submitted apart land in ONE batch."""
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="fsync")
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop(), durability="fsync", gather_wait=60)
        await commit_first_batch(c, ids, 4)
        assert (c.stats.batches, c.stats.largest_batch) == (1, 4)
        results, cb, done = gather_callbacks(4)
        c.submit(put_op(ids.next()), cb)
        c.submit(put_op(ids.next()), cb)
        for _ in range(20):  # let the thread wake up and start waiting
            await asyncio.sleep(0)
        c.submit(put_op(ids.next()), cb)
        c.submit(put_op(ids.next()), cb)
        await done
        assert not any(isinstance(r, BaseException) for r in results)
        assert (c.stats.batches, c.stats.ops) == (2, 8)
        await c.stop()

    run(main)
    assert store.count() == 8
    store.close()


def test_a_lone_client_never_waits_to_gather(tmp_path: Path) -> None:
    """Batches of one set no target: one op at a time, each awaited, never waits for
    company (gather_wait is far longer than the test's 10 s deadline)."""
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="fsync")
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop(), durability="fsync", gather_wait=60)
        c.start()
        for _ in range(5):
            results, cb, done = gather_callbacks(1)
            c.submit(put_op(ids.next()), cb)
            await done
            assert not isinstance(results[0], BaseException)
        assert (c.stats.batches, c.stats.largest_batch) == (5, 1)
        await c.stop()

    run(main)
    store.close()


def test_stop_ends_a_gather_wait(tmp_path: Path) -> None:
    """A commit waiting for its batch to fill is cut short by stop(): what was submitted
    is committed and acknowledged, well before gather_wait."""
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="fsync")
    ids = IdAllocator(store.next_boot())

    async def main() -> None:
        c = Committer(store, asyncio.get_running_loop(), durability="fsync", gather_wait=60)
        await commit_first_batch(c, ids, 3)
        results, cb, done = gather_callbacks(1)
        c.submit(put_op(ids.next()), cb)  # 1 of the 3 it would wait for
        for _ in range(20):
            await asyncio.sleep(0)
        await c.stop()
        assert done.done() and not isinstance(results[0], BaseException)

    run(main)
    assert store.count() == 4
    store.close()
