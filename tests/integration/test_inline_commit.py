"""InlineCommitter: group commit on the loop thread for the batch and memory levels."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvloop

from engine.errors import QueueFull
from engine.queue.ids import IdAllocator
from engine.queue.inline_commit import InlineCommitter
from engine.queue.records import MessageRecord, Recipient
from engine.queue.store import QueueStore


def _record(ids: IdAllocator) -> MessageRecord:
    return MessageRecord(id=ids.next(), sender="a@x.test", recipients=[Recipient("b@y.test")],
                         received_at=time.time(), size=10)


class _FlushSignallingStore(QueueStore):
    """A real store that also says when it was flushed (set on the flushing thread)."""

    def __init__(self, path: str, *, map_size: int, durability: str) -> None:
        self.flushed = threading.Event()
        super().__init__(path, map_size=map_size, durability=durability)

    def sync(self) -> None:
        super().sync()
        self.flushed.set()


def test_one_transaction_per_loop_iteration(tmp_path):
    store = QueueStore(str(tmp_path / "q"), map_size=64 << 20, durability="memory")
    ids = IdAllocator(store.next_boot())

    async def main() -> list[object]:
        committer = InlineCommitter(store, asyncio.get_running_loop(), durability="memory")
        committer.start()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        results: list[object] = []

        def callback(result: object) -> None:
            results.append(result)
            if len(results) == 300 and not done.done():
                done.set_result(None)

        for _ in range(300):  # all in one iteration: one transaction
            rec = _record(ids)
            committer.submit(lambda w, rec=rec: w.put_message(rec, b"x\r\n"), callback)
        await asyncio.wait_for(done, 10)
        assert committer.stats.batches == 1 and committer.stats.ops == 300
        await committer.stop()
        with pytest.raises(RuntimeError):
            committer.submit(lambda w: None, callback)
        return results

    results = uvloop.run(main())
    assert results == [None] * 300
    assert store.count() == 300
    store.close()


def test_queue_full_reaches_every_callback_and_batch_level_flushes(tmp_path):
    store = _FlushSignallingStore(str(tmp_path / "q"), map_size=1 << 20, durability="batch")
    ids = IdAllocator(store.next_boot())
    store.flushed.clear()  # next_boot() flushes; wait for the committer's own flush

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        committer = InlineCommitter(store, loop, durability="batch", batch_interval=0.02)
        committer.start()
        outcomes: list[object] = []
        for _ in range(40):  # 64 KiB each into a 1 MiB map: the queue fills up
            fut: asyncio.Future[object] = loop.create_future()
            rec = _record(ids)
            committer.submit(lambda w, rec=rec: w.put_message(rec, b"y" * 65536), fut.set_result)
            outcomes.append(await asyncio.wait_for(fut, 10))
            if isinstance(outcomes[-1], QueueFull):
                break
        # The flush timer flushes before stop() would (stop flushes what is dirty too).
        assert await loop.run_in_executor(None, store.flushed.wait, 10)
        await committer.stop()
        assert committer.stats.syncs > 0
        return outcomes

    outcomes = uvloop.run(main())
    assert isinstance(outcomes[-1], QueueFull)
    assert all(o is None for o in outcomes[:-1]) and len(outcomes) > 1
    assert store.count() == len(outcomes) - 1
    store.close()


def test_fsync_level_is_refused(tmp_path):
    store = QueueStore(str(tmp_path / "q"), map_size=16 << 20, durability="fsync")

    async def main() -> None:
        with pytest.raises(ValueError):
            InlineCommitter(store, asyncio.get_running_loop(), durability="fsync")

    uvloop.run(main())
    store.close()
