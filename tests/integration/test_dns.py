"""engine/dns against a real DNS server on loopback (engine/lab/dns.py).

Each test runs on its own uvloop loop under a hard deadline (`run`). Time inside the
cache is a fake clock the test advances, so TTL tests never sleep; the only real wait is
the resolver-timeout test, which checks a deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from engine.dns.cache import DnsCache
from engine.dns.mx import Route, RouteError
from engine.dns.resolver import Resolver, Status
from engine.lab.dns import DnsServer, DnsServerThread, start_dns_server

ZONE: dict[str, Any] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (10, "mx2.example.test")], "TTL": 300},
    "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::2"], "TTL": 300},
    "mx2.example.test": {"A": ["127.0.0.3"], "TTL": 300},
    "cname.test": {"CNAME": "example.test"},
    "viaalias.test": {"MX": [(5, "alias.test")]},
    "alias.test": {"CNAME": "mx1.example.test"},
    "plain.test": {"A": ["127.0.0.9"], "AAAA": ["::9"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "refused.test": "REFUSED",
    "slow.test": {"delay": 2, "MX": [(10, "mx1.example.test")]},
    "halfv6.test": {"MX": [(10, "half.test")]},
    "half.test": {"A": ["127.0.0.4"], "AAAA": "SERVFAIL"},
    "big.test": {"TC": True, "MX": [(p, f"mx{p}.big.test") for p in range(1, 41)]},
    "mx1.big.test": {"A": ["127.0.0.5"]},
}


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now



def run(body: Callable[[DnsServer], Coroutine[Any, Any, None]], zone: dict[str, Any] | None = None,
        deadline: float = 10, **server_kw: Any) -> None:
    """Start a server with `zone`, run `body(server)` under a deadline, close the server."""

    async def main() -> None:
        server = await start_dns_server(dict(ZONE if zone is None else zone), **server_kw)
        try:
            await asyncio.wait_for(body(server), deadline)
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def make_cache(server: DnsServer, timeout: float = 2.0, **kw: Any) -> tuple[DnsCache, Clock]:
    clock = Clock()
    kw.setdefault("rng", random.Random(1))
    return DnsCache(Resolver([server.address], timeout), clock=clock, **kw), clock


def names(route: Route | RouteError) -> list[str]:
    assert isinstance(route, Route), route
    return [h.name for h in route.hosts]


def reply(route: Route | RouteError) -> tuple[int, str]:
    assert isinstance(route, RouteError), route
    return route.reply.code, route.reply.enhanced


# --- what the resolver sees ---------------------------------------------------------


def test_mx_with_a_and_aaaa() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("Example.Test.")
        assert isinstance(r, Route) and not r.implicit
        assert sorted(names(r)) == ["mx1.example.test", "mx2.example.test"]
        by_name = {h.name: h for h in r.hosts}
        assert by_name["mx1.example.test"].addresses == ("127.0.0.2", "::2")
        assert by_name["mx2.example.test"].addresses == ("127.0.0.3",)
        assert r.site_key == "mx1.example.test,mx2.example.test"

    run(body)


def test_cname_followed_for_domain_and_mx_target() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("cname.test")
        assert sorted(names(r)) == ["mx1.example.test", "mx2.example.test"]
        r = await cache.route("viaalias.test")
        assert isinstance(r, Route)
        assert [(h.name, h.addresses) for h in r.hosts] == [("alias.test", ("127.0.0.2", "::2"))]

    run(body)


def test_implicit_mx_on_a_and_aaaa() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("plain.test")
        assert isinstance(r, Route) and r.implicit
        assert [(h.name, h.preference, h.addresses) for h in r.hosts] == [("plain.test", 0, ("127.0.0.9", "::9"))]
        assert r.site_key == "plain.test"

    run(body)


def test_null_mx_bounces_without_address_queries() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        assert reply(await cache.route("nullmx.test")) == (556, "5.1.10")
        assert server.count("nullmx.test", "A") == server.count("nullmx.test", "AAAA") == 0

    run(body)


def test_nxdomain_bounces_5_1_2() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        assert reply(await cache.route("nope.test")) == (550, "5.1.2")
        assert server.count("nope.test", "A") == 0

    run(body)


@pytest.mark.parametrize("domain", ["broken.test", "refused.test"])
def test_servfail_defers_and_never_falls_back_to_a(domain: str) -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        assert reply(await cache.route(domain)) == (451, "4.4.3")
        assert server.count(domain, "A") == server.count(domain, "AAAA") == 0
        assert cache.stats.failures == 1

    run(body)


def test_timeout_defers_within_the_deadline() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server, timeout=0.5)
        started = time.monotonic()
        result = await cache.route("slow.test")  # the server answers after 2 s
        elapsed = time.monotonic() - started
        # slow.test does answer (with an MX), after 2 s: a 451 shows the 0.5 s timeout
        # cut the wait short. The lower bound shows it did wait for that timeout.
        assert reply(result) == (451, "4.4.3")
        assert elapsed >= 0.4, elapsed
        assert server.count("slow.test", "A") == 0

    run(body)


def test_host_with_a_but_failing_aaaa_is_usable() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("halfv6.test")
        assert isinstance(r, Route)
        assert r.hosts[0].addresses == ("127.0.0.4",)

    run(body)


def test_truncated_udp_answer_retried_over_tcp() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server, max_mx_hosts=3)
        r = await cache.route("big.test")
        assert names(r) == ["mx1.big.test"]  # mx2, mx3: NXDOMAIN, skipped
        assert isinstance(r, Route) and r.site_key.count(",") == 39
        assert server.count("big.test", "MX") == 2  # UDP (TC) then TCP
        assert server.count("mx4.big.test", "A") == 0  # beyond max_mx_hosts

    run(body)


def test_resolver_statuses_and_negative_ttl() -> None:
    async def body(server: DnsServer) -> None:
        resolver = Resolver([server.address], 1.0)
        assert (await resolver.mx("nope.test")).status is Status.NXDOMAIN
        nodata = await resolver.mx("plain.test")
        assert (nodata.status, nodata.ttl) == (Status.NODATA, 120)  # min(SOA TTL, MINIMUM)
        ent = await resolver.addresses("big.test")  # exists, but has only MX
        assert ent.status is Status.NODATA
        assert (await resolver.addresses("example.test")).status is Status.NODATA
        assert (await resolver.mx("nullmx.test")).records[0].host == ""

    run(body, soa_minimum=120, soa_ttl=3600)


def test_empty_non_terminals_follow_live_changes() -> None:
    # The server keeps every name's ancestors to tell NODATA from NXDOMAIN; set() must
    # keep them in step when a name comes and goes.
    async def body(server: DnsServer) -> None:
        resolver = Resolver([server.address], 1.0)
        assert (await resolver.mx("b.test")).status is Status.NXDOMAIN
        server.set("a.b.test", {"A": ["127.0.0.7"]})
        assert (await resolver.mx("b.test")).status is Status.NODATA  # an empty non-terminal
        assert (await resolver.mx("c.a.b.test")).status is Status.NXDOMAIN
        server.set("a.b.test", None)
        assert (await resolver.mx("b.test")).status is Status.NXDOMAIN

    run(body, soa_minimum=0)


def test_sync_server_thread() -> None:
    with DnsServerThread(ZONE) as server:

        async def lookup() -> Status:
            return (await Resolver([server.address], 2.0).mx("example.test")).status

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(asyncio.wait_for(lookup(), 10)) is Status.OK
        assert server.count("example.test", "MX") == 1


# --- the cache --------------------------------------------------------------------


def test_ttl_honoured() -> None:
    async def body(server: DnsServer) -> None:
        cache, clock = make_cache(server)
        await cache.route("example.test")
        clock.now += 299
        await cache.route("example.test")
        assert server.count("example.test", "MX") == 1
        assert server.count("mx1.example.test", "A") == 1
        clock.now += 2  # 301 s: past the 300 s TTL
        await cache.route("example.test")
        assert server.count("example.test", "MX") == 2
        assert server.count("mx1.example.test", "A") == 2

    run(body)


@pytest.mark.parametrize(("ttl", "before", "after"), [(5, 59, 61), (86400, 3599, 3601)])
def test_ttl_floor_and_ceiling(ttl: int, before: float, after: float) -> None:
    async def body(server: DnsServer) -> None:
        server.set("example.test", {"MX": [(10, "mx2.example.test")], "TTL": ttl})
        server.set("mx2.example.test", {"A": ["127.0.0.3"], "TTL": ttl})
        cache, clock = make_cache(server, min_ttl=60, max_ttl=3600)
        await cache.route("example.test")
        clock.now += before
        await cache.route("example.test")
        assert server.count("example.test", "MX") == 1
        clock.now += after - before
        await cache.route("example.test")
        assert server.count("example.test", "MX") == 2

    run(body)


@pytest.mark.parametrize(("soa_minimum", "before", "after"), [(120, 119, 121), (86400, 899, 901)])
def test_negative_caching_by_soa_minimum(soa_minimum: int, before: float, after: float) -> None:
    async def body(server: DnsServer) -> None:
        cache, clock = make_cache(server, negative_ttl_max=900)
        for domain in ("nope.test", "plain.test"):  # NXDOMAIN; NODATA then implicit MX
            await cache.route(domain)
        clock.now += before
        assert reply(await cache.route("nope.test")) == (550, "5.1.2")
        await cache.route("plain.test")
        assert server.count("nope.test", "MX") == server.count("plain.test", "MX") == 1
        clock.now += after - before
        await cache.route("nope.test")
        await cache.route("plain.test")
        assert server.count("nope.test", "MX") == server.count("plain.test", "MX") == 2

    run(body, soa_minimum=soa_minimum, soa_ttl=86400)


def test_failures_cached_briefly() -> None:
    async def body(server: DnsServer) -> None:
        cache, clock = make_cache(server, failure_ttl=5)
        assert reply(await cache.route("broken.test")) == (451, "4.4.3")
        server.set("broken.test", {"MX": [(10, "mx2.example.test")]})
        clock.now += 4
        assert reply(await cache.route("broken.test")) == (451, "4.4.3")
        assert server.count("broken.test", "MX") == 1
        clock.now += 2
        assert names(await cache.route("broken.test")) == ["mx2.example.test"]

    run(body)


def test_single_flight() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        results = await asyncio.gather(*(cache.route("example.test") for _ in range(50)))
        assert all(isinstance(r, Route) for r in results)
        assert server.count("example.test", "MX") == 1
        assert server.count("mx1.example.test", "A") == server.count("mx1.example.test", "AAAA") == 1
        assert server.count("mx2.example.test", "A") == 1
        assert cache.stats.queries == 3  # one MX, two address lookups
        assert cache.stats.coalesced == 49 + 2 * 49

    run(body)


def test_cancelled_waiter_does_not_cancel_the_shared_query() -> None:
    async def body(server: DnsServer) -> None:
        server.set("example.test", {"delay": 0.2, "MX": [(10, "mx2.example.test")]})
        cache, _ = make_cache(server)
        first = asyncio.ensure_future(cache.route("example.test"))
        second = asyncio.ensure_future(cache.route("example.test"))
        await asyncio.sleep(0)  # let both join the lookup; not a synchronisation wait
        first.cancel()
        assert names(await second) == ["mx2.example.test"]
        assert server.count("example.test", "MX") == 1

    run(body)


def test_shuffle_per_call_on_cache_hits() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server, rng=random.Random(3))
        firsts = {names(await cache.route("example.test"))[0] for _ in range(40)}
        assert firsts == {"mx1.example.test", "mx2.example.test"}
        assert server.count("example.test", "MX") == 1
        assert cache.stats.hits >= 39

    run(body)


def test_route_now_answers_from_fresh_cache_only() -> None:
    async def body(server: DnsServer) -> None:
        cache, clock = make_cache(server, min_ttl=60, max_ttl=60)
        assert cache.route_now("example.test") is None  # nothing cached: no query either
        assert server.count("example.test", "MX") == 0
        first = await cache.route("example.test")
        hits = cache.stats.hits
        now = cache.route_now("Example.Test.")
        assert isinstance(now, Route) and sorted(names(now)) == sorted(names(first))
        assert now.address_key == first.address_key == "ip:127.0.0.2,127.0.0.3,::2"
        assert cache.stats.hits == hits + 3  # the MX answer and both hosts' addresses
        assert reply(await cache.route("nx.test")) == (550, "5.1.2")
        assert reply(cache.route_now("nx.test")) == (550, "5.1.2")  # an error plan too
        clock.now += 61
        assert cache.route_now("example.test") is None  # expired: the slow path asks again
        assert server.count("example.test", "MX") == 1

    run(body)


def test_flush() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        await cache.route("example.test")
        await cache.route("plain.test")
        assert len(cache) == 5  # 2 MX + 3 address answers
        assert cache.flush("EXAMPLE.test") == 3  # its MX and both MX hosts
        assert cache.flush("example.test") == 0
        await cache.route("example.test")
        assert server.count("example.test", "MX") == 2
        await cache.route("plain.test")
        assert server.count("plain.test", "MX") == 1
        assert cache.flush() == 5
        await cache.route("plain.test")
        assert server.count("plain.test", "MX") == 2

    run(body)


def test_peek() -> None:
    async def body(server: DnsServer) -> None:
        server.set("mx2.example.test", {"A": ["127.0.0.3"], "TTL": 120})
        cache, clock = make_cache(server)
        assert cache.peek("example.test") is None
        await cache.route("example.test")
        await cache.route("nope.test")
        queries = server.total()
        peeked = cache.peek("example.test")
        assert peeked is not None
        route, remaining = peeked
        assert sorted(names(route)) == ["mx1.example.test", "mx2.example.test"]
        assert remaining == 120  # the shortest TTL involved (mx2's A)
        clock.now += 100
        assert cache.peek("example.test")[1] == 20  # type: ignore[index]
        neg = cache.peek("nope.test")
        assert neg is not None and reply(neg[0]) == (550, "5.1.2") and neg[1] == 200
        clock.now += 21
        assert cache.peek("example.test") is None
        assert server.total() == queries  # peek never queries

    run(body, soa_minimum=300)


def test_size_bound_evicts_least_recently_used() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server, max_entries=3)
        await cache.route("nope.test")
        await cache.route("example.test")  # 3 more entries: nope.test evicted
        assert len(cache) == 3 and cache.stats.evictions == 1
        await cache.route("nope.test")
        assert server.count("nope.test", "MX") == 2

    run(body)
