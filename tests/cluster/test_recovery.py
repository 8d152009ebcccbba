"""Redis restarted empty under two delivering nodes: the cap holds at every moment of
the recovery, as the provider's sinks count the sessions open at once.

While Redis is down each node runs on its local share (cap 4 ÷ 2 live nodes = 2) and,
with a backlog and a slow provider, keeps both its connections busy. Redis comes back
with no leases and no wants: the first node whose round runs must not take the whole
cap while the other still has its connections of the outage open (it has published
nothing yet and holds no lease). Nothing here waits on a timer: every step waits for
what the nodes or the sinks report."""

from __future__ import annotations

import threading

from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import CAP, WAIT, cluster_of, provider_row, send_to, wait_live
from tests.integration.harness import wait_until

N = 30  # messages per node: at 0.4 s a transaction, a backlog of several seconds on 2 connections
LATENCY = 0.4  # seconds per transaction at the sinks: sessions stay busy across the restart


def test_the_cap_holds_when_redis_comes_back_empty(nodes, shaped_provider, redis_server: RedisServer):
    provider = shaped_provider(latency=LATENCY)
    fleet = nodes(2, provider.overrides())
    wait_live(fleet, 2)
    redis_server.kill()
    wait_until(lambda: all(cluster_of(n)["state"] == "degraded" for n in fleet), WAIT, "degraded")
    assert [provider_row(n)["share"] for n in fleet] == [CAP // 2, CAP // 2]

    senders = [threading.Thread(target=send_to, args=(node, [f"r{i}-{k}" for k in range(N)]))
               for i, node in enumerate(fleet)]
    for t in senders:
        t.start()
    # Both nodes busy on their whole local share: the sinks see 2 + 2 sessions.
    wait_until(lambda: len(provider.sink.live) == CAP, WAIT, "both nodes' connections open")
    redis_server.start()  # empty: no persistence
    wait_until(lambda: all(cluster_of(n)["state"] == "healthy" for n in fleet), WAIT, "healthy again")
    for t in senders:
        t.join(WAIT)
    wait_until(lambda: len(provider.sink.messages) >= 2 * N, WAIT, "all delivered")
    wait_until(lambda: all(provider_row(n)["mode"] == "leased" for n in fleet), WAIT, "leased again")
    # The sinks' own count of connections open at once (from accept to close, however
    # the connection ended), over the whole test: the outage and the recovery.
    peak = provider.sink.max_live
    print(f"peak sessions across the restart of Redis {peak} (cap {CAP})")
    assert provider.tags() == {f"r{i}-{k}": 1 for i in range(2) for k in range(N)}  # none lost, none twice
    assert peak <= CAP
