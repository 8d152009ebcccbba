"""The status rates are sliding windows over the counters (issue 14): a burst before
the first periodic sample is seen, each window forgets what left it, the newest counts
are read when status asks, and every row says how many seconds it really covers."""

from __future__ import annotations

import pytest

from engine.control.fleet import Fleet
from engine.control.render import render_status
from engine.control.wire import Live, State
from engine.observe.metrics import WorkerMetrics
from engine.observe.rates import RateWindow


def test_a_burst_before_the_first_sample_is_counted() -> None:
    # 200 messages in the first seconds, before the supervisor's first 5 s sample:
    # before, the first sample already held 200 and every rate read 0 for ever.
    w = RateWindow(start=0.0)
    w.add(5.0, {"received": 200})
    w.add(10.0, {"received": 200})
    r = w.rates(10.0)
    for window in ("1m", "5m", "15m"):
        assert r[window]["received"] * r[window]["seconds"] == pytest.approx(200)
        assert r[window]["seconds"] == pytest.approx(10.0)  # younger than every window


def test_each_window_slides_over_its_own_span() -> None:
    w = RateWindow(start=0.0)
    counts = 0
    for t in range(5, 1001, 5):  # the supervisor's 5 s samples
        if t == 20:
            counts += 300  # one burst at t=20, nothing after
        if 700 <= t <= 990:
            counts += 10  # then 2/s from t=700 to t=990
        w.add(float(t), {"received": counts})
    r = w.rates(1000.0)
    # 1m: the last burst of 2/s ended at 990: t 940..1000 holds 10 increases of 10 (945..990)
    assert r["1m"]["seconds"] == pytest.approx(60.0)
    assert r["1m"]["received"] * 60 == pytest.approx(100)
    # 5m: t 700..1000 holds the 2/s stretch but not the burst at 20
    assert r["5m"]["seconds"] == pytest.approx(300.0)
    assert r["5m"]["received"] * 300 == pytest.approx(590 - 10)
    # 15m: t 100..1000 still misses the burst at 20
    assert r["15m"]["seconds"] == pytest.approx(900.0)
    assert r["15m"]["received"] * 900 == pytest.approx(590)
    assert len({r[k]["received"] for k in r}) == 3  # not one average since start


def test_status_reads_the_newest_counts_and_the_render_says_how_much_it_covers() -> None:
    fleet = Fleet()
    start = fleet.rates._samples[0][0]
    m = WorkerMetrics()
    m.received = 200
    fleet.update(0, State(slot=0, metrics=m.snapshot(), live=Live()))
    # No periodic sample yet: the status asks, and the 200 are there.
    rates = fleet.rates.rates(start + 12.0)
    assert rates["1m"]["received"] * rates["1m"]["seconds"] == pytest.approx(200)
    text = render_status({"rates": rates}, 0.0)
    assert "1m (12 s of data)" in text and "15m (12 s of data)" in text
    # Past the window, no note: a full minute is a full minute.
    later = fleet.rates.rates(start + 75.0)
    assert later["1m"]["seconds"] >= 60.0
    assert "1m (" not in render_status({"rates": later}, 0.0)
    assert "5m (75 s of data)" in render_status({"rates": later}, 0.0)
