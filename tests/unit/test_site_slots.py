"""The server-wide per-site connection count (engine/delivery/site_slots.py): a cap
holds across handles and processes, a dead worker's counts are zeroed by its successor,
slots of sites with no connection are taken over once none is empty (and the handle
that remembered the old slot looks its key up again), and a worker waiting for the
site makes the others yield their share."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from engine.delivery import site_slots
from engine.delivery.holds import Holds, Throttle
from engine.delivery.routing import worker_share
from engine.delivery.site_slots import UNCOUNTED, SiteGate, SiteGates, SiteTable, site_hash

REPO = Path(__file__).resolve().parents[2]
A, B = site_hash("ip:127.0.0.2|25"), site_hash("ip:127.0.0.3|25")


def test_a_cap_holds_across_two_workers_handles(tmp_path: Path) -> None:
    path = str(tmp_path / "sites.shm")
    w0, w1 = SiteTable.open(path, 0, 2), SiteTable.open(path, 1, 2)
    try:
        slot, granted = w0.acquire(A, 0, 1)
        assert granted and slot >= 0
        assert w1.acquire(A, 1, 1) == (slot, False)  # the cap of 1 holds for both
        assert w1.acquire(B, 1, 1)[1]  # another site has its own count
        assert w0.count(A) == (1, {0: 1})
        w0.release(slot, 0)
        assert w1.acquire(A, 1, 1) == (slot, True)
        assert w0.count(A) == (1, {1: 1})
        assert w1.acquire(A, 1, 3)[1] and w0.acquire(A, 0, 3)[1]
        assert not w0.acquire(A, 0, 3)[1]
        assert w1.count(A) == (3, {0: 1, 1: 2})
        assert w0.acquire(A, 0, 0)[1]  # no cap: counted all the same
    finally:
        w0.close()
        w1.close()


def test_a_killed_workers_counts_are_zeroed_by_its_successor(tmp_path: Path) -> None:
    """A real second process takes the only connection and is killed with it held."""
    path = str(tmp_path / "sites.shm")
    code = (
        "import sys\n"
        "from engine.delivery.site_slots import SiteTable, site_hash\n"
        f"t = SiteTable.open({path!r}, 1, 2)\n"
        "print(t.acquire(site_hash('ip:127.0.0.2|25'), 1, 1)[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "True"
            mine = SiteTable.open(path, 0, 2)
            assert not mine.acquire(A, 0, 1)[1]  # the other process holds the cap
            child.kill()
            child.wait(10)
            assert not mine.acquire(A, 0, 1)[1]  # its count stays until its successor starts
            successor = SiteTable.open(path, 1, 2)  # the same worker slot: its column zeroed
            assert mine.count(A) == (0, {})
            assert mine.acquire(A, 0, 1)[1]
            mine.close()
            successor.close()
        finally:
            child.kill()


def test_fewer_workers_after_a_restart_zero_the_columns_past_them(tmp_path: Path) -> None:
    path = str(tmp_path / "sites.shm")
    old = SiteTable.open(path, 3, 4)
    assert old.acquire(A, 3, 1)[1]
    new = SiteTable.open(path, 0, 2)  # two workers now: column 3 is nobody's
    assert new.acquire(A, 0, 1)[1]
    old.close()
    new.close()


def test_slots_without_connections_are_taken_over_when_none_is_empty(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_slots, "SLOTS", 4)
    table, other = SiteTable.private(), None
    keys = [site_hash(f"site{i}") for i in range(6)]
    held = [table.acquire(k, 0, 1)[0] for k in keys[:3]]  # three sites hold a connection
    idle, _ = table.acquire(keys[3], 0, 1)
    table.release(idle, 0)  # the fourth has none: its slot may be taken over
    assert sorted([*held, idle]) == [0, 1, 2, 3]
    slot, granted = table.acquire(keys[4], 0, 1)
    assert (slot, granted) == (idle, True)  # the only slot without a connection
    assert table.acquire(keys[5], 0, 1) == (UNCOUNTED, True)  # none left: not counted
    table.release(slot, 0)
    assert table.acquire(keys[3], 0, 1) == (idle, True)  # looked up again, then claimed
    assert table.count(keys[4]) == (0, {})
    for s, k in zip(held, keys[:3], strict=True):
        assert table.count(k) == (1, {0: 1}) and not table.acquire(k, 0, 1)[1]
        assert s in range(4)
    assert other is None


class User:
    def __init__(self) -> None:
        self.opened = 0
        self.idle = True
        self.yielded = 0

    def on_gate_open(self) -> None:
        self.opened += 1

    def yield_site(self, contended: bool) -> bool:
        if contended and self.idle:
            self.idle = False
            self.yielded += 1
        return self.idle


def test_a_waiting_worker_is_called_back_and_makes_the_other_yield(tmp_path: Path) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "sites.shm")
        t0, t1 = SiteTable.open(path, 0, 2), SiteTable.open(path, 1, 2)
        u0, u1 = User(), User()
        g0 = SiteGates(t0, 0, 2, loop).gate_for("site", u0)
        g1 = SiteGates(t1, 1, 2, loop).gate_for("site", u1)
        assert isinstance(g0, SiteGate) and isinstance(g1, SiteGate)
        assert SiteGates(t0, 0, 1, loop).gate_for("site", u0) is None  # one worker: no gate
        assert g0.try_connect(1)
        assert not g1.contended() and not g0.contended()
        assert not g1.try_connect(1)  # the cap: worker 1 waits and says so
        assert g0.contended() and not g1.contended()
        g0.note_idle()  # worker 0's session idles: it yields at the next look
        await asyncio.sleep(site_slots.RECHECK * 3)
        assert u0.yielded == 1 and u1.opened >= 1  # called back to look again
        assert not g1.try_connect(1)  # still waiting (its mark is renewed at each look)
        assert g0.limit(4) == 2  # cap 4, two workers: a share of 2 ...
        assert g0.limit(1) == 1  # ... and under cap 1 the turn (TURN) is not over yet
        g0.turn_since -= site_slots.TURN
        assert g0.limit(1) == 0  # squeezed: its connection goes when its session asks
        opened = u0.opened
        g0.release()
        await asyncio.sleep(0)  # the squeeze ended with the connection: dispatch again
        assert u0.opened == opened + 1
        assert not g0.try_connect(1)  # it just yielded: the waiting worker goes first
        assert g1.try_connect(1) and g1.held == 1
        assert g0.share(4) == 2 and g0.share(3) == 2
        g0.turn_since = loop.time()
        assert g0.share(1) == 1  # under a cap below the worker count: a turn ...
        g0.turn_since -= site_slots.TURN
        assert g0.share(1) == 0  # ... that ends
        g1.release()
        g1.release()  # a second release of nothing counted changes nothing
        assert t0.count(site_hash("site")) == (0, {})
        for g in (g0, g1):
            g.forget()
        t0.close()
        t1.close()

    asyncio.run(run())


def test_a_throttles_rate_is_split_over_the_workers() -> None:
    """Every worker delivers a share of a throttled domain through a pool of its own, so
    each applies its part of the rate (routing.worker_share); the connection cap is the
    site table's (exact), and the operator's figures stay as given."""
    holds = Holds(throttles={
        "a.test": Throttle("a.test", 1, 10.0, 0.0), "b.test": Throttle("b.test", 3, None, 0.0)})
    mine = worker_share(holds, 2)
    assert mine.throttles["a.test"] == Throttle("a.test", 1, 5.0, 0.0)
    assert mine.throttles["b.test"] == holds.throttles["b.test"]
    assert holds.throttles["a.test"].rate == 10.0  # the table as shown is untouched
    assert worker_share(holds, 1) is holds
