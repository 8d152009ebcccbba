"""Shared pieces of the fleet tests: links to the test's Redis (in-process), one
provider behind sinks that count the sessions open at once (independently of any node),
mail sent to a chosen node, and what a node says about itself (status, metrics, logs)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cluster.link import ClusterLink
from engine.config.cluster import ClusterConfig
from engine.lab.loop_thread import LoopThread
from engine.lab.sink.protocol import Sink, start_sink, start_sinks
from engine.lab.sink.state import Faults
from tests.integration import test_reactions_serve as reactions_serve
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import ServeProcess, wait_until
from tests.integration.relay_helpers import HOME_IP, SENDER, body, tag_of, transact
from tests.integration.smtp_client import RawSmtp
from tests.integration.test_pool import free_port
from tests.integration.test_shaping_serve import DOMAINS, IPS, zone

if TYPE_CHECKING:
    from tests.cluster.conftest import RedisServer

CAP = 4
WAIT = 120.0  # seconds: a generous bound for a fleet of `volley serve` on a loaded machine
HONOURED = 10.0  # seconds: a change is promised "within a second"; this bound is for a loaded machine


# --- links in the test's own process ------------------------------------------------------
def config(url: str, name: str, **kw: Any) -> ClusterConfig:
    """A link's config with a fast heartbeat and short TTL and timeout (tests of the
    link itself: changes show within a second)."""
    base: dict[str, Any] = {"redis": url, "node_name": name, "key_prefix": "t:",
                            "heartbeat": 0.1, "lease_ttl": 1.0, "timeout": 0.3}
    return ClusterConfig(**{**base, **kw})


@contextlib.asynccontextmanager
async def started_links(url: str, names: str, **kw: Any) -> AsyncIterator[list[ClusterLink]]:
    """A started link per name (one letter each), stopped at the end however the test ends."""
    links: list[ClusterLink] = []
    try:
        for name in names:
            link = ClusterLink(config(url, name, **kw))
            await link.start()
            links.append(link)
        yield links
    finally:
        for link in links:
            await link.stop()


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def leases_in_redis(server: RedisServer, key: str, prefix: str = "t:") -> dict[str, int]:
    """node → leases of cap `key`, from the sorted set itself (expired ones dropped as
    Redis's own clock sees it)."""
    with server.client() as c:
        now = c.time()
        members = c.zrangebyscore(f"{prefix}cap:{key}:leases", now[0] + now[1] / 1e6, "+inf")
    out: dict[str, int] = {}
    for m in members:
        node = m.decode().rsplit(":", 1)[0]
        out[node] = out.get(node, 0) + 1
    return out


# --- providers -------------------------------------------------------------------------------
class Sessions:
    """Sink script counting sessions open at once, from the banner to QUIT, over all the
    provider's sinks: what the provider sees. A connection dropped without QUIT is not
    seen here and stays counted; `Sink.max_live` counts every close."""

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


def reaction_provider(peers: LoopThread, dns_zone: Any,
                      provider: reactions_serve.Provider) -> tuple[Sink, dict[str, Any]]:
    """The provider of the reaction tests (tests/integration/test_reactions_serve.py)
    answering as `provider` scripts it, and the home domain's sink: the provider's sink
    and the relay overrides that reach them."""
    port = free_port(reactions_serve.IPS[0])
    sink = peers.call(start_sinks([(ip, port) for ip in reactions_serve.IPS], script=provider.script))
    home = peers.call(start_sinks([(HOME_IP, port)]))
    peers.sinks.extend([sink, home])  # type: ignore[attr-defined]
    dns = dns_zone(reactions_serve.zone())
    return sink, relay_overrides(dns.port, port)


def one_sink(peers: LoopThread, dns_zone: Any, domain: str) -> tuple[Sink, dict[str, Any]]:
    """A plain sink on 127.0.0.2 as `domain`'s MX, and the relay overrides that reach it."""
    sink = peers.call(start_sink("127.0.0.2", 0))
    peers.sinks.append(sink)  # type: ignore[attr-defined]
    dns = dns_zone({domain: {"MX": [(10, f"mx.{domain}")]}, f"mx.{domain}": {"A": ["127.0.0.2"]}})
    return sink, relay_overrides(dns.port, sink.port)


# --- talking to a node --------------------------------------------------------------------
@contextlib.contextmanager
def smtp(node: ServeProcess, timeout: float = 10) -> Iterator[RawSmtp]:
    """An SMTP session with `node` on its own loopback address, past EHLO."""
    host, port = node.listeners[0].rsplit(":", 1)
    with RawSmtp(host, int(port), timeout=timeout) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        yield client


def send_to(node: ServeProcess, tags: list[str]) -> None:
    """One message per tag to a provider's domain, over one connection to `node`."""
    with smtp(node, timeout=30) as client:
        for n, tag in enumerate(tags):
            transact(client, SENDER, [f"u{n}@{DOMAINS[n % len(DOMAINS)]}"], body(tag))
        client.cmd("QUIT")


def send_each(fleet: list[ServeProcess], prefix: str, n: int) -> None:
    """`n` messages to each node at once, tagged PREFIX{node index}-{k}."""
    threads = [threading.Thread(target=send_to, args=(node, [f"{prefix}{i}-{k}" for k in range(n)]))
               for i, node in enumerate(fleet)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)


def rcpt(node: ServeProcess, address: str) -> tuple[int, str]:
    """The node's reply to RCPT TO:<address>."""
    with smtp(node) as client:
        assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        reply: tuple[int, str] = client.cmd(f"RCPT TO:<{address}>")
        client.cmd("QUIT")
        return reply


def sock(node: ServeProcess) -> Path:
    return node.config_path.parent / "volley.sock"


def cluster_of(node: ServeProcess) -> dict[str, Any]:
    status = ctl_json(node, "status")
    assert status.get("cluster"), status
    return dict(status["cluster"])


def wait_live(fleet: list[ServeProcess], n: int) -> None:
    """Until every node of `fleet` counts `n` live nodes."""
    wait_until(lambda: all(cluster_of(node)["live_nodes"] == n for node in fleet), WAIT, f"{n} live nodes")


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
