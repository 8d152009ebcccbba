"""Redis killed under three delivering nodes: every node says so once (log, metric,
status), keeps receiving and delivering on its local share (cap ÷ live nodes last
seen: 4 ÷ 3 = 1 connection each, so the provider sees at most 3), loses and doubles
nothing, and rejoins by itself when Redis is back (empty: no persistence), taking
leases again. Every figure is checked against the sinks' own counts."""

from __future__ import annotations

from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import CAP, WAIT, cluster_of, events, metric, provider_row, send_each, wait_live
from tests.integration.control_helpers import ctl
from tests.integration.harness import wait_until

N = 15  # messages per node per phase


def test_redis_down_keeps_delivering_on_local_shares_and_recovers(nodes, shaped_provider,
                                                                  redis_server: RedisServer):
    provider = shaped_provider()
    fleet = nodes(3, provider.overrides())
    wait_live(fleet, 3)
    assert [metric(n, "volley_cluster_degraded") for n in fleet] == [0.0, 0.0, 0.0]
    send_each(fleet, "before-n", N)
    wait_until(lambda: len(provider.sink.messages) >= 3 * N, WAIT, "the first phase delivered")

    before = [events(n, "cluster_degraded") for n in fleet]
    redis_server.kill()
    wait_until(lambda: all(cluster_of(n)["state"] == "degraded" for n in fleet), WAIT, "degraded")
    assert [metric(n, "volley_cluster_degraded") for n in fleet] == [1.0, 1.0, 1.0]
    for node in fleet:
        row = provider_row(node)
        assert (row["mode"], row["share"]) == ("local", CAP // 3)
        assert cluster_of(node)["live_nodes"] == 3  # the last count seen
    text = ctl(fleet[1], "status").stdout
    assert "cluster    node node1, DEGRADED, 3 live nodes" in text
    provider.seen.new_phase()
    send_each(fleet, "during-n", N)  # accepted while Redis is down
    wait_until(lambda: len(provider.sink.messages) >= 6 * N, WAIT, "delivered while degraded")
    with provider.seen.lock:
        degraded_peak = provider.seen.peak
    print(f"peak sessions while degraded {degraded_peak} (local shares 3 x {CAP // 3})")
    assert degraded_peak <= 3 * (CAP // 3)

    # One line per node for the outage, however many rounds failed meanwhile.
    def outage_lines() -> list[int]:
        return [events(n, "cluster_degraded") - b for n, b in zip(fleet, before, strict=True)]

    wait_until(lambda: outage_lines() == [1, 1, 1], WAIT, "each node's cluster_degraded line")
    assert outage_lines() == [1, 1, 1]
    redis_server.start()
    wait_until(lambda: all(cluster_of(n)["state"] == "healthy" for n in fleet), WAIT, "healthy again")
    assert [metric(n, "volley_cluster_degraded") for n in fleet] == [0.0, 0.0, 0.0]
    provider.seen.new_phase()
    send_each(fleet, "after-n", N)
    wait_until(lambda: len(provider.sink.messages) >= 9 * N, WAIT, "delivered after the return")
    wait_until(lambda: all(provider_row(n)["mode"] == "leased" for n in fleet), WAIT, "leased again")
    with provider.seen.lock:
        assert provider.seen.peak <= CAP
    want = {f"{p}-n{i}-{k}": 1 for p in ("before", "during", "after") for i in range(3) for k in range(N)}
    assert provider.tags() == want  # nothing lost, nothing twice
    # One line per transition on each node: healthy at the start, then degraded and
    # healthy in turn (a loaded box may add a pair if a heartbeat times out).
    for node in fleet:
        assert events(node, "cluster_healthy") == events(node, "cluster_degraded") + 1 >= 2
