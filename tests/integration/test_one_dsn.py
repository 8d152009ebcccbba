"""One message, one failure report (RFC 3464 §2, README "Guarantees"): recipients at two
domains are delivered as two (message, domain) units, maybe by two workers, yet their
failures in one delivery pass reach the sender as ONE DSN naming both (see
engine/delivery/onereport.py for what a pass is)."""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path
from typing import Any

import orjson

from engine.lab.sink.protocol import start_sink
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import (
    HOME,
    HOME_IP,
    SENDER,
    Dsn,
    Lab,
    body,
    dsns,
    lab,  # noqa: F401  (fixture)
    rcpt_of,
    send,
    tag_of,
)
from tests.integration.test_relay_process import domains_by_shard, queued_after_stop, relay_config


def refuse(verb: str, arg: str) -> str | None:
    return "550 5.1.1 no such user here" if verb == "RCPT" else None


def two_domain_zone(x: str, y: str) -> dict[str, Any]:
    return {
        x: {"MX": [(10, f"mx.{x}")]}, f"mx.{x}": {"A": ["127.0.0.2"]},
        y: {"MX": [(10, f"mx.{y}")]}, f"mx.{y}": {"A": ["127.0.0.3"]},
    }


def check_one_report(reports: list[Dsn], recipients: list[str]) -> None:
    assert len(reports) == 1, [d.final_recipients for d in reports]
    (d,) = reports
    assert d.mail_from == "" and d.rcpt_tos == [SENDER]
    assert d.msg.get_content_type() == "multipart/report"
    assert sorted(d.final_recipients) == sorted(recipients), d.status_text
    assert d.statuses == ["5.1.1"] * len(recipients), d.status_text
    # Each recipient names the host that refused it (two destinations, one report).
    assert sorted(d.status_text.count(f"Remote-MTA: dns; mx.{r.split('@')[1]}") for r in recipients) \
        == [1] * len(recipients), d.status_text


def test_two_domains_refusing_give_one_report(lab: Lab):
    sink_x = lab.sink("127.0.0.2", script=refuse)
    sink_y = lab.sink("127.0.0.3", script=refuse)
    home = lab.home_sink()
    lab.zone(two_domain_zone("x.test", "y.test"))
    lab.start()
    lab.send(["a@x.test", "b@y.test"], body("both-fail"))
    lab.wait_log(lambda e: e["outcome"] == "bounced", 2)
    lab.wait_queue_empty()  # the report(s) delivered too
    assert not sink_x.messages and not sink_y.messages
    check_one_report(dsns(home), ["a@x.test", "b@y.test"])


def test_failure_held_for_a_deferred_domain_goes_out_when_it_defers(lab: Lab):
    # a@x.test bounces; b@y.test is deferred once, then delivered. The report for
    # a@x.test must not wait for b's retry: the pass ends with b's deferral.
    later = threading.Event()

    def slow(verb: str, arg: str) -> str | None:
        return None if later.is_set() or verb != "RCPT" else "451 4.3.2 try later"

    lab.sink("127.0.0.2", script=refuse)
    sink_y = lab.sink("127.0.0.3", script=slow)
    home = lab.home_sink()
    lab.zone(two_domain_zone("x.test", "y.test"))
    lab.start({"delivery": {"retry": "2s"}})
    lab.send(["a@x.test", "b@y.test"], body("one-fails"))
    lab.wait_sink(home, 1)  # before b's retry: nothing lets it through yet
    assert not sink_y.messages
    check_one_report(dsns(home), ["a@x.test"])
    later.set()
    lab.wait_sink(sink_y, 1)
    lab.wait_queue_empty()
    assert [tag_of(m.data) for m in sink_y.messages] == ["one-fails"]
    assert len(home.messages) == 1


def test_two_workers_two_shards_one_report(serve, peers, dns_zone):
    shards = domains_by_shard(1)
    x, y = shards[0][0], shards[1][0]  # delivered by worker 0 and worker 1
    refused: list[str] = []
    lock = threading.Lock()

    def script(verb: str, arg: str) -> str | None:
        if verb != "RCPT":
            return None
        with lock:
            refused.append(rcpt_of(arg))
        return "550 5.1.1 no such user here"

    sink_x = peers.call(start_sink("127.0.0.2", 0, script=script))
    peers.sinks.append(sink_x)
    for ip in ("127.0.0.3", HOME_IP):
        peers.sinks.append(peers.call(start_sink(ip, sink_x.port, script=script if ip != HOME_IP else None)))
    home = peers.sinks[-1]
    zone = two_domain_zone(x, y)
    zone.update({HOME: {"MX": [(10, f"mx.{HOME}")]}, f"mx.{HOME}": {"A": [HOME_IP]}})
    dns = dns_zone(zone)
    server = serve(relay_config(dns.port, sink_x.port))
    rcpts = [f"a@{x}", f"b@{y}"]
    send(server.port, rcpts, body("two-workers"))

    def refused_both() -> bool:
        with lock:
            return sorted(refused) == sorted(rcpts)

    wait_until(refused_both, 30, "both destinations refused their recipient")
    log_path = Path(tomllib.loads(server.config_path.read_text())["log"]["delivery"])

    def outcomes() -> list[tuple[str, str]]:
        lines = log_path.read_bytes().splitlines() if log_path.exists() else []
        return [(e["recipient"], e["outcome"]) for e in map(orjson.loads, lines)]

    # Both bounces logged and a report's delivery committed: stopped then, nothing may
    # be left queued (a second report, or the message itself), and no second report
    # may have been delivered.
    wait_until(lambda: sorted(o for o in outcomes() if o[1] == "bounced") == [(r, "bounced") for r in rcpts]
               and (SENDER, "delivered") in outcomes(), 30, "bounces logged and a report delivered")
    assert queued_after_stop(server) == 0
    check_one_report(dsns(home), rcpts)
