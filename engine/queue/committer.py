"""What code that queues writes may rely on, whichever committer the worker runs.

The worker picks `commit.Committer` (a thread, for "fsync") or
`inline_commit.InlineCommitter` (the event loop, for "batch" and "memory"); sessions
and the scheduler only submit ops and read the counters, so they name `QueueCommitter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.queue.writetxn import WriteTxn

# A group-commit op: runs inside the batch's write transaction and must be re-runnable
# (QueueStore.write may redo the batch to isolate a failing op).
Op = Callable[[WriteTxn], object]
Callback = Callable[[object], None]  # receives the op's result or its exception


@dataclass
class CommitStats:
    """Counters written by the committer; read them from anywhere."""

    batches: int = 0
    ops: int = 0
    largest_batch: int = 0
    syncs: int = 0


class QueueCommitter(Protocol):
    """The write side of the queue as its users see it."""

    stats: CommitStats
    # True once the store is unusable (MDB_PANIC, a failed flush): the worker restarts.
    panicked: bool

    def start(self) -> None: ...

    def submit(self, op: Op, callback: Callback) -> None:
        """Queue `op`; `callback(result_or_exception)` runs on the loop thread once the
        op's batch committed (under "fsync": flushed) or failed."""
        ...

    async def stop(self) -> None:
        """Commit what was submitted, deliver its callbacks, refuse later submits."""
        ...
