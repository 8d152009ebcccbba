"""[[reactions]] in a real `volley serve` with two workers, against sinks that play a
provider (its domains' MX hosts end in .provider.test; both workers own some).

- suspend: the sink answers RCPT with Yahoo's "421 4.7.0 [TSS04] ..."; the reaction
  fires once, then neither worker opens a connection or starts a transaction to the
  provider (the sink counts both) while more mail for it is deferred; `ctl status`
  shows the reaction with the reply; `ctl resume yahoo` lifts it and the mail flows.
  A short suspension ends by itself.
- bounce: a matching 4xx on RCPT bounces that recipient at once (DSN, delivery log
  outcome "bounced" with the remote text); the other recipient is delivered.
- halve_rate: after one "451 4.7.0 slow down" the provider's 20/s is 10/s: the
  arrivals after it never exceed 10/s (an upper bound only; never a speed test).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from engine.lab.sink.protocol import start_sinks
from engine.queue.layout import stable_shard
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import (
    HOME,
    HOME_IP,
    SENDER,
    body,
    check_dsn,
    dsns,
    send_many,
)
from tests.integration.test_pool import free_port
from tests.unit.test_shared_limits import most_in_window

IPS = ("127.0.0.2", "127.0.0.3")
DOMAINS = [f"d{i}.test" for i in range(6)]
TSS04 = "421 4.7.0 [TSS04] Messages temporarily deferred"
WAIT = 60.0
SHAPING = [{"name": "yahoo", "mx_suffix": ".provider.test"}]


class Provider:
    """Sink script (on the peers' loop thread; read under the lock): counts sessions
    and transactions, answers RCPT as `rcpt(address)` says."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sessions = 0
        self.transactions = 0
        self.tss = True  # answer every RCPT with TSS04
        self.refuse: dict[str, str] = {}  # address → RCPT reply
        self.arrived: list[float] = []

    def script(self, verb: str, arg: str) -> str | None:
        with self.lock:
            if verb == "BANNER":
                self.sessions += 1
            elif verb == "MAIL":
                self.transactions += 1
            elif verb == "RCPT":
                if self.tss:
                    return TSS04
                for address, reply in list(self.refuse.items()):
                    if address in arg.lower():
                        return reply
            elif verb == ".":
                self.arrived.append(time.monotonic())
        return None

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.sessions, self.transactions


def zone() -> dict[str, Any]:
    z: dict[str, Any] = {HOME: {"MX": [(10, f"mx.{HOME}")]}, f"mx.{HOME}": {"A": [HOME_IP]}}
    for i, domain in enumerate(DOMAINS):
        z[domain] = {"MX": [(10, f"mx{i % 2}.provider.test")]}
    for i, ip in enumerate(IPS):
        z[f"mx{i}.provider.test"] = {"A": [ip]}
    return z


def start(serve: Any, peers: Any, dns_zone: Any, reactions: list[dict[str, Any]],
          shaping: list[dict[str, Any]] = SHAPING) -> tuple[Any, Provider, Any, Any]:
    assert {stable_shard(d, 2) for d in DOMAINS} == {0, 1}  # both workers own some
    provider = Provider()
    port = free_port(IPS[0])
    sink = peers.call(start_sinks([(ip, port) for ip in IPS], script=provider.script))
    home = peers.call(start_sinks([(HOME_IP, port)]))
    peers.sinks.extend([sink, home])
    dns = dns_zone(zone())
    server = serve({**relay_overrides(dns.port, port),
                    "shaping": shaping, "reactions": reactions})
    return server, provider, sink, home


def outcomes(server: Any) -> list[dict[str, Any]]:
    path = Path(server.config_path).parent / "delivery.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def deferred(server: Any, text: str) -> set[str]:
    return {r["recipient"] for r in outcomes(server)
            if r["outcome"] == "deferred" and text in r["reply"]}


def test_suspend_holds_every_worker_until_resumed(serve, peers, dns_zone):
    server, provider, sink, _home = start(serve, peers, dns_zone, [
        {"shaping": "yahoo", "text": r"\[TSS04\]", "action": "suspend", "duration": "1h"}])
    first = [f"u{n}@{d}" for n, d in enumerate(DOMAINS)]
    send_many(server.port, [([r], body(r)) for r in first])
    fired = server.wait_for(lambda e: e.get("event") == "reaction_fired", WAIT)
    assert fired["provider"] == "yahoo" and fired["action"] == "suspend"
    assert fired["reply"] == TSS04
    # Every first message is deferred: by the 421 itself or held by the suspension.
    wait_until(lambda: {r["recipient"] for r in outcomes(server)
                        if r["outcome"] == "deferred"} >= set(first), WAIT, "all deferred")
    before = provider.counts()
    assert before[0] >= 1 and before[1] >= 1

    # More mail for the provider, both workers: held at once, nothing sent.
    second = [f"v{n}@{d}" for n, d in enumerate(DOMAINS)]
    send_many(server.port, [([r], body(r)) for r in second])
    wait_until(lambda: deferred(server, "suspended by a reaction") >= set(second), WAIT,
               "the second batch held")
    assert provider.counts() == before  # no connection, no transaction: either worker
    assert sum(1 for e in server.log if e.get("event") == "reaction_fired") == 1

    status = ctl_json(server, "status")
    [row] = status["reactions"]
    assert row["provider"] == "yahoo" and row["action"] == "suspend" and row["reply"] == TSS04
    assert row["until"] > time.time() + 3000
    text = ctl(server, "status").stdout
    assert "reactions:" in text and "yahoo" in text and "[TSS04]" in text

    with provider.lock:
        provider.tss = False
    out = ctl(server, "resume", "yahoo").stdout
    assert "lifted suspend of yahoo" in out, out
    wait_until(lambda: len(sink.messages) == len(first) + len(second), WAIT, "all delivered")
    assert ctl_json(server, "status")["reactions"] == []
    again = ctl(server, "resume", "yahoo").stdout
    assert "nothing to resume" in again


def test_a_suspension_ends_by_itself(serve, peers, dns_zone):
    server, provider, sink, _home = start(serve, peers, dns_zone, [
        {"shaping": "any", "code": "421", "enhanced": "4.7.0", "action": "suspend",
         "duration": "2s"}])
    send_many(server.port, [(["a@d0.test"], body("a"))])
    server.wait_for(lambda e: e.get("event") == "reaction_fired", WAIT)
    with provider.lock:
        provider.tss = False
    wait_until(lambda: len(sink.messages) == 1, WAIT, "delivered after the suspension")
    wait_until(lambda: ctl_json(server, "status")["reactions"] == [], WAIT, "the row gone")


def test_bounce_turns_the_matching_recipient_into_a_bounce(serve, peers, dns_zone):
    server, provider, sink, home = start(serve, peers, dns_zone, [
        {"shaping": "yahoo", "code": "452", "text": "mailbox busy", "action": "bounce"}])
    with provider.lock:
        provider.tss = False
        provider.refuse["busy@d1.test"] = "452 4.2.1 mailbox busy, try later"
    send_many(server.port, [(["busy@d1.test", "fine@d1.test"], body("b"))])
    wait_until(lambda: len(sink.messages) == 1, WAIT, "the other recipient delivered")
    wait_until(lambda: any(r["recipient"] == "busy@d1.test" for r in outcomes(server)),
               WAIT, "the busy recipient's outcome")
    [line] = [r for r in outcomes(server) if r["recipient"] == "busy@d1.test"]
    assert line["outcome"] == "bounced" and line["code"] == 550 and line["enhanced"] == "5.2.1"
    assert line["reply"] == "mailbox busy, try later"
    wait_until(lambda: len(dsns(home)) == 1, WAIT, "the DSN")
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["busy@d1.test"], status="5.2.1")
    assert "mailbox busy, try later" in dsn.diagnostics[0]


def test_halve_rate_lowers_the_providers_rate(serve, peers, dns_zone):
    server, provider, sink, _home = start(
        serve, peers, dns_zone,
        [{"shaping": "yahoo", "code": "451", "text": "slow down", "action": "halve_rate",
          "duration": "1h"}],
        shaping=[{**SHAPING[0], "rate": "20/s"}])
    with provider.lock:
        provider.tss = False
        provider.refuse["first@d0.test"] = "451 4.7.0 slow down"
    send_many(server.port, [(["first@d0.test"], body("first"))])
    fired = server.wait_for(lambda e: e.get("event") == "reaction_fired", WAIT)
    assert fired["action"] == "halve_rate" and fired["factor"] == 0.5
    n = 40
    send_many(server.port, [([f"m{k}@{DOMAINS[k % len(DOMAINS)]}"], body(f"m{k}"))
                            for k in range(n)])
    wait_until(lambda: len(sink.messages) >= n, WAIT, f"{n} messages")
    with provider.lock:
        arrived = sorted(provider.arrived)
    for window in (1.0, 2.0):  # 10/s (burst 1) plus one message of jitter
        assert most_in_window(arrived, window) <= 10 * window + 2, window
    [row] = ctl_json(server, "status")["reactions"]
    assert row["action"] == "halve_rate" and row["factor"] == 0.5
    assert "slow down" in row["reply"]
