"""`volley ctl top`'s data model (engine/control/top.py): snapshots in, rows and lines out."""

from __future__ import annotations

from typing import Any

from engine.control.top import Snapshot, destinations, parse_counters, parse_cpu, screen


def pool(domain: str, sent: int, open_: int = 1, queued: int = 0, limit: int = 10,
         **extra: Any) -> dict[str, Any]:
    return {"site": f"mx.{domain}", "domain": "", "domains": [domain], "open": open_,
            "queued": queued, "limit": limit, "sent": sent, "backoff_until": None,
            "backoff_reply": "", **extra}


def snap(at: float, pools: list[dict[str, Any]], queue: list[dict[str, Any]] | None = None,
         counters: dict[str, float] | None = None, cpu: dict[int, float] | None = None,
         **status: Any) -> Snapshot:
    workers = [{"slot": 0, "pid": 10, "sessions_in": 2, "sessions_out": 3, "out_limit": 50},
               {"slot": 1, "pid": 11, "sessions_in": 0, "sessions_out": 1, "out_limit": 50}]
    return Snapshot(at=at, status={"hostname": "mx1", "uptime": 3725, "workers": workers,
                                   "queue": {"messages": 40, "units": 42, "deferred": 5},
                                   "pools": pools, **status},
                    queue={"rows": queue or []}, counters=counters or {}, cpu=cpu or {})


def test_rates_are_the_difference_of_two_snapshots_over_the_time_between_them():
    a = snap(100.0, [pool("a.test", 10)], [{"key": "a.test", "total": 9, "deferred": 1}],
             counters={"messages_received": 100, "messages_delivered": 50},
             cpu={0: 3.0, 1: 1.0})
    b = snap(102.0, [pool("a.test", 30)], [{"key": "a.test", "total": 5, "deferred": 4}],
             counters={"messages_received": 160, "messages_delivered": 90},
             cpu={0: 3.5, 1: 1.0})
    (row,) = destinations(a, b)
    assert (row.name, row.sent, row.sent_rate, row.deferred_rate) == ("a.test", 30, 10.0, 1.5)
    lines = screen(a, b)
    assert "in 30.0/s  out 20.0/s" in lines[1]
    assert lines[3] == "conns in 2 out 4/100  cpu w0 25%  w1 0%"
    # A destination new since the last refresh counts from nothing.
    c = snap(104.0, [pool("a.test", 30), pool("new.test", 8)])
    assert {r.name: r.sent_rate for r in destinations(b, c)} == {"a.test": 0.0, "new.test": 4.0}
    # The first refresh has nothing to compare with: no rate is invented.
    (first,) = destinations(None, b)
    assert first.sent_rate == 0.0 and "in -/s" in screen(None, b)[1]


def test_a_counter_that_went_back_counts_no_negative_rate():
    a = snap(0.0, [pool("a.test", 500)], counters={"messages_delivered": 900})
    b = snap(1.0, [pool("a.test", 20)], counters={"messages_delivered": 10})  # worker restarted
    assert destinations(a, b)[0].sent_rate == 0.0
    assert "out 0.0/s" in screen(a, b)[1]


def test_pools_of_several_workers_sum_into_one_destination_with_their_caps():
    pools = [pool("a.test", 7, open_=2, queued=3, limit=4),
             {**pool("a.test", 5, open_=1, limit=4), "domain": "a.test"}]
    (row,) = destinations(None, snap(0.0, pools, [{"key": "a.test", "total": 12, "deferred": 0}]))
    assert (row.sent, row.open, row.cap, row.jobs, row.queued) == (12, 3, 8, 3, 12)


def test_busiest_first_by_delivery_rate_then_connections_then_queue():
    a = snap(0.0, [pool("slow.test", 0), pool("fast.test", 0), pool("idle.test", 0, open_=0)],
             [{"key": "big.test", "total": 900, "deferred": 900}])
    b = snap(1.0, [pool("slow.test", 2), pool("fast.test", 50), pool("idle.test", 0, open_=0),
                   pool("open.test", 0, open_=5)],
             [{"key": "big.test", "total": 900, "deferred": 900},
              {"key": "small.test", "total": 3, "deferred": 0}])
    assert [r.name for r in destinations(a, b)] == [
        "fast.test", "slow.test", "open.test", "big.test", "small.test", "idle.test"]


def test_holds_show_on_the_row_suspension_before_backoff():
    pools = [pool("b.test", 0, open_=0, backoff_until=5.0, backoff_reply="421 4.7.0 try later")]
    queue = [{"key": "b.test", "total": 4, "deferred": 4},
             {"key": "c.test", "total": 3, "deferred": 0, "suspended": 3, "state": "suspended",
              "reason": "abuse desk", "by_who": "ops (pid 7)"},
             {"key": "d.test", "total": 2, "ready": 0, "deferred": 0, "suspended": 2,
              "state": "suspended", "reason": "421 4.7.0 [TS03] deferred", "by_who": "backoff"}]
    rows = {r.name: r for r in destinations(None, snap(0.0, pools, queue))}
    assert rows["b.test"].state == "backoff: 421 4.7.0 try later"
    assert (rows["c.test"].state, rows["c.test"].deferred) == ("suspended: abuse desk", 3)
    assert (rows["d.test"].state, rows["d.test"].deferred) == ("backoff: 421 4.7.0 [TS03] deferred", 2)


def test_every_line_fits_80_columns_and_24_lines_with_long_names_and_replies():
    long = "a-very-long-recipient-domain-name.example.com"
    pools = [pool(f"d{i}.{long}", i * 1000, open_=i, limit=100, backoff_until=9.0,
                  backoff_reply="451 4.7.1 " + "x" * 200) for i in range(40)]
    lines = screen(snap(0.0, pools), snap(1.0, pools, hostname="h" * 120), 80, 24)
    assert len(lines) == 24
    assert all(len(line) <= 80 for line in lines)
    assert lines[-1] == "... 23 more destinations"  # 17 rows shown
    # A cut cell is marked, and the columns stay where the titles are.
    title = lines[5]
    row = lines[6]
    assert title.startswith("DESTINATION") and row.startswith("d39.a-very-long-r~ ")
    assert row.index("/100") + 4 == title.index("CONN") + 4
    assert row.endswith("~")


def test_a_small_window_keeps_the_header_and_cuts_rows():
    lines = screen(None, snap(0.0, [pool("a.test", 1)]), 40, 3)
    assert len(lines) == 3 and all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("volley top  mx1  up 1:02:05")


def test_counters_come_from_the_unlabelled_samples_of_the_exposition():
    text = ("# TYPE volley_messages_delivered_total counter\n"
            "volley_messages_delivered_total 42.0\n"
            'volley_messages_deferred_total{class="x"} 9\n'
            "volley_messages_received_total 50\n")
    assert parse_counters(text) == {"messages_delivered": 42.0, "messages_received": 50.0}


def test_cpu_seconds_from_proc_stat_with_a_name_holding_spaces():
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    assert parse_cpu("1234 (volley: worker 0) " + " ".join(fields), 100.0) == 3.0
