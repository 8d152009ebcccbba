"""What the fleet shares through Redis besides caps (issue 16): the suppression list,
suspensions and campaign counters, with three real `volley serve` nodes on 127.0.0.2x
and a real redis-server. Every wait polls a real condition against a deadline; the
deadlines are generous bounds (loaded CI machine), the lag measured is printed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import HONOURED, metric, one_sink, rcpt, smtp, sock
from tests.integration.control_helpers import ask, ctl_json
from tests.integration.harness import ServeProcess, wait_until
from tests.integration.relay_helpers import SENDER, body, transact

pytestmark = pytest.mark.timeout(240)
GONE = "gone.away@example.org"


def honoured_within(check: Any, what: str) -> float:
    """Poll `check()` until true; returns the seconds it took (raises past HONOURED)."""
    started = time.monotonic()
    wait_until(check, HONOURED, what)
    return time.monotonic() - started


def suppress(node: ServeProcess, value: str) -> None:
    reply = ask(sock(node), {"cmd": "suppress_add", "values": [value], "reason": "manual"})
    assert reply["ok"] and reply["added"] == 1, reply


def test_suppression_added_on_a_is_refused_at_rcpt_on_c(nodes: Any, capsys: Any) -> None:
    a, b, c = nodes(3)
    assert rcpt(c, GONE)[0] == 250
    suppress(a, GONE)
    lag = honoured_within(lambda: rcpt(c, GONE)[0] == 550, "C refuses at RCPT")
    assert rcpt(b, GONE)[0] == 550
    assert rcpt(c, GONE) == (550, f"5.7.1 <{GONE}>: recipient is suppressed (manual)")
    # A remove travels the same way.
    assert ask(sock(b), {"cmd": "suppress_remove", "value": GONE})["removed"] is True
    honoured_within(lambda: rcpt(a, GONE)[0] == 250, "A takes it again")
    with capsys.disabled():
        print(f"\n[suppression A->C honoured after {lag:.3f} s]")


def test_suppression_added_while_redis_is_down_reaches_the_others(
        nodes: Any, redis_server: RedisServer) -> None:
    a, _, c = nodes(3)
    suppress(a, "before@example.org")
    honoured_within(lambda: rcpt(c, "before@example.org")[0] == 550, "C before")
    redis_server.kill()
    a.wait_for(lambda e: e.get("event") == "cluster_degraded", 30)
    outbox = "volley_cluster_suppression_outbox"  # changes not yet in Redis
    assert metric(a, outbox) == 0
    suppress(a, GONE)  # the outbox keeps it
    assert metric(a, outbox) == 1  # the one change the test made during the outage
    assert rcpt(a, GONE)[0] == 550  # the local list answers at once
    assert rcpt(c, GONE)[0] == 250  # C cannot know yet
    assert rcpt(c, "before@example.org")[0] == 550  # C's mirror keeps answering
    redis_server.start()  # empty: no persistence, as a Redis that lost its data
    honoured_within(lambda: rcpt(c, GONE)[0] == 550, "C after Redis returned")
    wait_until(lambda: metric(a, outbox) == 0, HONOURED, "A's outbox drained")
    with redis_server.client() as r:
        # Redis had lost everything: the nodes publish their lists again (a new epoch).
        honoured_within(lambda: bool(r.hexists("volleytest:supp:h:", "address:before@example.org")),
                        "the list published again")
        assert r.hexists("volleytest:supp:h:", f"address:{GONE}")


def test_suspension_set_on_b_holds_on_a_and_c(nodes: Any) -> None:
    a, b, c = nodes(3)
    reply = ask(sock(b), {"cmd": "suspend", "domain": "held.test", "reason": "provider asked",
                          "duration": 3600})
    assert reply["ok"], reply

    def held(node: ServeProcess) -> bool:
        rows = ask(sock(node), {"cmd": "status"})["suspensions"]
        return any(r["domain"] == "held.test" and r["reason"] == "provider asked"
                   and r["by"].endswith("@node1") for r in rows)

    honoured_within(lambda: held(a) and held(c), "A and C hold held.test")
    until = {r["until"] for n in (a, c) for r in ask(sock(n), {"cmd": "status"})["suspensions"]}
    assert len(until) == 1  # the same end everywhere
    assert ask(sock(c), {"cmd": "resume", "domain": "held.test"})["ok"]
    honoured_within(lambda: not held(a) and not any(
        r["domain"] == "held.test" for r in ask(sock(b), {"cmd": "status"})["suspensions"]),
        "the resume on C lifts it on A and B")


def test_mail_for_a_suspended_domain_is_parked_on_every_node(
        nodes: Any, peers: Any, dns_zone: Any) -> None:
    sink, relay = one_sink(peers, dns_zone, "held.test")
    a, b, c = nodes(3, relay)
    assert ask(sock(b), {"cmd": "suspend", "domain": "held.test", "reason": "x"})["ok"]
    for n in (a, c):
        wait_until(lambda n=n: any(r["domain"] == "held.test" for r in
                                   ask(sock(n), {"cmd": "status"})["suspensions"]), HONOURED, "held")
    for i, n in ((0, a), (2, c)):
        with smtp(n) as client:
            transact(client, SENDER, [f"u{i}@held.test"], body(f"held{i}"))
    # Parked, not delivered: each node's queue lists its message as suspended.
    for n in (a, c):
        wait_until(lambda n=n: [m["state"] for m in ask(sock(n), {"cmd": "list"})["messages"]]
                   == ["suspended"], HONOURED, "parked")
    assert len(sink.messages) == 0
    assert ask(sock(a), {"cmd": "resume", "domain": "held.test"})["ok"]
    wait_until(lambda: len(sink.messages) == 2, 60, "both delivered after the fleet-wide resume")


def test_campaign_counters_summed_over_three_nodes_equal_the_sinks_count(
        nodes: Any, peers: Any, dns_zone: Any) -> None:
    sink, relay = one_sink(peers, dns_zone, "a.test")
    fleet = nodes(3, relay)
    sent = 0
    for i, n in enumerate(fleet):
        with smtp(n) as client:
            for k in range(i + 2):  # 2, 3 and 4 messages
                data = b"X-Volley-Campaign: spring\r\n" + body(f"c{i}-{k}")
                transact(client, SENDER, [f"u{i}-{k}@a.test"], data)
                sent += 1
    wait_until(lambda: len(sink.messages) == sent, 60, "every message delivered")

    def fleet_row() -> dict[str, Any]:
        rows = ctl_json(fleet[1], "campaigns", "--cluster")["campaigns"]
        return next((r for r in rows if r["campaign"] == "spring"), {})

    wait_until(lambda: fleet_row().get("delivered") == len(sink.messages), 30, "the fleet's sum")
    row = fleet_row()
    assert row["injected"] == row["delivered"] == len(sink.messages) == 9
    # Each node alone counts only its own.
    own = [next(r for r in ctl_json(n, "campaigns")["campaigns"] if r["campaign"] == "spring")
           for n in fleet]
    assert [r["delivered"] for r in own] == [2, 3, 4]


def test_a_node_joining_with_its_own_list_publishes_it(nodes: Any, tmp_path: Path) -> None:
    from engine.queue import suppression
    from engine.queue.store import QueueStore

    queue = tmp_path / "old-queue"  # a node that ran alone before [cluster] was set
    store = QueueStore(str(queue), map_size=64 << 20)
    try:
        store.write_one(lambda w: suppression.add(w, [
            suppression.make("old@example.org", "bounce", source="550 5.1.1 gone"),
            suppression.make("old.example", "manual", tenant="acme")]))
    finally:
        store.close()
    (veteran,) = nodes(1, {"queue": {"path": str(queue)}})
    (other,) = nodes(1)
    honoured_within(lambda: rcpt(other, "old@example.org")
                    == (550, "5.7.1 <old@example.org>: recipient is suppressed (bounce)"),
                    "the veteran's entry on the newcomer")
    rows = ask(sock(other), {"cmd": "suppress_list", "tenant": "acme"})["entries"]
    assert [(r["value"], r["reason"]) for r in rows] == [("old.example", "manual")]
    assert rcpt(veteran, "old@example.org")[0] == 550


def test_a_suspension_outlives_a_redis_that_lost_its_data(
        nodes: Any, redis_server: RedisServer) -> None:
    a, b = nodes(2)
    assert ask(sock(b), {"cmd": "suspend", "domain": "held.test", "reason": "r"})["ok"]
    wait_until(lambda: any(r["domain"] == "held.test" for r in
                           ask(sock(a), {"cmd": "status"})["suspensions"]), HONOURED, "A holds")
    redis_server.kill()
    b.wait_for(lambda e: e.get("event") == "cluster_degraded", 30)
    redis_server.start()  # empty
    # B publishes its suspension again (a new epoch): a node joining now holds it too.
    (c,) = nodes(1)
    for n in (a, c):
        wait_until(lambda n=n: any(r["domain"] == "held.test" and r["by"].endswith("@node1")
                                   for r in ask(sock(n), {"cmd": "status"})["suspensions"]),
                   HONOURED, "held after Redis came back empty")


def test_campaigns_cluster_is_refused_alone_and_names_redis_when_it_is_down(
        serve: Any, nodes: Any, redis_server: RedisServer) -> None:
    from tests.integration.control_helpers import ctl

    alone = serve()
    done = ctl(alone, "campaigns", "--cluster", check=False)
    assert done.returncode == 1 and "not in a cluster" in done.stderr, (done.stdout, done.stderr)
    (node,) = nodes(1)
    assert ctl(node, "campaigns", "--cluster").stdout == "no campaigns\n"
    redis_server.kill()
    done = ctl(node, "campaigns", "--cluster", check=False)
    assert done.returncode == 1 and "redis not answering" in done.stderr, (done.stdout, done.stderr)
    assert ctl(node, "campaigns").returncode == 0  # this node's own still answer
