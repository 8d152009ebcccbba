"""A dead destination costs one op, not one per message (engine/delivery/dead.py).

In process, over real loopback sockets, LMDB and the lab DNS: d.test's MX is an
address where nothing listens (connection refused) until the test starts a sink
there. Every unit for it is deferred as a group: first the jobs the pool had queued
when it died, then the units a scan finds while it backs off; none is lost, none has
an attempt counted, each shows the refusal as its last reply, and all are delivered
once the site is back. Counts come from the scheduler's stats, the delivery log and
the store, never from time.
"""

from __future__ import annotations

import time
from typing import Any

from engine.delivery.holds import Holds, Suspension, Throttle
from engine.queue.records import PENDING, domain_of
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import Lab, body, lab, send_many, tag_of  # noqa: F401
from tests.integration.test_relay_holds import hold, release

N = 12
DEAD_IP = "127.0.0.5"
ZONE: dict[str, Any] = {
    "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": ["127.0.0.2"]},
    "d.test": {"MX": [(10, "mx.d.test")]}, "mx.d.test": {"A": [DEAD_IP]},
}


def group_lines(lab: Lab) -> list[dict[str, Any]]:
    return [e for e in lab.log() if e.get("group")]


def d_recipients(lab: Lab) -> list[Any]:
    return [r for rec in lab.records().values() for r in rec.recipients
            if r.state == PENDING and domain_of(r.address) == "d.test"]


def test_dead_site_units_are_deferred_as_one_group_then_delivered(lab: Lab):
    sink_a = lab.sink("127.0.0.2")  # also fixes the port: nothing listens on DEAD_IP's
    lab.zone(ZONE)
    server = lab.start({"delivery": {"backoff": "600s", "backoff_max": "600s"}})
    delivery = server.runtime.delivery
    stats = delivery.scheduler.stats
    # Held while they arrive, so the N units reach the pool together when released.
    hold(server, Holds({"d.test": Suspension("d.test", since=time.time(), until=None,
                                             reason="test")}, {}))
    ids = send_many(server.port, [([f"u{i}@d.test"], body(f"d{i}")) for i in range(N)]
                    + [(["x@a.test"], body("a0"))])
    d_ids = set(ids[:N])
    lab.wait_sink(sink_a, 1)
    hold(server, Holds())
    assert release(server, "d.test") == N
    server.call(delivery.scheduler.rescan)

    # 1. The pool takes the N jobs, both connection attempts are refused, it backs off
    # and hands its whole queue back: one op, one log line, N units.
    [first] = lab.wait_log(lambda e: e.get("group") is True)
    assert (first["domain"], first["messages"], first["recipients"]) == ("d.test", N, N)
    assert set(first["ids"]) == d_ids and first["code"] == 421, first
    assert (stats.group_ops, stats.grouped, stats.deferred) == (1, N, N)
    rcpts = d_recipients(lab)
    assert len(rcpts) == N  # none lost
    assert all(r.attempts == 0 for r in rcpts)  # nothing reached the remote
    assert all(r.last_reply.startswith("421 4.4.1") for r in rcpts)  # what ctl queue shows
    # The backoff's end, plus at most a tenth of it: never before, and spread.
    assert all(time.time() + 500 < r.next_attempt < time.time() + 670 for r in rcpts)

    # 2. Made due again while the pool still backs off: the scan defers them without
    # dispatching (no job, no connection attempt), again in one op.
    dispatched, opened = stats.dispatched, server.call(lambda: delivery.pools.connections_opened)
    assert release(server, "d.test") == N
    server.call(delivery.scheduler.rescan)
    lab.wait_log(lambda e: e.get("group") is True, 2)
    second = group_lines(lab)[1]
    assert second["messages"] == N and set(second["ids"]) == d_ids
    assert (stats.group_ops, stats.grouped, stats.deferred) == (2, 2 * N, 2 * N)
    assert stats.dispatched == dispatched
    assert server.call(lambda: delivery.pools.connections_opened) == opened  # a.test's one
    assert all(r.attempts == 0 for r in d_recipients(lab))

    # 3. The site comes back: a flush ends the backoff, every unit is delivered once.
    sink_d = lab.sink(DEAD_IP)
    assert server.call(lambda: delivery.flush("d.test")) == 1
    assert release(server, "d.test") == N
    server.call(delivery.scheduler.rescan)
    lab.wait_sink(sink_d, N)
    lab.wait_queue_empty()
    assert sorted(tag_of(m.data) or "" for m in sink_d.messages) == sorted(f"d{i}" for i in range(N))
    # Counted when the outcome's commit calls back on the loop, just after the store says so.
    wait_until(lambda: stats.delivered == N + 1, 20, "the deliveries counted")
    assert len(group_lines(lab)) == 2


def test_mail_for_a_dead_site_is_dated_at_intake(lab: Lab):
    """Once the site is known dead, a new message for it is written due at the backoff's
    end (inbound/dead_intake.py): never dispatched, never scanned, yet counted, logged
    and shown as a group deferral would have been, its campaign's `deferred` included."""
    sink_a = lab.sink("127.0.0.2")
    lab.zone(ZONE)
    server = lab.start({"delivery": {"backoff": "600s", "backoff_max": "600s"}})
    delivery = server.runtime.delivery
    stats = delivery.scheduler.stats
    send_many(server.port, [(["first@d.test"], body("first"))])
    lab.wait_log(lambda e: e.get("group") is True)  # refused: the pool backs off
    dispatched, deferred = stats.dispatched, stats.deferred
    campaign = "X-Volley-Campaign: spring\r\n"
    late = send_many(server.port, [([f"u{i}@d.test", f"v{i}@d.test"], body(f"late{i}", extra=campaign))
                                   for i in range(5)] + [(["x@a.test"], body("a0"))])
    [line] = lab.wait_log(lambda e: e.get("intake") is True)
    assert (line["domain"], line["messages"], line["recipients"], line["code"]) == ("d.test", 5, 10, 421)
    assert set(line["ids"]) == set(late[:5]) and line["outcome"] == "deferred" and line["group"] is True
    lab.wait_sink(sink_a, 1)
    assert stats.deferred - deferred == 10  # counted as deferred, once durable
    assert stats.dispatched - dispatched == 1  # a.test's only: the dead site's were never dispatched
    dated = [r for rec in lab.records().values() for r in rec.recipients if r.address[0] in "uv"]
    assert len(dated) == 10 and all(r.attempts == 0 for r in dated)
    assert all(r.last_reply.startswith("421 4.4.1") for r in dated)  # what ctl queue shows
    assert all(time.time() + 500 < r.next_attempt < time.time() + 670 for r in dated)
    counts = server.call(lambda: server.store.campaign("", "spring"))
    assert counts is not None and (counts.injected, counts.deferred) == (10, 10)


# --- a slow destination holds at most its room of the in-flight set -----------------------

def test_throttled_destination_cannot_starve_the_others(lab: Lab):
    slow = lab.sink("127.0.0.2")
    fast = lab.sink("127.0.0.3")
    lab.zone({"slow.test": {"MX": [(10, "mx.slow.test")]}, "mx.slow.test": {"A": ["127.0.0.2"]},
              "fast.test": {"MX": [(10, "mx.fast.test")]}, "mx.fast.test": {"A": ["127.0.0.3"]}})
    server = lab.start({"delivery": {"max_ready": 10, "max_ready_per_destination": 4}})
    scheduler = server.runtime.delivery.scheduler
    # One message per 1000 s: the throttled pool keeps every unit it is given queued.
    hold(server, Holds({}, {"slow.test": Throttle("slow.test", max_connections=1, rate=0.001,
                                                  since=time.time())}))
    send_many(server.port, [([f"s{i}@slow.test"], body(f"s{i}")) for i in range(20)])
    # The slow units came first: without a room per destination they would fill all
    # 10 places and fast.test's mail would wait for the throttle.
    send_many(server.port, [([f"f{i}@fast.test"], body(f"f{i}")) for i in range(3)])
    lab.wait_sink(fast, 3)

    def slow_in_flight() -> int:
        return sum(1 for _, d in scheduler.inflight if d == "slow.test")

    assert 1 <= server.call(slow_in_flight) <= 4  # its room, never more
    assert len(slow.messages) <= 1  # the throttle's one token
    hold(server, Holds())  # the throttle lifted: the 16 passed over are found again
    lab.wait_sink(slow, 20)
    lab.wait_queue_empty()
    assert sorted(tag_of(m.data) or "" for m in slow.messages) == sorted(f"s{i}" for i in range(20))
    # Every unit left the in-flight set through _release, which kept the count per domain.
    wait_until(lambda: server.call(lambda: dict(scheduler._per_dest)) == {}, 20, "counts back to 0")
