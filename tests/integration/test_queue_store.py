"""QueueStore against a real LMDB environment in tmp_path (no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.errors import QueueFull, StorageError
from engine.queue.ids import IdAllocator
from engine.queue.layout import owner_of
from engine.queue.records import DELIVERED, PENDING, MessageRecord, Recipient
from engine.queue.store import QueueStore, WriteTxn, stable_shard

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def rec(msg_id: bytes, *rcpts: str, at: float = 1000.0) -> MessageRecord:
    return MessageRecord(msg_id, "s@x.org", [Recipient(r) for r in rcpts], at, 3)


def put(r: MessageRecord, body: bytes = b"abc") -> Callable[[WriteTxn], object]:
    return lambda w: w.put_message(r, body)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = QueueStore(str(tmp_path / "q"), map_size=64 << 20, shards=4)
    yield s
    s.close()


def test_directory_is_private(tmp_path: Path) -> None:
    QueueStore(str(tmp_path / "q"), map_size=1 << 20).close()
    assert (tmp_path / "q").stat().st_mode & 0o077 == 0  # P10


def test_put_get_update_delete(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    a = ids.next()
    r = rec(a, "u@Example.com", "v@other.net")
    assert store.write([put(r, b"body\r\n")]) == [None]
    assert store.get(a) == r and store.get_body(a) == b"body\r\n" and store.count() == 1
    assert list(store.iter_ids()) == [a]

    r.recipients[0].state = DELIVERED
    r.recipients[1].next_attempt = 5000.0
    r.recipients[1].attempts = 1
    store.write([lambda w: w.update_message(r)])
    assert store.get(a) == r
    owner = owner_of("other.net", a, 4)
    assert store.due_entries(owner, 10**15, 10) == [(5_000_000, a, "other.net")]
    owner_done = owner_of("example.com", a, 4)
    assert all(e[2] != "example.com" for e in store.due_entries(owner_done, 10**15, 10))

    assert store.write([lambda w: w.delete_message(a)]) == [True]
    assert store.get(a) is None and store.get_body(a) is None and store.count() == 0
    assert all(store.due_entries(o, 10**15, 10) == [] for o in range(4))
    assert store.write([lambda w: w.delete_message(a)]) == [False]


def test_due_index_order_and_owner_partitioning(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    domains = [f"d{i}.example" for i in range(12)]
    expected: dict[int, list[tuple[int, bytes, str]]] = {o: [] for o in range(4)}
    ops = []
    for n, t in enumerate([50.0, 10.0, 30.0, 20.0, 40.0, 10.5]):
        i = ids.next()
        ds = domains[n * 2 : n * 2 + 2]
        ops.append(put(rec(i, *(f"x@{d.upper()}" for d in ds), at=t)))
        for d in ds:
            expected[owner_of(d, i, 4)].append((int(t * 1000), i, d))
    assert store.write(ops) == [None] * 6
    assert sum(len(v) for v in expected.values()) == 12
    assert len({o for o, v in expected.items() if v}) > 1  # the partitioning is exercised
    for o, entries in expected.items():
        entries.sort()
        assert store.due_entries(o, 10**15, 100) == entries
        assert store.due_entries(o, 30_000, 100) == [e for e in entries if e[0] <= 30_000]
        assert store.due_entries(o, 10**15, 1) == entries[:1]


def test_stable_shard_is_stable() -> None:
    # crc32 of the lower-cased domain, never hash(): the same in every process and run,
    # else a restart would move queued messages to another owner.
    assert stable_shard("Example.COM", 7) == stable_shard("example.com", 7) == zlib.crc32(b"example.com") % 7
    assert stable_shard("example.com", 1) == 0
    code = "from engine.queue.store import stable_shard; print(stable_shard('example.com', 1000))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "1"},
        capture_output=True, text=True, check=True,
    ).stdout
    assert int(out) == stable_shard("example.com", 1000)


def test_owner_of_spreads_one_domain_and_is_stable() -> None:
    """Format 4: one domain's units go to every worker evenly, for consecutive ids and
    for ids of a stride (a client alternating between domains); the same in every
    process."""
    for stride in (1, 2, 4, 50):
        ids = [IdAllocator(7).next()[:4] + (1 + k * stride).to_bytes(4, "big") for k in range(600)]
        for shards in (2, 3):
            owners = [owner_of("Hot.Example", i, shards) for i in ids]
            counts = [owners.count(o) for o in range(shards)]
            assert max(counts) - min(counts) <= 6, (stride, shards, counts)
    first = IdAllocator(7).next()
    assert owner_of("hot.example", first, 1) == 0
    assert owner_of("HOT.example", first, 5) == owner_of("hot.example", first, 5)
    code = f"from engine.queue.layout import owner_of; print(owner_of('hot.example', {first!r}, 1000))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "1"},
        capture_output=True, text=True, check=True,
    ).stdout
    assert int(out) == owner_of("hot.example", first, 1000)


def test_next_boot_increments_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    s = QueueStore(path, map_size=1 << 20)
    assert [s.next_boot(), s.next_boot()] == [1, 2]
    s.close()
    s = QueueStore(path, map_size=1 << 20, durability="batch")
    assert s.next_boot() == 3
    s.close()


def test_data_survives_reopen_and_shard_change(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    s = QueueStore(path, map_size=8 << 20, shards=1)
    ids = IdAllocator(s.next_boot())
    msgs = [rec(ids.next(), f"a@d{i}.net", at=100.0 + i) for i in range(20)]
    s.write([put(m, b"x" * i) for i, m in enumerate(msgs)])
    s.close()
    s = QueueStore(path, map_size=8 << 20, shards=3)  # owners move: index is rebuilt
    assert s.count() == 20
    assert [s.get(m.id) for m in msgs] == msgs
    assert s.get_body(msgs[7].id) == b"x" * 7
    got = sorted(e for o in range(3) for e in s.due_entries(o, 10**15, 100))
    assert got == sorted((int(m.received_at * 1000), m.id, f"d{i}.net") for i, m in enumerate(msgs))
    for o in range(3):
        assert all(owner_of(d, i, 3) == o for _, i, d in s.due_entries(o, 10**15, 100))
    s.close()


def test_failing_op_fails_alone(store: QueueStore) -> None:
    ids = IdAllocator(store.next_boot())
    a, b, c = ids.next(), ids.next(), ids.next()

    def half_then_boom(w: WriteTxn) -> None:
        w.put_message(rec(b, "x@y.z"), b"partial")  # must be rolled back with the op
        raise ValueError("op bug")

    res = store.write([put(rec(a, "x@y.z")), half_then_boom, put(rec(c, "x@y.z")), put(rec(a, "x@y.z"))])
    assert res[0] is None and res[2] is None
    assert isinstance(res[1], ValueError) and isinstance(res[3], KeyError)  # duplicate id
    assert store.get(b) is None and store.get_body(b) is None
    assert store.count() == 2 and sorted(store.iter_ids()) == [a, c]
    assert sum(len(store.due_entries(o, 10**15, 10)) for o in range(4)) == 2
    with pytest.raises(KeyError):
        store.write_one(lambda w: w.update_message(rec(b, "x@y.z")))
    with pytest.raises(ValueError):
        store.write_one(put(rec(ids.next(), "x@" + "d" * 600)))  # key limit, checked first


def test_map_full_keeps_env_usable(tmp_path: Path) -> None:
    s = QueueStore(str(tmp_path / "q"), map_size=1 << 20)
    ids = IdAllocator(s.next_boot())
    body = os.urandom(64 * 1024)
    stored: list[bytes] = []
    with pytest.raises(QueueFull):
        for _ in range(100):
            i = ids.next()
            s.write_one(put(rec(i, "a@b.c"), body))
            stored.append(i)
    assert len(stored) >= 5
    assert all(s.get_body(i) == body for i in stored)
    # While puts are refused, a batch mixing a put and deletes still lands the deletes:
    # the full queue can always drain (the delete reserve).
    res = s.write([put(rec(ids.next(), "a@b.c"), body), *(lambda w, i=i: w.delete_message(i) for i in stored[:3])])
    assert isinstance(res[0], QueueFull) and res[1:] == [True, True, True]
    small = ids.next()
    s.write_one(put(rec(small, "a@b.c"), b"small"))
    assert s.get_body(small) == b"small" and s.count() == len(stored) - 3 + 1
    s.close()


def test_hard_map_full_with_no_reserve(tmp_path: Path) -> None:
    s = QueueStore(str(tmp_path / "q"), map_size=1 << 20, reserve=0)
    ids = IdAllocator(s.next_boot())
    with pytest.raises(QueueFull, match="MAP_FULL"):
        for _ in range(100):
            s.write_one(put(rec(ids.next(), "a@b.c"), os.urandom(64 * 1024)))
    first = next(s.iter_ids())
    assert s.write_one(lambda w: w.delete_message(first)) is True
    s.close()


def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    s = QueueStore(str(tmp_path / "q"), map_size=1 << 20)
    s.close()
    s.close()
    with pytest.raises(StorageError):
        s.write([])


def test_open_in_forked_child(tmp_path: Path) -> None:
    # The parent opened nothing before fork() (finding 9), so the child may open it.
    path = str(tmp_path / "q")
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            s = QueueStore(path, map_size=1 << 20)
            s.write_one(put(rec(IdAllocator(s.next_boot()).next(), "a@b.c"), b"from child"))
            s.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    s = QueueStore(path, map_size=1 << 20)
    assert s.count() == 1 and s.get_body(next(s.iter_ids())) == b"from child"
    # And the converse (finding 9): the same path twice in one process is refused cleanly.
    with pytest.raises(StorageError, match="already open"):
        QueueStore(path, map_size=1 << 20)
    s.close()


WRITER = textwrap.dedent(
    """
    import sys
    from engine.queue.ids import IdAllocator
    from engine.queue.records import MessageRecord, Recipient
    from engine.queue.store import QueueStore
    s = QueueStore(sys.argv[1], map_size=64 << 20, shards=2)
    ids = IdAllocator(s.next_boot())
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for _ in range(20):
        ops = []
        for _ in range(25):
            r = MessageRecord(ids.next(), "s@x", [Recipient("r@y.z")], 1.0, 1)
            ops.append(lambda w, r=r: w.put_message(r, b"b"))
        s.write(ops)
    s.close()
    """
)


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, path], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        p.stdout.close()
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    s = QueueStore(path, map_size=64 << 20, shards=2)
    ids = list(s.iter_ids())
    assert len(ids) == len(set(ids)) == 1000
    assert {i[:4] for i in ids} == {(1).to_bytes(4, "big"), (2).to_bytes(4, "big")}
    assert all(s.get(i) is not None and s.get(i).recipients[0].state == PENDING for i in ids[:10])  # type: ignore[union-attr]
    s.close()


GROWER = textwrap.dedent(
    """
    import sys
    from engine.queue.ids import IdAllocator
    from engine.queue.records import MessageRecord, Recipient
    from engine.queue.store import QueueStore
    s = QueueStore(sys.argv[1], map_size=8 << 20)
    ids = IdAllocator(s.next_boot())
    for _ in range(40):
        r = MessageRecord(ids.next(), "s@x", [Recipient("r@y.z")], 1.0, 1)
        s.write_one(lambda w: w.put_message(r, b"g" * 65536))
    s.close()
    """
)


def test_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    # lmdb.h mdb_env_set_mapsize: a process whose map another process outgrew gets
    # MDB_MAP_RESIZED from txn_begin; the store adopts the new size and retries (P4).
    path = str(tmp_path / "q")
    s = QueueStore(path, map_size=1 << 20)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", GROWER, path], env=env, check=True, timeout=30)
    assert s.count() == 40  # read path: resized, adopted, retried
    ids = IdAllocator(s.next_boot())  # write path, on the adopted 8 MiB map
    s.write_one(put(rec(ids.next(), "a@b.c"), b"z" * 65536))
    assert s.count() == 41
    s.close()
