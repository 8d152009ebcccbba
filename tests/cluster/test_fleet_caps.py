"""Three real `volley serve` nodes on 127.0.0.20-22 share one provider's cap through a
real redis-server: the provider's sinks never see more than the cap's sessions at
once from all nodes together (counted by the sinks, from the banner to QUIT), no
message is lost or doubled, and `volley ctl status` on each node shows the fleet and
every node's share, which add up to no more than the cap in Redis's own lease set.
A node killed with -9 holds no lease beyond lease_ttl."""

from __future__ import annotations

import os
import signal
import threading
import time

from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import CAP, Provider, cluster_of, provider_row, send_to
from tests.integration.control_helpers import ctl
from tests.integration.harness import wait_until

N = 40  # messages per node
WAIT = 120.0


def leases(redis_server: RedisServer, key: str = "provider") -> dict[str, int]:
    with redis_server.client() as c:
        t = c.time()
        members = c.zrangebyscore(f"volleytest:cap:{key}:leases", t[0] + t[1] / 1e6, "+inf")
    out: dict[str, int] = {}
    for m in members:
        node = m.decode().rsplit(":", 1)[0]
        out[node] = out.get(node, 0) + 1
    return out


def test_a_provider_capped_at_4_sees_at_most_4_from_three_nodes(nodes, peers, dns_zone, redis_server):
    provider = Provider(peers, dns_zone)
    fleet = nodes(3, provider.overrides())
    wait_until(lambda: all(cluster_of(n)["live_nodes"] == 3 for n in fleet), WAIT, "3 live nodes")
    # Sample Redis's leases while mail flows: never above the cap.
    most = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], sum(leases(redis_server).values()))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    senders = [threading.Thread(target=send_to, args=(n, [f"n{i}-{k}" for k in range(N)]))
               for i, n in enumerate(fleet)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(WAIT)
    wait_until(lambda: len(provider.sink.messages) >= 3 * N, WAIT, f"{3 * N} messages at the provider")
    stop.set()
    watcher.join(5)
    tags = provider.tags()
    assert tags == {f"n{i}-{k}": 1 for i in range(3) for k in range(N)}  # none lost, none twice
    with provider.seen.lock:
        peak = provider.seen.peak
    print(f"peak sessions at the provider {peak} (cap {CAP}), most leases in Redis {most[0]}")
    assert peak <= CAP
    assert most[0] <= CAP
    # Each node's status: the fleet and every node's share, the shares within the cap.
    for node in fleet:
        row = provider_row(node)
        assert row["cap"] == CAP and row["mode"] == "leased"
        assert sum(row["by_node"].values()) <= CAP
        assert set(row["by_node"]) <= {"node0", "node1", "node2"}
    text = ctl(fleet[0], "status").stdout
    assert "cluster    node node0, healthy, 3 live nodes" in text
    assert "provider" in text and "leased" in text


def test_a_node_killed_with_9_holds_no_lease_beyond_the_ttl(nodes, peers, dns_zone, redis_server):
    provider = Provider(peers, dns_zone, latency=0.3)  # slow: connections stay open
    first, second = nodes(2, provider.overrides())
    wait_until(lambda: cluster_of(first)["live_nodes"] == 2, WAIT, "2 live nodes")
    sender = threading.Thread(target=send_to, args=(second, [f"k{k}" for k in range(30)]))
    sender.start()
    sender.join(WAIT)
    wait_until(lambda: leases(redis_server).get("node1", 0) > 0, WAIT, "node1 holding leases")
    os.killpg(second.proc.pid, signal.SIGKILL)  # the supervisor and its workers at once
    second.proc.wait(10)
    killed = time.monotonic()
    wait_until(lambda: not leases(redis_server).get("node1"), WAIT, "node1's leases gone")
    gone_after = time.monotonic() - killed
    print(f"node1's leases gone {gone_after:.1f} s after kill -9 (lease_ttl 3 s)")
    # Its liveness went with them: the survivor counts itself alone again.
    wait_until(lambda: cluster_of(first)["live_nodes"] == 1, WAIT, "node0 alone")
    with redis_server.client() as c:
        assert c.zrange("volleytest:nodes", 0, -1) == [b"node0"]
