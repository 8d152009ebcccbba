"""bench/peers/procs.py: a process tree's memory split into anon / file / shmem, read
from /proc of real processes (the benchmark's scale rows report it beside RSS/PSS)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

PROCS = Path(__file__).resolve().parents[2] / "bench" / "peers" / "procs.py"
MIB = 1024

# A child that owns ANON_MIB of heap and maps FILE_MIB of a file, reading every page,
# then says "ready" and waits for stdin to close.
CHILD = r"""
import mmap, sys
heap = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(heap), 4096):
    heap[i] = 1
with open(sys.argv[2], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    total = sum(m[i] for i in range(0, len(m), 4096))
print("ready", total, flush=True)
sys.stdin.read()
"""
ANON_MIB, FILE_MIB = 48, 32


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers_procs", PROCS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def _child(code: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], bytes]]:
    """A python child running `code`: yields it and the first line it printed; closing
    its stdin at the end lets it exit."""
    child = subprocess.Popen([sys.executable, "-c", code, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        yield child, child.stdout.readline()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()


@pytest.fixture(scope="module")
def procs() -> ModuleType:
    return _load()


def test_sample_splits_anon_and_file_pages(procs: ModuleType, tmp_path: Path) -> None:
    data = tmp_path / "mapped.bin"
    data.write_bytes(os.urandom(FILE_MIB << 20))
    with _child(CHILD, str(ANON_MIB), str(data)) as (child, line):
        assert line.startswith(b"ready")
        tree = procs.sample(child.pid, pss=True)
    assert [m.pid for m in tree.memory] == [child.pid]
    (mem,) = tree.memory
    assert mem.anon_kib >= ANON_MIB * MIB
    assert mem.file_kib >= FILE_MIB * MIB
    # The heap is not counted as file pages, nor the mapped file as heap.
    assert mem.anon_kib < (ANON_MIB + FILE_MIB) * MIB
    assert mem.hwm_kib >= mem.anon_kib + mem.file_kib + mem.shmem_kib - MIB
    assert mem.pss_kib > 0
    assert (tree.anon_kib, tree.file_kib, tree.shmem_kib, tree.rss_kib, tree.pss_kib) == (
        mem.anon_kib, mem.file_kib, mem.shmem_kib, mem.hwm_kib, mem.pss_kib)
    # The older tuple form is kept for readers of earlier results.
    assert tree.processes[0][0] == child.pid and tree.processes[0][3] == mem.hwm_kib
    row = mem.as_dict()
    assert row["pid"] == child.pid
    assert row["anon_mib"] >= ANON_MIB and row["file_mib"] >= FILE_MIB
    assert set(row) == {"pid", "comm", "hwm_mib", "anon_mib", "file_mib", "shmem_mib", "pss_mib"}


def test_sample_sums_over_the_tree(procs: ModuleType) -> None:
    # A parent python whose child sleeps on stdin: both counted, sums add up.
    code = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],"
            " stdin=subprocess.PIPE); print(c.pid, flush=True); sys.stdin.read(); c.stdin.close(); c.wait()")
    with _child(code) as (parent, line):
        grandchild = int(line)
        tree = procs.sample(parent.pid)
    assert sorted(m.pid for m in tree.memory) == sorted([parent.pid, grandchild])
    assert tree.anon_kib == sum(m.anon_kib for m in tree.memory) > 0
    assert tree.file_kib == sum(m.file_kib for m in tree.memory) > 0
    assert tree.rss_kib == sum(m.hwm_kib for m in tree.memory)
    assert tree.pss_kib == 0  # not asked


def test_status_of_a_gone_process_is_zero(procs: ModuleType) -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=30)
    assert procs.status_kib(done.pid) == dict.fromkeys(procs.STATUS_KEYS, 0)
