"""Connection caps as leases in a real Redis (engine/cluster/caps.py): the leases of
all nodes never add up to more than the cap, an idle node's part flows to the busy
ones, a node never gives back leases below the connections it has open, and the
leases of a node that stopped renewing are gone after lease_ttl; connections a node has
open without leases are reserved too, and after Redis lost its data no node grows above
its local share for lease_ttl + timeout. Each figure is checked against Redis's own
sorted set, read independently."""

from __future__ import annotations

import asyncio
import time

from engine.cluster.caps import CapLeases
from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import leases_in_redis, started_links

KEY = "provider|127.0.0.1"


def test_shares_never_exceed_the_cap_and_follow_demand(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with started_links(redis_server.url, "abc") as links:
            a, b, c = map(CapLeases, links)
            shares = {"a": 0, "b": 0, "c": 0}
            # Everyone wants the whole cap of 4, several rounds in turn.
            for _ in range(4):
                for node, caps in zip("abc", (a, b, c), strict=True):
                    lease = await caps.rebalance(KEY, 4, 4, 0)
                    shares[node] = lease.share
                    assert sum(leases_in_redis(redis_server, KEY).values()) <= 4
            assert sum(shares.values()) == 4 and min(shares.values()) >= 1, shares
            assert leases_in_redis(redis_server, KEY) == {k: v for k, v in shares.items() if v}
            # c goes idle (wants nothing, has nothing open): a and b take its part.
            await c.rebalance(KEY, 4, 0, 0)
            for _ in range(2):
                shares["a"] = (await a.rebalance(KEY, 4, 4, 0)).share
                shares["b"] = (await b.rebalance(KEY, 4, 4, 0)).share
            assert (shares["a"], shares["b"]) == (2, 2)
            assert leases_in_redis(redis_server, KEY) == {"a": 2, "b": 2}
            # c has mail again: it gets a lease once one is given back, never above the cap.
            got = (await c.rebalance(KEY, 4, 4, 0)).share
            assert got == 0  # a and b hold all four
            shares["a"] = (await a.rebalance(KEY, 4, 4, 0)).share
            shares["b"] = (await b.rebalance(KEY, 4, 4, 0)).share
            shares["c"] = (await c.rebalance(KEY, 4, 4, 0)).share
            assert sum(shares.values()) <= 4 and shares["c"] >= 1, shares

    asyncio.run(main())


def test_a_node_keeps_the_leases_of_its_open_connections(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with started_links(redis_server.url, "ab") as links:
            a, b = map(CapLeases, links)
            assert (await a.rebalance(KEY, 4, 4, 0)).share == 4  # alone: all of it
            # b wants all too; a has 3 connections open: it keeps 3 (target 2), b gets 1.
            assert (await b.rebalance(KEY, 4, 4, 0)).share == 0
            lease = await a.rebalance(KEY, 4, 4, 3)
            assert (lease.share, lease.target) == (3, 2)
            assert (await b.rebalance(KEY, 4, 4, 0)).share == 1
            # a's sessions ended: down to its target, and b takes the rest.
            assert (await a.rebalance(KEY, 4, 4, 0)).share == 2
            assert (await b.rebalance(KEY, 4, 4, 0)).share == 2
            assert leases_in_redis(redis_server, KEY) == {"a": 2, "b": 2}
            await a.release(KEY)
            assert leases_in_redis(redis_server, KEY) == {"b": 2}

    asyncio.run(main())


def test_leases_of_a_silent_node_end_after_the_ttl(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with started_links(redis_server.url, "ab", lease_ttl=1.0) as links:
            a, b = map(CapLeases, links)
            for _ in range(2):  # the first round a takes all, the second it gives b half
                await a.rebalance(KEY, 4, 4, 0)
                await b.rebalance(KEY, 4, 4, 0)
            assert leases_in_redis(redis_server, KEY) == {"a": 2, "b": 2}
            # b falls silent (no renewal, no release, as with kill -9): a's rounds go on.
            deadline = time.monotonic() + 15
            while leases_in_redis(redis_server, KEY).get("b"):
                assert time.monotonic() < deadline, "b's leases outlived their TTL"
                await a.rebalance(KEY, 4, 4, 0)
                await asyncio.sleep(0.1)
            assert (await a.rebalance(KEY, 4, 4, 0)).share == 4

    asyncio.run(main())


def test_connections_open_without_leases_are_reserved(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with started_links(redis_server.url, "ab") as links:
            a, b = map(CapLeases, links)
            assert (await a.rebalance(KEY, 4, 4, 0)).share == 4
            # b kept 3 connections of an outage open and gets no lease: a holds all four.
            assert (await b.rebalance(KEY, 4, 4, 3)).share == 0
            # a's part is 2, but only 1 is free of b's open connections.
            assert (await a.rebalance(KEY, 4, 4, 0)).share == 1
            assert (await b.rebalance(KEY, 4, 4, 3)).share == 3
            assert leases_in_redis(redis_server, KEY) == {"a": 1, "b": 3}

    asyncio.run(main())


def test_after_redis_lost_its_data_no_node_grows_above_its_local_share(redis_server: RedisServer) -> None:
    hold_key = f"t:cap:{KEY}:hold"

    async def main() -> None:
        async with started_links(redis_server.url, "ab", lease_ttl=2.0, timeout=1.0) as links:
            a, b = map(CapLeases, links)
            for _ in range(2):
                await a.rebalance(KEY, 4, 4, 0)
                await b.rebalance(KEY, 4, 4, 2)
            with redis_server.client() as c:
                c.flushall()  # as a restart without persistence
                # a published before and finds its want gone: a hold, a at most 4 ÷ 2.
                assert (await a.rebalance(KEY, 4, 4, 0, most=2, seen=True)).share == 2
                assert c.pttl(hold_key) > 0
                # b (2 open, unknown to a until now) is not squeezed out.
                assert (await b.rebalance(KEY, 4, 4, 2, most=2, seen=True)).share == 2
                assert (await b.rebalance(KEY, 4, 0, 0, most=2, seen=True)).share == 0  # b idle
                assert (await a.rebalance(KEY, 4, 4, 0, most=2, seen=True)).share == 2
                # a's rounds go on (as its heartbeat would): 2 until the hold ends, then 4.
                deadline = time.monotonic() + 15
                while c.exists(hold_key):  # lease_ttl + timeout = 3 s
                    assert time.monotonic() < deadline, "the hold outlived lease_ttl + timeout"
                    assert (await a.rebalance(KEY, 4, 4, 0, most=2, seen=True)).share == 2
                    await asyncio.sleep(0.05)
                assert (await a.rebalance(KEY, 4, 4, 0, most=2, seen=True)).share == 4
                # A node back from an outage starts a hold though Redis kept its data.
                await b.rebalance(KEY, 4, 0, 0, back=True)
                assert c.pttl(hold_key) > 0

    asyncio.run(main())
