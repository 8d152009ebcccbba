"""Delivery in the real process tree (`volley serve`, two workers): kill -9 of both
workers while deliveries are in flight loses nothing (INV-NOLOSS, P2) and adds few
duplicates (INV-DUP, P3); each domain is delivered by the one worker owning its shard.

The queue is opened here only after the server stopped (finding 9)."""

from __future__ import annotations

import os
import signal
import threading
import tomllib
from collections import Counter as Tally
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine import config as config_mod
from engine.lab.sink.protocol import NO_REPLY, start_sink
from engine.queue.ids import id_bytes
from engine.queue.layout import owner_of
from engine.queue.store import QueueStore, stable_shard
from tests.integration.control_helpers import ctl
from tests.integration.harness import ServeProcess, wait_until
from tests.integration.relay_helpers import body, rcpt_of, send, send_many, tag_of

EVENT_TIMEOUT = 30.0


def domains_by_shard(n_per_shard: int) -> dict[int, list[str]]:
    """Domain names under .test whose home shard (of 2, `stable_shard`) is 0 and 1."""
    out: dict[int, list[str]] = {0: [], 1: []}
    i = 0
    while min(len(v) for v in out.values()) < n_per_shard:
        name = f"d{i}.test"
        shard = stable_shard(name, 2)
        if len(out[shard]) < n_per_shard:
            out[shard].append(name)
        i += 1
    return out


def relay_config(dns_port: int, sink_port: int, **delivery: Any) -> dict[str, Any]:
    return {
        "server": {"workers": 2},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "min_ttl": "1s",
                "failure_ttl": "0s", "timeout": "2s"},
        "delivery": {"enabled": True, "port": sink_port, "poll_interval": "50ms",
                     "retry": "1s", "backoff": "1s", "backoff_max": "2s",
                     "timeouts": {"connect": "3s", "data": "60s", "quit": "2s"}, **delivery},
    }


def kill_worker(server: ServeProcess, slot: int, pid: int) -> int:
    """SIGKILL worker `pid` of `slot`; returns the pid of its replacement."""
    os.kill(pid, signal.SIGKILL)
    exited = server.wait_for(lambda e: e.get("event") == "worker_exited" and e.get("slot") == slot,
                             EVENT_TIMEOUT)
    assert exited["status"] == -signal.SIGKILL, exited
    restarted = server.wait_for(
        lambda e: e.get("event") == "worker_restarted" and e.get("slot") == slot, EVENT_TIMEOUT)
    return int(restarted["pid"])


def queued_after_stop(server: ServeProcess) -> int:
    assert server.stop(30) == 0, server.log[-20:]
    data = tomllib.loads(server.config_path.read_text())
    store = QueueStore(data["queue"]["path"],
                       map_size=int(config_mod.parse_size(data["queue"]["max_size"])),
                       shards=int(data["server"]["workers"]))
    try:
        return store.count()
    finally:
        store.close()


def test_kill_9_both_workers_mid_delivery_loses_nothing(serve, peers, dns_zone):
    """Both workers deliver both domains (each a share of each, layout.owner_of): each
    has two transactions hanging at DATA (slow start's two sessions) when it is killed;
    its replacement picks its deliveries up again (they stayed due)."""
    shards = domains_by_shard(1)
    doms = {0: shards[0][0], 1: shards[1][0]}
    released = threading.Event()
    lock = threading.Lock()
    held: Tally[str] = Tally()  # domain → transactions held at DATA
    last_rcpt_domain = [""]

    def script(verb: str, arg: str) -> str | None:
        with lock:
            if verb == "RCPT":
                last_rcpt_domain[0] = rcpt_of(arg).rsplit("@", 1)[1]
            elif verb == "DATA" and not released.is_set():
                held[last_rcpt_domain[0]] += 1
                return NO_REPLY  # the transaction hangs: a delivery in flight
        return None

    sink = peers.call(start_sink("127.0.0.2", 0, script=script, keep_segments=False))
    peers.sinks.append(sink)
    zone: dict[str, Any] = {"mx.sink.test": {"A": ["127.0.0.2"]}}
    for d in doms.values():
        zone[d] = {"MX": [(10, "mx.sink.test")]}
    dns = dns_zone(zone)
    # The cap (server-wide, site_slots.py) leaves room for both workers' two sessions.
    server = serve(relay_config(dns.port, sink.port, max_connections_per_domain=4))

    tags = [f"crash-{i}" for i in range(30)]
    for start in range(0, 30, 5):  # several connections, so both workers receive mail
        send_many(server.port, [([f"r{i}@{doms[i % 2]}"], body(tags[i]))
                                for i in range(start, start + 5)])

    def held_total() -> int:
        with lock:
            return sum(held.values())

    wait_until(lambda: held_total() >= 4, 30, "both workers in flight (two sessions each)")
    pids = dict(enumerate(server.worker_pids))
    kills = 0
    for slot in (0, 1):
        before = held_total()
        kill_worker(server, slot, pids[slot])
        kills += 1
        # The replacement picks the same deliveries up again (they stayed due); the other
        # worker is at its two sessions (slow start without a success), so the new
        # transactions are the replacement's.
        wait_until(lambda before=before: held_total() > before, 30, f"worker {slot} redelivers")

    released.set()

    async def drop_held() -> None:
        for proto in list(sink.live):
            if proto.transport is not None:
                proto.transport.abort()

    peers.call(drop_held())
    wait_until(lambda: {tag_of(m.data) for m in sink.messages} >= set(tags), 40,
               "every message delivered at least once")
    copies = Tally(tag_of(m.data) for m in sink.messages)
    extra = sum(n - 1 for n in copies.values())
    assert extra <= kills * 3, copies  # at most the in-flight transactions of each kill
    assert queued_after_stop(server) == 0


def test_each_unit_is_attempted_by_its_owner_worker_only(serve, peers, dns_zone):
    """Sharding (queue layout format 4): every connection attempt for a (message, domain)
    unit comes from the worker `owner_of(domain, id)` names, so one domain's mail is
    attempted by both workers, each learning by itself that the site is dead. The
    delivery log has no worker field, so the workers' own `connect_failed` log lines
    (role worker0/worker1) are the observable: the MX addresses refuse connections, and
    each domain's messages are sent to it alone."""
    domains = [f"d{i}.test" for i in range(4)]
    placeholder = peers.call(start_sink("127.0.0.250", 0))  # fixes a port; nothing else listens on it
    peers.sinks.append(placeholder)
    zone: dict[str, Any] = {}
    site: dict[str, str] = {}
    for n, d in enumerate(domains, start=2):
        zone[d] = {"MX": [(10, f"mx.{d}")]}
        zone[f"mx.{d}"] = {"A": [f"127.0.0.{n}"]}
        site[f"ip:127.0.0.{n}"] = d  # pools are keyed by address (unverified TLS)
    dns = dns_zone(zone)
    server = serve(relay_config(dns.port, placeholder.port))
    owners: dict[str, set[int]] = {d: set() for d in domains}
    for i in range(24):  # one connection each: both workers receive some of them
        d = domains[i % 4]
        qid = send(server.port, [f"r{i}@{d}"], body(f"shard-{i}"))
        owners[d].add(owner_of(d, id_bytes(qid), 2))
    assert any(len(o) == 2 for o in owners.values()), owners  # a domain on both workers

    def attempts() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for e in server.log:
            if e.get("event") == "connect_failed" and e.get("site") in site:
                seen.setdefault(site[e["site"]], []).append(e.get("role", ""))
        return seen

    def enough() -> bool:
        try:
            server.wait_for(lambda e: False, 0.05)
        except TimeoutError:
            pass
        seen = attempts()
        return all({f"worker{o}" for o in owners[d]} <= set(seen.get(d, [])) for d in domains)

    wait_until(enough, 30, "attempts for every domain from each of its owners")
    for d, roles in attempts().items():
        assert set(roles) == {f"worker{o}" for o in owners[d]}, (d, owners[d], roles)
    assert server.stop(30) == 0


def test_a_domain_is_looked_up_once_for_both_workers(serve, peers, dns_zone):
    """Both workers deliver a share of each domain, and the DNS answers one of them
    fetched serve the other (dns_share.py): each domain's MX, its host's addresses and
    its `_mta-sts` record are queried once, counted by the DNS server itself. Each
    domain's first message is delivered alone, so no two workers race to ask first."""
    domains = [f"d{i}.test" for i in range(4)]
    sink = peers.call(start_sink("127.0.0.2", 0, keep_segments=False))
    peers.sinks.append(sink)
    zone: dict[str, Any] = {"mx.sink.test": {"A": ["127.0.0.2"]}}
    for d in domains:
        zone[d] = {"MX": [(10, "mx.sink.test")]}
    dns = dns_zone(zone)
    config = relay_config(dns.port, sink.port)
    # The longest attempt dnspython allows (2 s): an attempt that a loaded host's DNS
    # thread answers late is retried, and the server counts the question twice.
    config["dns"]["timeout"] = "20s"
    server = serve(config)
    owners: dict[str, set[int]] = {d: set() for d in domains}
    sent = 0
    for d in domains:
        owners[d].add(owner_of(d, id_bytes(send(server.port, [f"first@{d}"], body(f"first-{d}"))), 2))
        sent += 1
        wait_until(lambda n=sent: len(sink.messages) >= n, 30, f"the first message to {d} delivered")
    for start in range(0, 24, 6):  # several connections, so both workers receive mail
        ids = send_many(server.port, [([f"r{i}@{domains[i % 4]}"], body(f"more-{i}"))
                                      for i in range(start, start + 6)])
        for i, qid in zip(range(start, start + 6), ids, strict=True):
            owners[domains[i % 4]].add(owner_of(domains[i % 4], id_bytes(qid), 2))
    sent += 24
    wait_until(lambda: len(sink.messages) >= sent, 30, "every message delivered")
    both = sum(o == {0, 1} for o in owners.values())
    assert both >= 2, owners  # domains delivered by both workers
    for d in domains:
        assert (dns.count(d, "MX"), dns.count(f"_mta-sts.{d}", "TXT")) == (1, 1), d
    assert (dns.count("mx.sink.test", "A"), dns.count("mx.sink.test", "AAAA")) == (1, 1)
    # What the server says of it: the MX of 4 domains and one address answer were asked
    # of the nameserver; the other worker took the MX and MTA-STS answers of each domain
    # it delivered too, and the MX host's address once, from the shared ones.
    asked = sum(dns.count(d, "MX") for d in domains) + dns.count("mx.sink.test", "A")

    def dns_figures() -> tuple[float, float]:  # the workers push their counters each second
        text = ctl(server, "metrics").stdout
        seen = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        return seen["volley_dns_lookups_total"], seen["volley_dns_shared_answers_total"]

    shared = 2 * both + 1
    try:
        wait_until(lambda: dns_figures() == (asked, shared), 30, f"lookups {asked}, shared answers {shared}")
    except TimeoutError as err:
        raise AssertionError(f"{err}; the server says {dns_figures()}") from err
    assert server.stop(30) == 0
