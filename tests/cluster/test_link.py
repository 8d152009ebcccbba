"""ClusterLink against a real redis-server: nodes count each other through their
liveness records, a dead Redis turns the link degraded (once, with the last count
kept) within the command timeout, and a restarted Redis makes it healthy again by
itself; a stopped node leaves the count at once, a vanished one after lease_ttl."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from engine.cluster import link as link_module
from engine.cluster.link import ClusterLink, stop_tasks
from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import config, started_links, until


def test_key_names_and_node(redis_server: RedisServer) -> None:
    link = ClusterLink(config(redis_server.url, "a"))
    assert link.key("cap", "gmail", "10.0.0.1") == "t:cap:gmail:10.0.0.1"
    assert link.node == "a" and link.live_nodes() == 1 and not link.healthy


def test_nodes_count_each_other_and_leave(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with started_links(redis_server.url, "abc") as links:
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


def test_a_cancel_arriving_with_a_reply_still_stops_the_heartbeat(redis_server: RedisServer) -> None:
    # The reply and the stop's cancel in one loop turn: a command run under
    # asyncio.wait_for in Python 3.11 would return the reply and lose the cancel, and
    # the heartbeat would go on for ever (a stop awaiting it, too).
    async def main() -> None:
        link = ClusterLink(config(redis_server.url, "a"))
        reply = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(link.call(reply))
        await asyncio.sleep(0)
        reply.set_result(b"PONG")
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert done and task.cancelled()
        await link.stop()

    asyncio.run(main())


def test_stop_ends_a_task_that_loses_its_cancel_and_gives_up_on_one_that_never_ends(
        monkeypatch: Any) -> None:
    async def forgetful(lost: list[int]) -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not lost:
                    raise
                lost.pop()  # this cancel vanishes, as inside a library's await

    async def main() -> None:
        task = asyncio.create_task(forgetful([1, 1]))
        await asyncio.sleep(0)
        started = time.monotonic()
        await stop_tasks([task])
        assert task.cancelled()
        assert time.monotonic() - started < link_module.STOP_WITHIN
        # One that never ends: the stop returns after STOP_WITHIN all the same.
        monkeypatch.setattr(link_module, "STOP_WITHIN", 0.3)
        lost = [1] * 1000
        stuck = asyncio.create_task(forgetful(lost))
        await asyncio.sleep(0)
        started = time.monotonic()
        await stop_tasks([stuck])
        assert not stuck.done() and time.monotonic() - started < 5
        lost.clear()  # leave the loop clean
        stuck.cancel()
        await asyncio.wait({stuck}, timeout=1.0)
        assert stuck.cancelled()

    asyncio.run(main())
