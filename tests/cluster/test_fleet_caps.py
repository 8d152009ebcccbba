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
from tests.cluster.fleet_helpers import (
    CAP,
    WAIT,
    cluster_of,
    leases_in_redis,
    provider_row,
    send_each,
    send_to,
    wait_live,
)
from tests.integration.control_helpers import ctl
from tests.integration.harness import wait_until

N = 40  # messages per node


def leases(redis_server: RedisServer) -> dict[str, int]:
    return leases_in_redis(redis_server, "provider", prefix="volleytest:")


def test_a_provider_capped_at_4_sees_at_most_4_from_three_nodes(nodes, shaped_provider, redis_server):
    provider = shaped_provider()
    fleet = nodes(3, provider.overrides())
    wait_live(fleet, 3)
    # Sample Redis's leases while mail flows: never above the cap.
    most = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], sum(leases(redis_server).values()))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    send_each(fleet, "n", N)
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


def test_a_node_killed_with_9_holds_no_lease_beyond_the_ttl(nodes, shaped_provider, redis_server):
    provider = shaped_provider(latency=0.3)  # slow: connections stay open
    first, second = nodes(2, provider.overrides())
    wait_live([first], 2)
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


def test_a_providers_rate_holds_across_three_nodes(nodes, shaped_provider):
    rate, per_node = 20.0, 20
    provider = shaped_provider(latency=0.0)
    fleet = nodes(3, provider.overrides(rate=f"{int(rate)}/s"))
    wait_live(fleet, 3)
    send_each(fleet, "r", per_node)
    wait_until(lambda: len(provider.sink.messages) >= 3 * per_node, WAIT, "all delivered")
    assert provider.tags() == {f"r{i}-{k}": 1 for i in range(3) for k in range(per_node)}
    with provider.seen.lock:
        arrived = sorted(provider.seen.arrived)
    # Redis grants the fleet at most rate x (window + heartbeat) in any window, and
    # each node may hold up to a heartbeat's worth plus one of unspent credit when
    # the window opens: at most 20 x 1.25 + 3 x (20 x 0.25 + 1) = 43 in any second,
    # plus one for the jitter between hand-over and arrival. Three nodes on their
    # own would send all 60 within about a second.
    most = max(sum(1 for t in arrived if a <= t < a + 1.0) for a in arrived)
    print(f"most in 1 s: {most} (rate {rate}/s, 3 nodes)")
    assert most <= rate * 1.25 + 3 * (rate * 0.25 + 1) + 1
    row = provider_row(fleet[0])
    assert row["granted"] >= per_node and row["rate"] == rate
