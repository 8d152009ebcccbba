"""End to end through the worker runtime: SMTP in → LMDB → MX via a loopback DNS
server → a sink on 127.0.0.2. The detailed relay cases live in test_relay*.py."""

from __future__ import annotations

import smtplib

from engine.lab.sink.protocol import start_sink
from tests.integration.harness import wait_until


def test_message_relayed_via_mx(inbound, peers, dns_zone):
    dns = dns_zone({
        "example.test": {"MX": [(10, "mx1.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
    })
    sink = peers.call(start_sink("127.0.0.2", 0))
    peers.sinks.append(sink)
    server = inbound({
        "dns": {"nameservers": [f"127.0.0.1:{dns.port}"]},
        "delivery": {"enabled": True, "port": sink.port, "poll_interval": "50ms"},
    })
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("a@sender.test", ["b@example.test"], b"Subject: hi\r\n\r\nbody\r\n")
    peers.call(sink.wait_for(1, timeout=20), timeout=25)
    assert sink.messages[0].rcpt_tos == ["b@example.test"]
    assert sink.messages[0].data.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    wait_until(lambda: server.queued() == 0, 20, "queue empty after delivery")
