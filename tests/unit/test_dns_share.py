"""DNS answers shared by the workers (engine/delivery/dns_share.py): what one handle
publishes another reads with what is left of its TTL, across handles and processes;
failures are not shared; a torn slot, another name in the slot and an expired answer are
misses; a full bucket gives up the answer nearest expiry; clear and forget reach every
handle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.delivery import dns_share
from engine.delivery.dns_share import _HEAD, ADDRESSES, MX, TXT, AnswerTable
from engine.dns.mx import Answer, MxRecord, Status

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mx_answer(*hosts: str, ttl: int = 300) -> Answer:
    return Answer(Status.OK, tuple(MxRecord(10 * i, h) for i, h in enumerate(hosts, 1)), ttl)


def test_answers_round_trip_with_what_is_left_of_their_ttl() -> None:
    clock = Clock()
    table = AnswerTable.private(clock)
    table.put(MX, "a.test", mx_answer("mx1.a.test", "mx2.a.test"))
    table.put(ADDRESSES, "mx1.a.test", Answer(Status.OK, ("127.0.0.2", "::2"), 60))
    table.put(TXT, "_mta-sts.a.test", Answer(Status.NXDOMAIN, (), 120))
    assert table.get(MX, "a.test") == mx_answer("mx1.a.test", "mx2.a.test")
    clock.now += 50
    assert table.get(ADDRESSES, "mx1.a.test") == Answer(Status.OK, ("127.0.0.2", "::2"), 10)
    assert table.get(TXT, "_mta-sts.a.test") == Answer(Status.NXDOMAIN, (), 70)
    assert table.get(MX, "mx1.a.test") is None  # another kind of the same name
    clock.now += 11
    assert table.get(ADDRESSES, "mx1.a.test") is None  # expired
    assert (table.hits, table.published) == (3, 3)


@pytest.mark.parametrize("status", [Status.SERVFAIL, Status.TIMEOUT])
def test_failures_and_zero_ttls_are_not_shared(status: Status) -> None:
    table = AnswerTable.private()
    table.put(MX, "a.test", Answer(status, (), 0))
    table.put(MX, "b.test", mx_answer("mx.b.test", ttl=0))
    assert table.get(MX, "a.test") is None and table.get(MX, "b.test") is None
    assert table.published == 0


def test_an_answer_larger_than_a_slot_is_not_shared() -> None:
    table = AnswerTable.private()
    big = mx_answer(*(f"mx{i}.{'x' * 50}.test" for i in range(10)))
    table.put(MX, "big.test", big)
    assert table.get(MX, "big.test") is None
    table.put(MX, "small.test", mx_answer("mx.small.test"))
    assert table.get(MX, "small.test") is not None


def test_a_torn_slot_is_a_miss() -> None:
    table = AnswerTable.private()
    table.put(MX, "a.test", mx_answer("mx.a.test"))
    key = table._key(MX, "a.test")
    off = next(o for o in range(table._bucket(key), table._bucket(key) + dns_share.WAYS * dns_share.SLOT_SIZE,
                                dns_share.SLOT_SIZE) if _HEAD.unpack_from(table._mm, o)[2] == key)
    table._mm[off + _HEAD.size + 3] ^= 0xFF  # a byte of the payload, as a half-done copy leaves it
    assert table.get(MX, "a.test") is None


def test_a_full_bucket_gives_up_the_answer_nearest_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every name in one bucket: keys differ (so slots do) but the bucket is the same.
    monkeypatch.setattr(AnswerTable, "_bucket", lambda self, key: dns_share.HEADER_SIZE)
    table = AnswerTable.private(Clock())
    names = [f"n{i}.test" for i in range(dns_share.WAYS)]
    for i, name in enumerate(names):
        table.put(MX, name, mx_answer(f"mx.{name}", ttl=300 if i != 2 else 100))
    table.put(MX, "new.test", mx_answer("mx.new.test"))
    assert table.get(MX, names[2]) is None  # nearest expiry
    for name in [*names[:2], *names[3:], "new.test"]:
        answer = table.get(MX, name)
        assert answer is not None and answer.records[0].host == f"mx.{name}"  # never another's
    table.put(MX, names[0], mx_answer("mx2.n0.test"))  # the same name again replaces it
    assert table.get(MX, names[0]) == mx_answer("mx2.n0.test")
    assert all(table.get(MX, name) is not None for name in [*names[1:2], *names[3:], "new.test"])


def test_handles_share_answers_and_forget_them_together(tmp_path: Path) -> None:
    path = str(tmp_path / "dns.shm")
    w0, w1 = AnswerTable.open(path), AnswerTable.open(path)
    try:
        w0.put(MX, "a.test", mx_answer("mx.a.test"))
        w0.put(ADDRESSES, "mx.a.test", Answer(Status.OK, ("127.0.0.2",), 300))
        w0.put(TXT, "_mta-sts.a.test", Answer(Status.NXDOMAIN, (), 300))
        w0.put(MX, "b.test", mx_answer("mx.b.test"))
        shared = w1.get(MX, "a.test")
        assert shared is not None and shared.records == mx_answer("mx.a.test").records
        w1.forget_domain("a.test")
        for kind, name in ((MX, "a.test"), (ADDRESSES, "mx.a.test"), (TXT, "_mta-sts.a.test")):
            assert w0.get(kind, name) is None, (kind, name)
        assert w0.get(MX, "b.test") is not None
        w0.clear()
        assert w1.get(MX, "b.test") is None
        w1.put(MX, "b.test", mx_answer("mx.b.test"))
        assert w0.get(MX, "b.test") is not None  # the table works on after a clear
    finally:
        w0.close()
        w1.close()
    assert w0.closed and w0.get(MX, "b.test") is None


def test_another_process_reads_what_this_one_published(tmp_path: Path) -> None:
    path = str(tmp_path / "dns.shm")
    mine = AnswerTable.open(path)
    try:
        mine.put(MX, "a.test", mx_answer("mx.a.test"))
        code = (
            "from engine.delivery.dns_share import MX, AnswerTable\n"
            "from engine.dns.mx import Answer, Status\n"
            f"t = AnswerTable.open({path!r})\n"
            "a = t.get(MX, 'a.test')\n"
            "print(a.records[0].host, a.ttl > 290)\n"
            "t.put(MX, 'b.test', Answer(Status.NODATA, (), 60))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert out.split() == ["mx.a.test", "True"]
        theirs = mine.get(MX, "b.test")
        assert theirs is not None and theirs.status is Status.NODATA and 50 <= theirs.ttl <= 60
    finally:
        mine.close()
