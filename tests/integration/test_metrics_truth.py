"""Figures of a real `volley serve` checked against counts kept outside the server:
the client's own replies (refused transactions), the sink's arrivals (DSNs) and the
messages the client had accepted (the rates of `ctl status`).

Issue 14: volley_transactions_rejected_total and volley_dsns_queued_total stayed 0, and
the status rates read 0 (or one average since start) whatever had happened."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.lab.sink.protocol import start_sink
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import HOME, HOME_IP, SENDER, Counter, body, send_many
from tests.integration.smtp_raw import RawClient

A_IP = "127.0.0.2"
WAIT = 40.0


def samples(server: Any) -> dict[str, float]:
    """Every unlabelled sample of the server's /metrics text (as `ctl metrics` prints it)."""
    text = ctl(server, "metrics").stdout
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


def refused_transactions(port: int) -> int:
    """Refusals of MAIL, RCPT, DATA and of a message at its end, as the client sees them:
    the count of 4xx/5xx replies it got to those, plus one message that is accepted."""
    refused = 0
    with RawClient(port) as c:
        c.ehlo()
        # MAIL with a declared size over limits.max_message_size (RFC 1870 §6).
        refused += c.cmd(f"MAIL FROM:<{SENDER}> SIZE=999999999999", enhanced=False).code >= 400
        # RCPT of a bare postmaster nobody configured, then DATA with no recipient.
        assert c.cmd(f"MAIL FROM:<{SENDER}>", enhanced=False).code == 250
        refused += c.cmd("RCPT TO:<postmaster>", enhanced=False).code >= 400
        refused += c.cmd("DATA", enhanced=False).code >= 400
        assert c.cmd("RSET", enhanced=False).code == 250
        # A message over the size limit, refused at its end.
        assert c.cmd(f"MAIL FROM:<{SENDER}>", enhanced=False).code == 250
        assert c.cmd("RCPT TO:<u@a.test>", enhanced=False).code == 250
        assert c.cmd("DATA", enhanced=False).code == 354
        c.send(b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 998 + b"\r\n") * 40 + b".\r\n")
        refused += c.reply(enhanced=False).code >= 400
        # And one accepted, which must not count.
        assert c.cmd(f"MAIL FROM:<{SENDER}>", enhanced=False).code == 250
        assert c.cmd("RCPT TO:<u@a.test>", enhanced=False).code == 250
        assert c.cmd("DATA", enhanced=False).code == 354
        c.send(body("fine") + b".\r\n")
        assert c.reply(enhanced=False).code == 250
        c.cmd("QUIT", enhanced=False)
    return refused


def test_refused_transactions_are_counted_as_the_client_saw_them(serve):
    server = serve({"limits": {"max_message_size": "32KiB"}})
    refused = refused_transactions(server.port)
    assert refused == 4  # the client's own count: every step above was refused

    def counted() -> tuple[float, float]:
        seen = samples(server)
        return seen["volley_transactions_rejected_total"], seen["volley_messages_received_total"]

    wait_until(lambda: counted()[1] == 1, WAIT, "the accepted message counted")
    wait_until(lambda: counted() == (refused, 1), WAIT,
               f"{refused} refusals counted (got {counted()[0]})")


def test_queued_dsns_are_counted_as_the_sender_domain_receives_them(serve, peers, dns_zone):
    def script(verb: str, arg: str) -> str | None:
        return "550 5.1.1 no such user" if verb == "RCPT" else None

    a = peers.call(start_sink(A_IP, 0, script=script))
    home = peers.call(start_sink(HOME_IP, a.port))
    peers.sinks.extend([a, home])
    dns = dns_zone({
        "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": [A_IP]},
        HOME: {"MX": [(10, f"mx.{HOME}")]}, f"mx.{HOME}": {"A": [HOME_IP]},
    })
    server = serve(relay_overrides(dns.port, a.port))
    send_many(server.port, [([f"u{i}@a.test"], body(f"doomed{i}")) for i in range(3)])

    def reports() -> int:  # the sink's own count: null-sender reports that arrived
        return sum(1 for m in home.messages if m.mail_from == "")

    wait_until(lambda: reports() == 3, WAIT, "three failure reports at the sender's domain")
    wait_until(lambda: samples(server)["volley_messages_bounced_total"] == 3, WAIT, "bounces")
    wait_until(lambda: samples(server)["volley_dsns_queued_total"] == reports(), WAIT,
               "every report counted as queued")


def test_status_rates_cover_what_arrived_and_say_how_much_history_they_have(serve):
    server = serve()
    sent = send_many(server.port, [(["a@one.test"], body(f"r{i}")) for i in range(40)])
    assert len(sent) == 40  # the client's count of 250s

    def received_in(window: str) -> float:
        rates = ctl_json(server, "status")["rates"][window]
        # rate x the seconds it covers = the messages received in them
        return rates["received"] * rates["seconds"]

    # The server is younger than every window: each covers all its life, so each holds
    # all 40 (before, a burst before the first sample read 0 for ever).
    for window in ("1m", "5m", "15m"):
        wait_until(lambda w=window: received_in(w) == pytest.approx(40, abs=0.01), WAIT,  # type: ignore[misc]
                   f"{window} rate covers the 40 messages")
    human = ctl(server, "status").stdout
    assert "s of data)" in human, human


def test_inbound_figures_and_supervisor_gauges_match_the_clients_and_the_queue(serve):
    started = time.monotonic()
    server = serve()
    clients = [RawClient(server.port) for _ in range(3)]  # 3 connections, held open
    try:
        for c in clients:
            c.ehlo()
        ids = send_many(server.port, [(["a@one.test", "b@two.test"], body("two units")),
                                      (["c@one.test"], body("one unit"))])
        connections = len(clients) + 1  # send_many's own connection
        listed = ctl_json(server, "list")["messages"]
        assert sorted(m["id"] for m in listed) == sorted(ids)
        stored_bytes = sum(m["size"] for m in listed)  # the queue's records
        units = sum(len(m["domains"]) for m in listed)
        assert units == 3
        for domain in ("one.test", "two.test"):
            ctl(server, "suspend", domain)

        def figures() -> dict[str, float]:
            seen = samples(server)
            return {k: seen[k] for k in (
                "volley_sessions_in", "volley_connections_in_total", "volley_received_bytes_total",
                "volley_queue_messages", "volley_queue_units", "volley_domains_suspended",
                "volley_workers")}

        want = {"volley_sessions_in": len(clients), "volley_connections_in_total": connections,
                "volley_received_bytes_total": stored_bytes, "volley_queue_messages": 2,
                "volley_queue_units": units, "volley_domains_suspended": 2, "volley_workers": 2}
        wait_until(lambda: figures() == want, WAIT, f"figures {want}")
        seen = samples(server)
        # LMDB pages hold the queued bytes: never fewer than the records say.
        assert seen["volley_queue_bytes"] >= stored_bytes > 0
        # The supervisor's age: within the time this test has watched it.
        assert 0 < seen["volley_uptime_seconds"] <= time.monotonic() - started
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: samples(server)["volley_sessions_in"] == 0, WAIT, "sessions closed")

    # A killed worker is restarted: one restart, as many workers as before.
    os.kill(server.worker_pids[0], signal.SIGKILL)
    server.wait_for(lambda e: e.get("event") == "worker_restarted", WAIT)
    wait_until(lambda: (samples(server)["volley_worker_restarts_total"],
                        samples(server)["volley_workers"]) == (1, 2), WAIT, "one restart")


def test_delivery_counters_match_the_sink_and_the_dns_server(serve, peers, dns_zone):
    later = Counter()  # the 451s the sink gave
    hold = threading.Event()

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and "later@" in arg:
            later.bump("451")
            return "451 4.3.0 try again later"
        if verb == "RCPT" and "held@" in arg:
            hold.wait(WAIT)  # keeps this one session open while the test looks
        return None

    a = peers.call(start_sink(A_IP, 0, script=script))
    peers.sinks.append(a)
    dns = dns_zone({"a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": [A_IP]}})
    server = serve(relay_overrides(dns.port, a.port, retry="1h"))
    for i in range(2):  # one after the other: the second route comes from the cache
        send_many(server.port, [([f"ok{i}@a.test"], body(f"ok{i}"))])
        wait_until(lambda i=i: len(a.messages) == i + 1, WAIT, f"ok{i} delivered")  # type: ignore[misc]
    send_many(server.port, [(["later@a.test"], body("later"))])
    wait_until(lambda: later.counts.get("451") == 1, WAIT, "later deferred")

    def delivery() -> dict[str, float]:
        seen = samples(server)
        return {k: seen[k] for k in (
            "volley_messages_delivered_total", "volley_messages_deferred_total",
            "volley_sent_bytes_total", "volley_connections_out_total", "volley_dns_lookups_total")}

    def truth() -> dict[str, float]:
        return {"volley_messages_delivered_total": len(a.messages),
                "volley_messages_deferred_total": later.counts.get("451", 0),
                "volley_sent_bytes_total": sum(len(m.data) for m in a.messages),
                "volley_connections_out_total": a.connections,
                # every miss asked the DNS server: a.test's MX and mx.a.test's address
                "volley_dns_lookups_total": dns.count("a.test", "MX") + dns.count("mx.a.test", "A")}

    wait_until(lambda: delivery() == truth(), WAIT, f"delivery figures {truth()}")

    # A plan is memoised for a second (engine/delivery/planner.py) without asking the
    # cache; a message after that is routed from the cache: keep delivering until one is.
    def one_more() -> bool:
        n = len(a.messages)
        send_many(server.port, [([f"more{n}@a.test"], body(f"more{n}"))])
        wait_until(lambda: len(a.messages) == n + 1, WAIT, f"more{n} delivered")
        return samples(server)["volley_dns_cache_hits_total"] >= 2  # the MX and the address

    wait_until(one_more, WAIT, "a route answered from the DNS cache")
    # ... and it was: the DNS server was asked once for each, ever, by each worker that
    # delivered (every worker delivers a share of a domain, queue format 4; each has its
    # own cache).
    assert 1 <= dns.count("a.test", "MX") <= 2 and 1 <= dns.count("mx.a.test", "A") <= 2
    delivered = len(a.messages)

    # One session held open by the sink: the server says one session out.
    send_many(server.port, [(["held@a.test"], body("held"))])
    try:
        wait_until(lambda: len(a.live) >= 1 and samples(server)["volley_sessions_out"] == len(a.live),
                   WAIT, "the held session counted")
        # ... and one unit in flight: the held message's, every other outcome committed.
        wait_until(lambda: sum(w["inflight"] for w in ctl_json(server, "status")["workers"]) == 1,
                   WAIT, "the held message's unit in flight")
    finally:
        hold.set()
    wait_until(lambda: len(a.messages) == delivered + 1, WAIT, "held delivered")


def test_expired_recipients_are_counted_as_their_reports_arrive(serve, peers, dns_zone):
    tries = Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT":
            tries.bump("451")
            return "451 4.3.0 try again later"
        return None

    a = peers.call(start_sink(A_IP, 0, script=script))
    home = peers.call(start_sink(HOME_IP, a.port))
    peers.sinks.extend([a, home])
    dns = dns_zone({
        "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": [A_IP]},
        HOME: {"MX": [(10, f"mx.{HOME}")]}, f"mx.{HOME}": {"A": [HOME_IP]},
    })
    server = serve(relay_overrides(dns.port, a.port, max_age="2s"))
    send_many(server.port, [([f"u{i}@a.test"], body(f"late{i}")) for i in range(2)])
    wait_until(lambda: sum(1 for m in home.messages if m.mail_from == "") == 2, WAIT,
               "two expiry reports")

    def figures() -> tuple[float, ...]:
        seen = samples(server)
        return (seen["volley_messages_expired_total"], seen["volley_messages_bounced_total"],
                seen["volley_dsns_queued_total"], seen["volley_messages_deferred_total"])

    def settled() -> bool:
        seen, tried = figures(), tries.counts.get("451", 0)
        # Every try the sink refused is a deferral, except one whose outcome came at or
        # past max_age: that try is its message's expiry (outcome.py), at most one each.
        return seen[:3] == (2, 2, 2) and tried - 2 <= seen[3] <= tried

    try:
        wait_until(settled, WAIT, "two expiries, each try a deferral or its message's expiry")
    except TimeoutError as err:
        raise AssertionError(f"{err}: (expired, bounced, dsns, deferred) {figures()}, "
                             f"{tries.counts.get('451', 0)} tries") from err
