"""Micro benchmarks of the suppression list on a list of 1,000,000 entries (LMDB, fsync).

- lookup: `store.suppressed(address)` (four point gets in one read transaction, the
  cost of checking one recipient), hits and misses;
- a whole injection request: `store.suppressed_many` of 10,000 recipients;
- import: 1,000,000 entries in chunks of 10,000, one flushed write transaction per chunk,
  as the supervisor writes `volley ctl suppress import` chunks (JSON and the socket not
  included), and one more chunk on top of the full list.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from engine.queue import suppression
from engine.queue.store import QueueStore

N = 1_000_000
CHUNK = 10_000


def address(i: int) -> str:
    return f"subscriber.{i}@mail{i % 5000}.example"


def fill(store: QueueStore, start: int, n: int) -> None:
    now = time.time()
    for base in range(start, start + n, CHUNK):
        entries = [suppression.make(address(i), "import", source="bench", created=now)
                   for i in range(base, min(base + CHUNK, start + n))]
        store.write_one(lambda w, e=entries: suppression.add(w, e, headroom=False))


def open_store(path: Path) -> QueueStore:
    return QueueStore(str(path), map_size=2 << 30, durability="fsync")


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueStore]:
    store = open_store(tmp_path_factory.mktemp("supp") / "q")
    fill(store, 0, N)
    assert store.suppression_count() == N
    yield store
    store.close()


def test_import_1m(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    runs = iter(range(10))

    def build() -> None:
        store = open_store(tmp_path / f"q{next(runs)}")
        try:
            fill(store, 0, N)
        finally:
            store.close()

    benchmark.pedantic(build, rounds=1, iterations=1)
    benchmark.extra_info["entries_per_second"] = round(N / benchmark.stats.stats.mean)


def test_lookup_hit(benchmark: BenchmarkFixture, full: QueueStore) -> None:
    rng = random.Random(1)
    picks = [address(rng.randrange(N)) for _ in range(1000)]
    it = iter(picks * 10_000)
    assert benchmark(lambda: full.suppressed(next(it))) is not None


def test_lookup_miss(benchmark: BenchmarkFixture, full: QueueStore) -> None:
    picks = [f"someone.{i}@elsewhere{i}.example" for i in range(1000)]
    it = iter(picks * 10_000)
    assert benchmark(lambda: full.suppressed(next(it), "acme")) is None


def test_suppressed_many_10k(benchmark: BenchmarkFixture, full: QueueStore) -> None:
    rng = random.Random(2)
    request = [address(rng.randrange(2 * N)) for _ in range(10_000)]  # about half listed
    hits = benchmark(full.suppressed_many, request)
    assert 4000 < len(hits) < 6000


def test_import_chunk_on_a_full_list(benchmark: BenchmarkFixture, full: QueueStore) -> None:
    starts = iter(range(N, N + 1000 * CHUNK, CHUNK))
    benchmark.pedantic(lambda: fill(full, next(starts), CHUNK), rounds=5, iterations=1)
    benchmark.extra_info["entries_per_second"] = round(CHUNK / benchmark.stats.stats.mean)
