"""Micro benchmark: one group commit of 100 x 1 KB messages, fsync durability.

This is the unit PERFORMANCE.md calls the lever: one write transaction and one flush
for everything pending. Compare with `test_commit_one_per_message` (the aiosmtpd-style
one flushed commit per message) measured in the same run, since the host's speed drifts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from engine.queue.ids import IdAllocator
from engine.queue.records import MessageRecord, Recipient
from engine.queue.store import QueueStore, WriteTxn

BATCH = 100
BODY = os.urandom(1024)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(str(tmp_path / "q"), map_size=1 << 30, durability="fsync", shards=4)
    yield s
    s.close()


def make_ops(ids: IdAllocator, n: int) -> list[Callable[[WriteTxn], None]]:
    ops: list[Callable[[WriteTxn], None]] = []
    for _ in range(n):
        r = MessageRecord(
            ids.next(), "sender@example.org", [Recipient("rcpt@example.com")],
            1.7e9, len(BODY), client_ip="192.0.2.1", helo="client.example.org",
        )
        ops.append(_put(r))
    return ops


def _put(r: MessageRecord) -> Callable[[WriteTxn], None]:
    return lambda w: w.put_message(r, BODY)


def test_group_commit_100x1k(benchmark: BenchmarkFixture, store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())

    def setup() -> tuple[tuple[list[Callable[[WriteTxn], None]]], dict[str, object]]:
        return (make_ops(ids, BATCH),), {}

    results = benchmark.pedantic(  # type: ignore[no-untyped-call]
        store.write, setup=setup, rounds=60, warmup_rounds=3)
    assert results == [None] * BATCH


def test_commit_one_per_message(benchmark: BenchmarkFixture, store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())

    def one_by_one(ops: list[Callable[[WriteTxn], None]]) -> None:
        for op in ops:
            store.write([op])

    def setup() -> tuple[tuple[list[Callable[[WriteTxn], None]]], dict[str, object]]:
        return (make_ops(ids, BATCH),), {}

    benchmark.pedantic(  # type: ignore[no-untyped-call]
        one_by_one, setup=setup, rounds=10, warmup_rounds=1)
