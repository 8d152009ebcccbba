"""The server-wide limits table (engine/delivery/shared_limits.py): GCRA smoothness on a
virtual clock, the connection cap held by two real processes hammering one slot, and
a killed process's connections released when its successor opens the table."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.delivery.job import PoolSettings
from engine.delivery.provider_gate import ProviderGates
from engine.delivery.shared_limits import (
    COLUMNS,
    FULL,
    LimitTable,
    burst_of,
    gcra,
)

REPO = Path(__file__).resolve().parents[2]


def most_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - window + 1e-12:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def eager_sender(rate: float, until: float, jitter: random.Random,
                 pauses: bool = True) -> list[float]:
    """Times at which a sender that asks again as soon as told (plus a late timer's
    jitter) gets through, with long pauses now and then."""
    tat, now, sent = 0.0, 1000.0, []
    end = now + until
    while now < end:
        wait, new_tat = gcra(tat, now, rate)
        if wait:
            now += wait + jitter.random() * 0.002
            continue
        tat = new_tat
        sent.append(now)
        if pauses and jitter.random() < 0.01:
            now += jitter.random() * 5  # idle for a while: the allowance refills
    return sent


@pytest.mark.parametrize("rate", [600 / 60, 100.0, 0.5, 20000 / 3600, 37.0])
def test_gcra_never_lets_more_than_a_seconds_worth_above_the_rate(rate: float) -> None:
    sent = eager_sender(rate, 120.0, random.Random(13))
    burst = burst_of(rate)
    assert burst <= max(1.0, rate)  # never more than one second's worth at once
    for window in (0.05, 0.5, 1.0, 10.0, 60.0):
        # In any window: what the rate allows, plus the burst (the allowance refilled).
        assert most_in_window(sent, window) <= rate * window + burst + 1e-9, window
    # And it does not fall far below the rate while asked continuously, timers late.
    steady = eager_sender(rate, 60.0, random.Random(7), pauses=False)
    assert len(steady) >= 0.95 * rate * 60


def test_a_minutes_worth_never_goes_at_once() -> None:
    tat, now, got = 0.0, 5000.0, 0
    for _ in range(600):  # 600/min, idle for an hour, then 600 asked at one instant
        wait, new_tat = gcra(tat, now, 10.0)
        if not wait:
            tat, got = new_tat, got + 1
    assert got == 1
    assert gcra(tat, now, 10.0)[0] == pytest.approx(0.1)


def test_a_tat_far_ahead_is_clamped() -> None:
    # A reboot reset CLOCK_MONOTONIC, or the rate went up: the stored TAT is absurd.
    wait, _ = gcra(1e9, 10.0, 5.0)
    assert wait == pytest.approx(0.2)


def test_table_rate_and_cap_in_one_process(tmp_path: Path) -> None:
    table = LimitTable.open(str(tmp_path / "t.shm"), 0, 1)
    slot = table.slot_of("gmail")
    assert slot is not None and table.slot_of("gmail") == slot
    assert table.slot_of("yahoo") != slot
    assert table.acquire_connection(slot, 0, 2, 0.0, 1.0) == 0.0
    assert table.acquire_connection(slot, 0, 2, 0.0, 1.0) == 0.0
    assert table.acquire_connection(slot, 0, 2, 0.0, 1.0) is FULL
    table.release_connection(slot, 0)
    assert table.view(slot).total == 1 and table.view(slot).columns == {0: 1}
    assert table.take_message(slot, 2.0, 50.0) == 0.0
    assert table.message_wait(slot, 2.0, 50.0) == pytest.approx(0.5)
    assert table.take_message(slot, 2.0, 50.1) == pytest.approx(0.4)
    assert table.take_message(slot, 2.0, 50.5) == 0.0
    # connect_rate: one new connection per second at most
    other = table.slot_of("slow")
    assert other is not None
    assert table.acquire_connection(other, 0, 0, 1.0, 10.0) == 0.0
    assert table.acquire_connection(other, 0, 0, 1.0, 10.2) == pytest.approx(0.8)
    reader = LimitTable.open_readonly(str(tmp_path / "t.shm"))
    assert reader is not None and reader.slot_of("gmail", create=False) == slot
    assert reader.slot_of("unknown", create=False) is None
    assert reader.view(slot).total == 1
    reader.close()
    table.close()
    assert LimitTable.open_readonly(str(tmp_path / "absent.shm")) is None


_HAMMER = textwrap.dedent("""
    import sys, time
    from engine.delivery.shared_limits import LimitTable
    path, column, cap, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    table = LimitTable.open(path, column, 2)
    slot = table.slot_of("provider")
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # start together
    granted = refused = worst = 0
    while granted < rounds:
        if table.acquire_connection(slot, column, cap, 0.0, time.monotonic()):
            refused += 1
            continue
        granted += 1
        worst = max(worst, table.view(slot).total)  # read while we hold one
        table.release_connection(slot, column)
    print(granted, refused, worst)
""")


def test_two_processes_never_exceed_the_cap_together(tmp_path: Path) -> None:
    path, cap = str(tmp_path / "t.shm"), 3
    procs = [subprocess.Popen([sys.executable, "-c", _HAMMER, path, str(col), str(cap), "3000"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for col in (0, 1)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for granted, _refused, worst in outs:
        assert int(granted) == 3000
        assert 1 <= int(worst) <= cap
    table = LimitTable.open_readonly(path)
    assert table is not None
    slot = table.slot_of("provider", create=False)
    assert slot is not None and table.view(slot).total == 0
    table.close()


def test_many_holders_in_two_processes_stop_at_the_cap(tmp_path: Path) -> None:
    """Each process grabs as many as it can and holds them: together exactly the cap."""
    path, cap = str(tmp_path / "t.shm"), 5
    grab = textwrap.dedent("""
        import sys, time
        from engine.delivery.shared_limits import LimitTable
        table = LimitTable.open(sys.argv[1], int(sys.argv[2]), 2)
        slot = table.slot_of("provider")
        n = 0
        for _ in range(50):
            if table.acquire_connection(slot, int(sys.argv[2]), int(sys.argv[3]), 0.0, time.monotonic()) == 0.0:
                n += 1
        print(n, flush=True)
        sys.stdin.readline()  # hold them until told
    """)
    procs = [subprocess.Popen([sys.executable, "-c", grab, path, str(col), str(cap)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for col in (0, 1)]
    try:
        held = []
        for p in procs:
            assert p.stdout is not None
            held.append(int(p.stdout.readline()))
        assert sum(held) == cap
        reader = LimitTable.open_readonly(path)
        assert reader is not None
        slot = reader.slot_of("provider", create=False)
        assert slot is not None
        view = reader.view(slot)
        assert view.total == cap and sum(view.columns.values()) == cap
        # The process of column 1 is killed holding its connections...
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        assert reader.view(slot).total == cap  # still counted: nobody released them
        # ...and its successor (same column) zeroes the column when it opens the table.
        successor = LimitTable.open(path, 1, 2)
        assert reader.view(slot).total == held[0]
        assert reader.view(slot).columns == ({0: held[0]} if held[0] else {})
        successor.close()
        reader.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.communicate("\n", timeout=30)
            else:
                p.communicate()


def test_columns_beyond_the_worker_count_are_zeroed(tmp_path: Path) -> None:
    path = str(tmp_path / "t.shm")
    big = LimitTable.open(path, 5, 8)  # a run with 8 workers left column 5 holding one
    slot = big.slot_of("p")
    assert slot is not None and big.acquire_connection(slot, 5, 0, 0.0, 1.0) == 0.0
    small = LimitTable.open(path, 0, 2)  # restarted with 2 workers: column 5 is nobody's
    assert small.view(slot).total == 0
    assert small.acquire_connection(slot, COLUMNS + 3, 0, 0.0, 1.0) == 0.0  # no column: total only
    small.close()
    big.close()


def test_a_file_of_another_layout_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "t.shm"
    path.write_bytes(b"garbage")
    table = LimitTable.open(str(path), 0, 1)
    assert table.slot_of("p") is not None
    table.close()
    assert os.path.getsize(path) > 1000


class _IdlePool:
    """A GateUser with idle sessions: counts the QUITs asked of it."""

    def __init__(self) -> None:
        self.retired = 0

    def on_gate_open(self) -> None:
        pass

    def retire_coldest_idle(self) -> bool:
        self.retired += 1
        return True


def test_a_worker_keeps_its_share_when_another_waits(tmp_path: Path) -> None:
    # Two workers, cap 2: a worker holding 2 gives one up to the one waiting, a worker
    # holding its share of 1 keeps it (else they take sessions from each other for ever).
    async def sweep_with(held: int) -> int:
        loop = asyncio.get_running_loop()
        table = LimitTable.open(str(tmp_path / f"share{held}.shm"), 0, 2)
        gate = ProviderGates(table, 0, loop, workers=2).gate_for(
            PoolSettings(provider="tiny", provider_connections=2))
        assert gate is not None and gate.fair_share() == 1
        pool = _IdlePool()
        for _ in range(held):
            assert gate.try_connect(pool)
        assert gate.slot is not None
        table.want(gate.slot, loop.time() + 10)  # the other worker waits
        gate.note_idle(pool)
        gate._on_sweep()
        table.close()
        return pool.retired

    assert asyncio.run(sweep_with(2)) == 1
    assert asyncio.run(sweep_with(1)) == 0
