"""Steering delivery through the control socket of a real `volley serve`: suspend and
resume, a suspension surviving a restart, flush cutting a deferral short, bounce by
filter producing DSNs, throttle, and the MX cache. DNS is a loopback server; every
destination is a sink on 127.0.0.x."""

from __future__ import annotations

import os
import pwd
import threading
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine.lab.sink.protocol import start_sink
from tests.integration.control_helpers import ask, ctl, ctl_json, relay_overrides
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import HOME, HOME_IP, body, rcpt_of, send_many, tag_of
from tests.integration.test_metrics_truth import samples

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
WAIT = 40.0


def zone() -> dict[str, Any]:
    return {
        "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": [A_IP]},
        "b.test": {"MX": [(10, "mx.b.test")]}, "mx.b.test": {"A": [B_IP]},
        HOME: {"MX": [(10, f"mx.{HOME}")]}, f"mx.{HOME}": {"A": [HOME_IP]},
    }


def sinks(peers: Any, script: Any = None) -> tuple[Any, Any, Any]:
    a = peers.call(start_sink(A_IP, 0, script=script))
    b = peers.call(start_sink(B_IP, a.port))
    home = peers.call(start_sink(HOME_IP, a.port))
    peers.sinks.extend([a, b, home])
    return a, b, home


def mail(port: int, domain: str, n: int, tag: str) -> list[str]:
    return send_many(port, [([f"u{i}@{domain}"], body(f"{tag}{i}")) for i in range(n)])


def test_suspend_holds_a_domain_while_others_flow_and_resume_releases(serve, peers, dns_zone):
    a, b, _ = sinks(peers)
    dns = dns_zone(zone())
    server = serve(relay_overrides(dns.port, a.port))
    reply = ctl_json(server, "suspend", "a.test", "--reason", "maintenance window")
    assert reply["suspension"]["domain"] == "a.test"
    mail(server.port, "a.test", 3, "held")
    mail(server.port, "b.test", 3, "flows")
    wait_until(lambda: len(b.messages) == 3, WAIT, "b.test delivered")
    assert a.messages == [] and a.connections == 0
    rows = {r["key"]: r for r in ctl_json(server, "queue")["rows"]}
    assert rows["a.test"]["state"] == "suspended" and rows["a.test"]["total"] == 3
    assert rows["a.test"]["reason"] == "maintenance window"
    assert {m["state"] for m in ctl_json(server, "list", "--domain", "a.test")["messages"]} == {"suspended"}
    (held,) = ctl_json(server, "status")["suspensions"]
    assert held["domain"] == "a.test"
    # Who: the kernel's word for the ctl process's user (SO_PEERCRED), as in the log.
    assert held["by"].startswith(pwd.getpwuid(os.getuid()).pw_name + " (pid ")
    assert server.wait_for(lambda e: e.get("event") == "control_command", WAIT)["peer"] == held["by"]

    resumed = ctl_json(server, "resume", "a.test")
    assert resumed["resumed"] is True and resumed["released"] == 3
    wait_until(lambda: len(a.messages) == 3, WAIT, "a.test delivered after resume")
    assert sorted(tag_of(m.data) for m in a.messages) == ["held0", "held1", "held2"]

    def samples() -> dict[str, float]:
        text = ctl(server, "metrics").stdout
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    wait_until(lambda: samples()["volley_messages_delivered_total"] == 6, WAIT, "six counted")
    seen = samples()
    assert seen["volley_queue_time_seconds_count"] == 6
    assert seen["volley_delivery_latency_seconds_count"] >= 2  # one per transaction
    assert seen["volley_connections_out_total"] >= 2


def test_a_suspension_survives_a_restart(serve, peers, dns_zone, tmp_path):
    a, b, _ = sinks(peers)
    dns = dns_zone(zone())
    first = serve(relay_overrides(dns.port, a.port))
    ctl(first, "suspend", "a.test", "--duration", "2h", "--reason", "blocklisted us")
    assert first.stop() == 0
    shared = {"queue": {"path": str(first.config_path.parent / "queue")}}
    second = serve({**relay_overrides(dns.port, a.port), **shared})
    mail(second.port, "a.test", 2, "held")
    mail(second.port, "b.test", 2, "flows")
    wait_until(lambda: len(b.messages) == 2, WAIT, "b.test delivered")
    assert a.messages == []
    (held,) = ctl_json(second, "status")["suspensions"]
    assert held["domain"] == "a.test" and held["reason"] == "blocklisted us"
    assert 7000 < held["until"] - time.time() <= 7200
    assert "blocklisted us" in ctl(second, "queue").stdout


def test_flush_cuts_a_deferral_short(serve, peers, dns_zone):
    accept = threading.Event()

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and not accept.is_set():
            return "451 4.3.0 try again later"
        return None

    a, _, _ = sinks(peers, script)
    dns = dns_zone(zone())
    server = serve(relay_overrides(dns.port, a.port, retry="1h"))
    (qid,) = mail(server.port, "a.test", 1, "late")

    def deferred() -> bool:
        msgs = ctl_json(server, "list", "--state", "deferred")["messages"]
        return [m["id"] for m in msgs] == [qid]

    wait_until(deferred, WAIT, "first attempt deferred")
    shown = ctl_json(server, "show", qid)["message"]["recipients"][0]
    assert shown["attempts"] == 1 and "451 4.3.0" in shown["last_reply"]
    assert shown["next_attempt"] > time.time() + 600  # the schedule says an hour
    accept.set()
    assert ctl_json(server, "flush", "--domain", "a.test")["messages"] == 1
    wait_until(lambda: len(a.messages) == 1, WAIT, "delivered after flush")


def test_bounce_by_filter_sends_dsns_to_the_senders(serve, peers, dns_zone):
    a, _, home = sinks(peers)
    dns = dns_zone(zone())
    server = serve(relay_overrides(dns.port, a.port))
    ctl(server, "suspend", "a.test")
    ids = mail(server.port, "a.test", 2, "doomed")
    dry = ctl_json(server, "bounce", "--domain", "a.test", "--dry-run")
    assert dry["matched"] == 2 and dry["done"] == 0
    done = ctl_json(server, "bounce", "--domain", "a.test", "--reason", "list cleaning")
    assert done["done"] == 2
    wait_until(lambda: len(home.messages) == 2, WAIT, "two DSNs delivered to the senders' MX")
    for dsn in home.messages:
        assert dsn.mail_from == "" and [rcpt_of(r) for r in dsn.rcpt_tos] == ["alice@home.test"]
        assert b"multipart/report" in dsn.data and b"5.0.0" in dsn.data
        assert b"list cleaning" in dsn.data
    assert a.messages == []
    listed = {m["id"] for m in ctl_json(server, "list")["messages"]}
    assert not listed & set(ids)
    # The supervisor queued those reports itself: they count like the workers' ones.
    assert samples(server)["volley_dsns_queued_total"] == len(home.messages) == 2


def test_throttle_and_mx(serve, peers, dns_zone):
    _, b, _ = sinks(peers)
    dns = dns_zone(zone())
    server = serve(relay_overrides(dns.port, b.port, max_connections_per_domain=10,
                                   max_connections=6))
    # Each of the 2 workers reports its share of delivery.max_connections.
    wait_until(lambda: [w["out_limit"] for w in ctl_json(server, "status")["workers"]] == [3, 3],
               WAIT, "each worker's outbound budget in status")
    t = ctl_json(server, "throttle", "b.test", "--max-connections", "1", "--rate", "600/m")
    assert t["throttle"] == {"domain": "b.test", "max_connections": 1, "rate": 10.0}
    for n in range(4):  # several connections, so both workers receive
        mail(server.port, "b.test", 3, f"t{n}-")
    wait_until(lambda: len(b.messages) == 12, WAIT, "throttled domain still delivered")
    assert b.max_live == 1
    assert ctl_json(server, "status")["throttles"][0]["domain"] == "b.test"

    entries = ctl_json(server, "mx", "b.test")["entries"]
    assert entries[0]["hosts"][0]["name"] == "mx.b.test"
    assert entries[0]["hosts"][0]["addresses"] == [B_IP]
    assert ctl_json(server, "mx", "--flush")["flushed"] >= 1
    assert ctl_json(server, "throttle", "b.test", "--clear")["throttle"] is None


def test_an_automatic_backoff_shows_with_the_reply_that_caused_it(serve, peers, dns_zone):
    def script(verb: str, arg: str) -> str | None:
        return "421 4.7.0 too many connections from you" if verb == "BANNER" else None

    a, _, _ = sinks(peers, script)
    dns = dns_zone(zone())
    server = serve(relay_overrides(dns.port, a.port, backoff="10m", backoff_max="1h"))
    mail(server.port, "a.test", 1, "backoff")

    def backing_off() -> list[dict[str, Any]]:
        return ctl_json(server, "status")["backoffs"]

    wait_until(lambda: bool(backing_off()), WAIT, "the destination backs off")
    (off,) = backing_off()
    assert "a.test" in off["domains"] and "421 4.7.0 too many connections" in off["reply"]
    assert off["until"] > time.time() + 300
    row = {r["key"]: r for r in ctl_json(server, "queue")["rows"]}["a.test"]
    assert row["state"] == "suspended" and row["by_who"] == "backoff"
    assert "421 4.7.0" in row["reason"]


def test_reload_over_the_socket(serve):
    server = serve()
    assert ctl_json(server, "reload") == {"ok": True, "config": str(server.config_path), "kept": []}
    server.wait_for(lambda e: e.get("event") == "reloaded", WAIT)
    server.config_path.write_text(server.config_path.read_text() + "\n[limits]\nbogus = 1\n")
    # (`volley ctl -c` would refuse the broken file itself: ask on the raw socket)
    refused = ask(server.config_path.parent / "volley.sock", {"cmd": "reload"})
    assert refused["ok"] is False and refused["error"].startswith(
        "reload refused, the configuration in force stays: ") and "limits.bogus" in refused["error"]
    assert "limits.bogus" in server.wait_for(lambda e: e.get("event") == "reload_refused", WAIT)["error"]
