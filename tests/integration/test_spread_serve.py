"""One hot domain across workers (queue layout format 4): a real `volley serve` with two
workers relaying mail for a single domain. Both workers deliver a share of it (each
worker's own counter of sent messages, from `volley ctl status`, checked against the
sink's count), the sink never sees more sessions from Volley at once than the
domain's cap (1 and 3: the cap holds for both workers together, site_slots.py), and
no message is lost or delivered twice. `volley ctl mx` finds a domain in whichever
worker's MX cache holds it.

The sink counts sessions from the banner to QUIT, the span in which the sending worker
holds its count in the shared table (as tests/integration/test_shaping_serve.py does).
No bound on time is asserted."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from engine.lab.sink.protocol import start_sinks
from engine.queue.ids import id_bytes
from engine.queue.layout import owner_of, stable_shard
from tests.integration.control_helpers import ctl_json, relay_overrides
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import body, send_many, tag_of
from tests.integration.test_pool import free_port

HOT, MX_IP = "hot.test", "127.0.0.2"
N = 120
WAIT = 90.0


class Sessions:
    """Sink script (runs on the peers loop thread; read under the lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.sessions = 0

    def script(self, verb: str, arg: str) -> None:
        with self.lock:
            if verb == "BANNER":
                self.active += 1
                self.sessions += 1
                self.peak = max(self.peak, self.active)
            elif verb == "QUIT":
                self.active -= 1
        return None


def sent_by_worker(server: Any) -> Counter[int]:
    """Each worker's own count of messages its pools delivered to the hot domain."""
    sent: Counter[int] = Counter()
    for row in ctl_json(server, "status")["pools"]:
        if HOT in row["domains"]:
            sent[int(row["worker"])] += int(row["sent"])
    return sent


@pytest.mark.parametrize("cap", [1, 3])
def test_one_domain_is_shared_by_both_workers_within_its_cap(serve, peers, dns_zone, cap):
    seen = Sessions()
    port = free_port(MX_IP)
    sink = peers.call(start_sinks([(MX_IP, port)], script=seen.script))
    peers.sinks.append(sink)
    dns = dns_zone({HOT: {"MX": [(10, f"mx.{HOT}")]}, f"mx.{HOT}": {"A": [MX_IP]}})
    # A long idle timeout keeps each worker's pool (and its counter) until it is read.
    server = serve(relay_overrides(dns.port, port, max_connections_per_domain=cap,
                                   idle_timeout="60s", max_messages_per_connection=20))
    tags = [f"hot-{cap}-{n}" for n in range(N)]
    for start in range(0, N, 20):  # several connections: both workers receive some
        send_many(server.port, [([f"u{n}@{HOT}"], body(tags[n])) for n in range(start, start + 20)])

    wait_until(lambda: len(sink.messages) >= N, WAIT, f"{N} messages at the sink")
    wait_until(lambda: sum(sent_by_worker(server).values()) == N, WAIT,
               "the workers' counters reach the sink's count")
    copies = Counter(tag_of(m.data) for m in sink.messages)
    assert set(copies) == set(tags) and len(sink.messages) == N, copies.most_common(3)
    split = sent_by_worker(server)
    assert sum(split.values()) == len(sink.messages)
    assert set(split) == {0, 1}, split  # both workers delivered
    assert all(0.4 * N <= n <= 0.6 * N for n in split.values()), split  # within 60/40
    with seen.lock:
        peak, sessions = seen.peak, seen.sessions
    print(f"cap {cap}: peak {peak} sessions at once, {sessions} sessions, split {dict(split)}")
    assert 1 <= peak <= cap, peak  # both workers together
    assert sessions >= 2  # each worker had its own connection at some point
    wait_until(lambda: ctl_json(server, "list")["messages"] == [], WAIT,
               "the queue empty: every message's outcome committed")


def test_ctl_mx_finds_a_domain_cached_by_any_worker(serve, peers, dns_zone):
    """A domain's single message is resolved by its owner worker alone, which may not be
    the domain's home worker (`stable_shard`): `volley ctl mx` asks every worker."""
    port = free_port(MX_IP)
    sink = peers.call(start_sinks([(MX_IP, port)]))
    peers.sinks.append(sink)
    solos = [f"solo{i}.test" for i in range(8)]
    zone: dict[str, Any] = {f"mx.{HOT}": {"A": [MX_IP]}}
    zone.update({d: {"MX": [(10, f"mx.{HOT}")]} for d in solos})
    dns = dns_zone(zone)
    server = serve(relay_overrides(dns.port, port, idle_timeout="60s"))
    away = 0  # solo domains whose owner is not their home worker
    for n, d in enumerate(solos):
        (qid,) = send_many(server.port, [([f"u@{d}"], body(f"solo-{n}"))])
        away += owner_of(d, id_bytes(qid), 2) != stable_shard(d, 2)
    wait_until(lambda: len(sink.messages) == len(solos), WAIT, "every solo domain delivered")
    print(f"{away} of {len(solos)} solo domains owned away from their home worker")
    for d in solos:
        (entry,) = ctl_json(server, "mx", d)["entries"]
        assert entry["kind"] == "route" and entry["hosts"][0]["name"] == f"mx.{HOT}", (d, entry)
