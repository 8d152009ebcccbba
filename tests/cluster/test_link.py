"""ClusterLink against a real redis-server: nodes count each other through their
liveness records, a dead Redis turns the link degraded (once, with the last count
kept) within the command timeout, and a restarted Redis makes it healthy again by
itself; a stopped node leaves the count at once, a vanished one after lease_ttl."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from engine.cluster.link import ClusterLink
from engine.config.cluster import ClusterConfig
from tests.cluster.conftest import RedisServer


def config(url: str, name: str, **kw: Any) -> ClusterConfig:
    base: dict[str, Any] = {"redis": url, "node_name": name, "key_prefix": "t:",
                            "heartbeat": 0.1, "lease_ttl": 1.0, "timeout": 0.3}
    return ClusterConfig(**{**base, **kw})


async def until(cond: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_key_names_and_node(redis_server: RedisServer) -> None:
    link = ClusterLink(config(redis_server.url, "a"))
    assert link.key("cap", "gmail", "10.0.0.1") == "t:cap:gmail:10.0.0.1"
    assert link.node == "a" and link.live_nodes() == 1 and not link.healthy


def test_nodes_count_each_other_and_leave(redis_server: RedisServer) -> None:
    async def main() -> None:
        links = [ClusterLink(config(redis_server.url, n)) for n in ("a", "b", "c")]
        for link in links:
            await link.start()
        await until(lambda: all(link.live_nodes() == 3 for link in links))
        assert all(link.healthy for link in links)
        # Independently: the liveness set in Redis names the three.
        with redis_server.client() as c:
            assert sorted(c.zrange("t:nodes", 0, -1)) == [b"a", b"b", b"c"]
        await links[2].stop()  # a clean stop leaves at once
        await until(lambda: all(link.live_nodes() == 2 for link in links[:2]))
        # A node that vanishes without stopping (its heartbeat just ends, as with
        # kill -9) drops out once its lease_ttl (1 s) has passed.
        task = links[1]._task
        assert task is not None
        task.cancel()
        await until(lambda: links[0].live_nodes() == 1)
        with redis_server.client() as c:
            assert c.zrange("t:nodes", 0, -1) == [b"a"]
        await links[0].stop()
        await links[1].stop()

    asyncio.run(main())


def test_redis_down_degrades_once_and_rejoins(redis_server: RedisServer) -> None:
    async def main() -> None:
        seen: list[bool] = []
        a, b = ClusterLink(config(redis_server.url, "a")), ClusterLink(config(redis_server.url, "b"))
        a.on_health(seen.append)
        await a.start()
        await b.start()
        await until(lambda: a.live_nodes() == 2)
        assert seen == [True]
        redis_server.kill()
        await until(lambda: not a.healthy)
        # Commands fail within the timeout instead of hanging, and the count seen
        # last is kept for the local shares.
        started = time.monotonic()
        try:
            await a.call(a.redis.ping())
            raise AssertionError("ping answered with Redis killed")
        except Exception as err:  # noqa: BLE001 - any link error will do
            assert not isinstance(err, AssertionError)
        assert time.monotonic() - started < 30  # bounded (not a speed test)
        await until(lambda: not b.healthy)  # several failed heartbeats of a's meanwhile
        assert not a.healthy
        assert a.live_nodes() == 2
        assert seen == [True, False]  # one transition, however many beats failed
        redis_server.start()  # empty: no persistence
        await until(lambda: a.healthy and b.healthy)
        await until(lambda: a.live_nodes() == 2)
        assert seen == [True, False, True]
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_start_with_redis_down_is_degraded_not_fatal(redis_server: RedisServer) -> None:
    async def main() -> None:
        redis_server.kill()
        link = ClusterLink(config(redis_server.url, "a"))
        seen: list[bool] = []
        link.on_health(seen.append)
        await link.start()
        assert not link.healthy and link.live_nodes() == 1
        redis_server.start()
        await until(lambda: link.healthy)
        assert seen == [True]
        await link.stop()

    asyncio.run(main())


def test_nodes_fixture_starts_serve_nodes_on_their_addresses(nodes: Any) -> None:
    started = nodes(2)
    assert [p.listeners[0].rsplit(":", 1)[0] for p in started] == ["127.0.0.20", "127.0.0.21"]
    assert all(p.proc.poll() is None for p in started)
