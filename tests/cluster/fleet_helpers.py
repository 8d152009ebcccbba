"""Shared pieces of the fleet tests: one provider behind three sinks that count the
sessions open at once (independently of any node), mail sent to a chosen node, and
what a node says about itself (ctl status, ctl metrics)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from typing import Any

from engine.lab.loop_thread import LoopThread
from engine.lab.sink.protocol import Sink, start_sinks
from engine.lab.sink.state import Faults
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import ServeProcess
from tests.integration.relay_helpers import SENDER, body, tag_of, transact
from tests.integration.smtp_client import RawSmtp
from tests.integration.test_pool import free_port
from tests.integration.test_shaping_serve import DOMAINS, IPS, zone

CAP = 4


class Sessions:
    """Sink script counting sessions open at once, from the banner to the end of the
    connection (QUIT or a drop), over all the provider's sinks: what the provider sees."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.arrived: list[float] = []  # time.monotonic() of each message's end of data

    def script(self, verb: str, arg: str) -> None:
        with self.lock:
            if verb == "BANNER":
                self.active += 1
                self.peak = max(self.peak, self.active)
            elif verb == "QUIT":
                self.active -= 1
            elif verb == ".":
                self.arrived.append(time.monotonic())
        return None

    def new_phase(self) -> None:
        """Count the peak from now on (sessions open now count)."""
        with self.lock:
            self.peak = self.active


class Provider:
    """The shaped provider's three sinks (127.0.0.2-4, one port), slow enough (a
    latency per transaction) that each node keeps its connections busy."""

    def __init__(self, peers: LoopThread, dns_zone: Any, latency: float = 0.05) -> None:
        self.seen = Sessions()
        self.port = free_port(IPS[0])
        self.sink: Sink = peers.call(start_sinks([(ip, self.port) for ip in IPS],
                                                 script=self.seen.script,
                                                 faults=Faults(latency=latency)))
        peers.sinks.append(self.sink)  # type: ignore[attr-defined]
        self.dns = dns_zone(zone())

    def overrides(self, **rule: Any) -> dict[str, Any]:
        shaping = {"name": "provider", "mx_suffix": ".provider.test", "max_connections": CAP,
                   "idle_timeout": "1s", **rule}
        return {**relay_overrides(self.dns.port, self.port), "shaping": [shaping]}

    def tags(self) -> Counter[str]:
        """X-Test-Id of every message the sinks accepted (a duplicate counts twice)."""
        return Counter(tag_of(m.data) or "" for m in list(self.sink.messages))


def send_to(node: ServeProcess, tags: list[str]) -> None:
    """One message per tag to a provider's domain, over one connection to `node`."""
    host, port = node.listeners[0].rsplit(":", 1)
    with RawSmtp(host, int(port), timeout=30) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        for n, tag in enumerate(tags):
            transact(client, SENDER, [f"u{n}@{DOMAINS[n % len(DOMAINS)]}"], body(tag))
        client.cmd("QUIT")


def cluster_of(node: ServeProcess) -> dict[str, Any]:
    status = ctl_json(node, "status")
    assert status.get("cluster"), status
    return dict(status["cluster"])


def provider_row(node: ServeProcess) -> dict[str, Any]:
    rows = [r for r in cluster_of(node)["limits"] if r["key"] == "provider"]
    assert len(rows) == 1, rows
    return dict(rows[0])


def events(node: ServeProcess, name: str) -> int:
    """How many log events `name` the node has written so far (what is in its pipe now
    is read first)."""
    while not node.lines.empty():
        node.log.append(node.lines.get_nowait())
    return sum(1 for e in node.log if e.get("event") == name)


def metric(node: ServeProcess, name: str) -> float | None:
    """A sample without labels from `volley ctl metrics` (None when absent)."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", ctl(node, "metrics").stdout, re.M)
    return float(m.group(1)) if m else None
