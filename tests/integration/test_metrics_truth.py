"""Figures of a real `volley serve` checked against counts kept outside the server:
the client's own replies (refused transactions), the sink's arrivals (DSNs) and the
messages the client had accepted (the rates of `ctl status`).

Issue 14: volley_transactions_rejected_total and volley_dsns_queued_total stayed 0, and
the status rates read 0 (or one average since start) whatever had happened."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.lab.sink.protocol import start_sink
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import HOME, HOME_IP, SENDER, body, send_many
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
