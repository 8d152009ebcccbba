"""Pools shared by MX address, and the worker-wide cap on outbound connections
(engine/delivery/budget.py), against sinks on 127.0.0.x."""

from __future__ import annotations

import asyncio

from engine.delivery.budget import ConnectionBudget
from engine.delivery.pool_manager import PoolManager
from engine.dns.mx import Route, RouteHost, address_key
from engine.lab.sink.protocol import NO_REPLY, start_sinks
from tests.integration.test_pool import free_port
from tests.integration.test_session import (
    _OPEN,
    Results,
    codes,
    fast_timeouts,
    make_job,
    run_bounded,
    settings_for,
    sink_at,
)


def named_route(domain: str, mx: str, ip: str) -> Route:
    hosts = (RouteHost(mx, 10, (ip,)),)
    return Route(domain, hosts, mx, address_key=address_key(hosts))


class RecordingBudget(ConnectionBudget):
    """A ConnectionBudget that remembers the most slots ever in use."""

    most = 0

    def take(self, pool):  # type: ignore[no-untyped-def]
        ok = super().take(pool)
        self.most = max(self.most, self.used)
        return ok


def test_domains_whose_mx_names_share_an_address_share_one_pool() -> None:
    async def main() -> None:
        sink = await sink_at()
        manager = PoolManager(fast_timeouts())
        settings = settings_for(sink, max_connections=1)
        one = named_route("one.test", "mx.one.test", "127.0.0.1")
        two = named_route("two.test", "one-test.mail.provider.test", "127.0.0.1")
        assert manager.pool_for(one, settings) is manager.pool_for(two, settings)
        results = Results()
        for i in range(20):
            r = one if i % 2 else two
            manager.submit(make_job([f"r{i}@{r.domain}"], tag=str(i), results=results, job_route=r), settings)
        await results.wait(20)
        assert all(codes(r) == [250] for r in results.by_tag.values())
        assert sink.connections == 1 and len(sink.messages) == 20  # one session carried both
        # A verified certificate names its host: then the names keep their own pools.
        verified = settings_for(sink, max_connections=1, tls_verify=True)
        assert manager.pool_for(one, verified) is not manager.pool_for(two, verified)
        await manager.close()

    run_bounded(main)


def test_the_budget_caps_connections_across_sites() -> None:
    async def main() -> None:
        port = free_port("127.0.0.2")
        # One sink on two addresses: its max_live counts both sites' connections together.
        sink = await start_sinks([("127.0.0.2", port), ("127.0.0.3", port)])
        _OPEN.append(sink)
        budget = RecordingBudget(3)
        manager = PoolManager(fast_timeouts(), budget=budget)
        settings = settings_for(sink, max_connections=5)
        routes = [named_route("a.test", "mx.a.test", "127.0.0.2"),
                  named_route("b.test", "mx.b.test", "127.0.0.3")]
        results = Results()
        for i in range(80):
            r = routes[i % 2]
            manager.submit(make_job([f"r{i}@{r.domain}"], tag=str(i), results=results, job_route=r), settings)
        await results.wait(80)
        assert all(codes(r) == [250] for r in results.by_tag.values())
        assert budget.most == 3 and sink.max_live <= 3
        assert all(p.stats.messages_sent > 0 for p in manager.pools.values())  # neither starved
        await manager.close()
        assert budget.used == 0  # every slot came back

    run_bounded(main)


def test_a_waiting_site_makes_another_sites_idle_session_quit() -> None:
    async def main() -> None:
        sink_a = await sink_at("127.0.0.2")
        sink_b = await sink_at("127.0.0.3")
        budget = ConnectionBudget(1)
        manager = PoolManager(fast_timeouts(), budget=budget)
        # Idle sessions would live a minute: only the reclaim lets b.test in sooner.
        a = settings_for(sink_a, idle_timeout=60.0)
        b = settings_for(sink_b, idle_timeout=60.0)
        results = Results()
        manager.submit(make_job(["x@a.test"], tag="a", results=results,
                                job_route=named_route("a.test", "mx.a.test", "127.0.0.2")), a)
        await results.wait(1)
        manager.submit(make_job(["y@b.test"], tag="b", results=results,
                                job_route=named_route("b.test", "mx.b.test", "127.0.0.3")), b)
        await results.wait(2)
        assert codes(results.by_tag["a"]) == [250] and codes(results.by_tag["b"]) == [250]
        assert ("QUIT", "") in sink_a.commands  # a.test's idle session gave up its slot
        assert sink_b.connections == 1 and budget.used == 1
        await manager.close()
        assert budget.used == 0

    run_bounded(main)


def test_failed_connection_attempts_give_their_slots_back() -> None:
    async def main() -> None:
        sink = await sink_at("127.0.0.2")
        budget = ConnectionBudget(1)
        manager = PoolManager(fast_timeouts(), budget=budget)
        dead = named_route("dead.test", "mx.dead.test", "127.0.0.4")
        results = Results()
        dead_settings = settings_for(sink, port=free_port("127.0.0.4"))
        manager.submit(make_job(["x@dead.test"], tag="dead", results=results, job_route=dead), dead_settings)
        await results.wait(1)
        assert results.by_tag["dead"].destination_failed  # refused: deferred, pool backs off
        assert budget.used == 0
        manager.submit(make_job(["y@live.test"], tag="live", results=results,
                                job_route=named_route("live.test", "mx.live.test", "127.0.0.2")),
                       settings_for(sink))
        await results.wait(2)
        assert codes(results.by_tag["live"]) == [250]
        await manager.close()
        assert budget.used == 0

    run_bounded(main)


def test_a_larger_cap_on_reload_serves_the_waiting_pools_at_once() -> None:
    async def main() -> None:
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def hang(verb: str, arg: str) -> str | None:
            if verb == ".":  # a.test's end of data is never answered: its slot stays taken
                reached.done() or reached.set_result(None)
                return NO_REPLY
            return None

        sink_a = await sink_at("127.0.0.2", script=hang)
        sink_b = await sink_at("127.0.0.3")
        budget = ConnectionBudget(1)
        manager = PoolManager(fast_timeouts(30.0), budget=budget)
        results = Results()
        manager.submit(make_job(["x@a.test"], tag="a", results=results,
                                job_route=named_route("a.test", "mx.a.test", "127.0.0.2")),
                       settings_for(sink_a))
        await reached
        manager.submit(make_job(["y@b.test"], tag="b", results=results,
                                job_route=named_route("b.test", "mx.b.test", "127.0.0.3")),
                       settings_for(sink_b))
        assert budget.waiting == 1 and budget.used == 1  # no slot, and no idle one to reclaim
        budget.resize(2)
        await results.wait(1)
        assert codes(results.by_tag["b"]) == [250] and budget.waiting == 0
        await manager.close(grace=0.1)
        await results.wait(2)
        assert budget.used == 0

    run_bounded(main)
