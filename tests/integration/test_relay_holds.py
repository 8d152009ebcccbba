"""Operator holds end to end, in process: a suspended domain's mail is parked in the
store (not sent, not rescanned) and goes out once the suspension is lifted and its
entries flushed; a throttled domain gets one connection; `flush` ends a pool's
backoff. The supervisor's part (saving the table, re-dating entries) is done here by
hand, the way it does it: table saved in the store first, then sent to the worker."""

from __future__ import annotations

import time
from typing import Any

from engine.delivery.holds import HOLDS_KEY, Holds, Suspension, Throttle, encode_holds
from engine.queue.records import PENDING, domain_of
from engine.queue.writetxn import WriteTxn
from tests.integration.harness import InboundServer, wait_until
from tests.integration.relay_helpers import (
    SENDER,
    Lab,
    body,
    check_dsn,
    dsns,
    lab,  # noqa: F401  (fixture)
    send_many,
)

ZONE: dict[str, Any] = {}
for _name, _ip in (("a.test", "127.0.0.2"), ("b.test", "127.0.0.3"), ("c.test", "127.0.0.4"),
                   ("d.test", "127.0.0.5")):
    ZONE[_name] = {"MX": [(10, f"mx.{_name}")]}
    ZONE[f"mx.{_name}"] = {"A": [_ip]}


def hold(server: InboundServer, holds: Holds) -> None:
    """What the supervisor does: save the table, then hand it to the worker."""
    server.call(lambda: server.store.put_control(HOLDS_KEY, encode_holds(holds)))
    server.call(lambda: server.runtime.delivery.set_holds(holds))


def release(server: InboundServer, domain: str) -> int:
    """The supervisor's flush: the domain's pending recipients are due now."""
    ids = server.call(lambda: list(server.store.iter_ids()))

    def op(w: WriteTxn) -> int:
        n = 0
        for msg_id in ids:
            rec = w.get(msg_id)
            if rec is None:
                continue
            mine = [r for r in rec.recipients if r.state == PENDING and domain_of(r.address) == domain]
            for r in mine:
                r.next_attempt = 0.0
            if mine:
                w.update_message(rec)
                n += 1
        return n

    return int(server.commit(op))


def pending_times(lab: Lab, domain: str) -> list[float]:
    return [r.next_attempt for rec in lab.records().values() for r in rec.recipients
            if r.state == PENDING and domain_of(r.address) == domain]


def test_suspended_domain_is_parked_then_delivered_after_resume(lab: Lab):
    sink_a = lab.sink("127.0.0.2")
    sink_b = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    server = lab.start()
    until = time.time() + 3600
    hold(server, Holds({"a.test": Suspension("a.test", since=time.time(), until=until,
                                             reason="test")}, {}))
    send_many(server.port, [(["x@a.test"], body("a1")), (["y@a.test"], body("a2")),
                            (["z@b.test"], body("b1")),
                            (["both@a.test", "both@b.test"], body("ab"))])
    lab.wait_sink(sink_b, 2)
    # Parked: every pending a.test recipient now waits for the end of the suspension,
    # so the due index has nothing of a.test to offer the scans meanwhile.
    wait_until(lambda: pending_times(lab, "a.test") == [until] * 3, 20, "a.test parked")
    due = server.call(lambda: server.store.due_entries(0, int((time.time() + 60) * 1000), 100))
    assert not [d for d in due if d[2] == "a.test"], due
    stats = server.runtime.delivery.scheduler.stats
    wait_until(lambda: stats.parked >= 3, 20, "park ops acknowledged")
    assert not sink_a.messages and sink_a.connections == 0
    wait_until(lambda: len(lab.records()) == 3, 20, "b1 done")  # a1, a2, a.test's half of ab

    hold(server, Holds({}, {}))  # resume: the supervisor drops it, then flushes
    assert release(server, "a.test") == 3
    server.call(lambda: server.runtime.delivery.flush("a.test"))
    lab.wait_sink(sink_a, 3)
    lab.wait_queue_empty()
    assert sorted(r for m in sink_a.messages for r in m.rcpt_tos) == \
        ["both@a.test", "x@a.test", "y@a.test"]
    assert len(sink_b.messages) == 2


def test_held_mail_still_expires_at_max_age(lab: Lab):
    sink = lab.sink("127.0.0.2")
    home = lab.home_sink()
    lab.zone(ZONE)
    server = lab.start({"delivery": {"max_age": "3s"}})
    hold(server, Holds({"a.test": Suspension("a.test", since=time.time(), until=None,
                                             reason="")}, {}))
    qid = lab.send(["bob@a.test"], body("held"))
    lab.wait_sink(home, 1, timeout=20)  # parked until its expiry, then bounced 5.4.7
    check_dsn(dsns(home)[0], to=SENDER, recipients=["bob@a.test"], status="5.4.7")
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert line["outcome"] == "expired"
    assert not sink.messages and sink.connections == 0
    lab.wait_queue_empty()


def test_throttled_domain_gets_at_most_one_connection(lab: Lab):
    sink = lab.sink("127.0.0.4")
    lab.zone(ZONE)
    server = lab.start()
    # Queue the mail while suspended, then release it all at once under the throttle:
    # twelve jobs arriving together would open two connections (slow start) unthrottled.
    now = time.time()
    hold(server, Holds({"c.test": Suspension("c.test", since=now, until=None, reason="")}, {}))
    send_many(server.port, [([f"r{i}@c.test"], body(f"c{i}")) for i in range(12)])
    wait_until(lambda: len(pending_times(lab, "c.test")) == 12
               and min(pending_times(lab, "c.test")) > now + 60, 20, "c.test parked")
    hold(server, Holds({}, {"c.test": Throttle("c.test", max_connections=1, rate=None, since=now)}))
    assert release(server, "c.test") == 12
    server.call(lambda: server.runtime.delivery.flush("c.test"))
    lab.wait_sink(sink, 12)
    assert sink.max_live == 1
    state = server.call(server.runtime.delivery.live_state)
    [own] = [p for p in state["pools"] if p["domain"] == "c.test"]
    # Unverified TLS: the pool is keyed by the MX's address, not its name.
    assert own["max_connections"] == 1 and own["site"] == "ip:127.0.0.4"
    lab.wait_queue_empty()


def test_flush_ends_a_pool_backoff(lab: Lab):
    busy = {"on": True}
    sink = lab.sink("127.0.0.5", script=lambda v, a: "421 4.7.0 come back later"
                    if v == "BANNER" and busy["on"] else None)
    lab.zone(ZONE)
    # A backoff far longer than the test may wait: only the flush can end it in time.
    server = lab.start({"delivery": {"backoff": "600s", "backoff_max": "600s"}})
    delivery = server.runtime.delivery
    qid = lab.send(["bob@d.test"], body("d1"))
    # The refused site's queued job is deferred with its group (dead.py): one line.
    [line] = lab.wait_log(lambda e: qid in (e["id"], *e.get("ids", ())))
    assert line["outcome"] == "deferred" and line["group"] and line["code"] == 421, line
    [backoff] = server.call(delivery.live_state)["backoffs"]
    assert "d.test" in backoff["domains"] and backoff["site"] == "ip:127.0.0.5"
    assert backoff["reply"].startswith("421") and backoff["until"] > time.time() + 500
    assert min(pending_times(lab, "d.test")) > time.time() + 500  # waits for the backoff

    busy["on"] = False
    assert server.call(lambda: delivery.flush("d.test")) == 1
    assert server.call(delivery.live_state)["backoffs"] == []
    assert release(server, "d.test") == 1
    server.call(lambda: delivery.flush("d.test"))
    lab.wait_sink(sink, 1)
    lab.wait_queue_empty()
