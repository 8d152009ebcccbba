"""A SitePool's rate limit (token bucket) and its settings changed while it runs, against
a real sink on 127.0.0.2. Time is only ever bounded from below (the bucket's spacing),
never from above."""

from __future__ import annotations

import time

import msgspec

from engine.delivery.job import PoolSettings
from engine.delivery.pool import SitePool
from tests.integration.test_pool import make_pool as pool_at
from tests.integration.test_session import (
    Results,
    codes,
    make_job,
    route,
    run_bounded,
    settings_for,
    sink_at,
)

DEST = route(("mx.dest.test", ("127.0.0.2",)))


def make_pool(settings: PoolSettings) -> SitePool:
    return pool_at(settings, DEST, 5.0)


class Transactions:
    """Sink script: when each message arrived, and how many connections were inside a
    transaction (MAIL seen, end of data not yet) at once."""

    def __init__(self) -> None:
        self.arrived: list[float] = []
        self.active = 0
        self.most = 0

    def script(self, verb: str, arg: str) -> None:
        if verb == "MAIL":
            self.active += 1
            self.most = max(self.most, self.active)
        elif verb == ".":
            self.active -= 1
            self.arrived.append(time.monotonic())
        return None


def test_rate_spaces_messages_by_the_bucket() -> None:
    rate, n = 10.0, 8  # at 10 msgs/s or less the burst is one message

    async def main() -> None:
        seen = Transactions()
        sink = await sink_at("127.0.0.2", script=seen.script)
        started = time.monotonic()
        pool = make_pool(settings_for(sink, max_connections=3, rate=rate))
        results = Results()
        for i in range(n):
            pool.submit(make_job([f"r{i}@dest.test"], tag=str(i), results=results, job_route=DEST))
        await results.wait(n, timeout=30)
        assert all(codes(r) == [250] for r in results.by_tag.values())
        assert len(sink.messages) == n
        # The k-th message to arrive needed k tokens after the first: it cannot have
        # been handed to a session before started + k / rate.
        for k, at in enumerate(sorted(seen.arrived)):
            assert at - started >= k / rate - 1e-3, (k, at - started)
        await pool.close()

    run_bounded(main, deadline=60)


def test_rate_set_on_a_running_pool_applies_to_later_jobs() -> None:
    rate, n = 5.0, 5

    async def main() -> None:
        seen = Transactions()
        sink = await sink_at("127.0.0.2", script=seen.script)
        settings = settings_for(sink, max_connections=2)
        pool = make_pool(settings)
        results = Results()
        pool.submit(make_job(["first@dest.test"], tag="first", results=results, job_route=DEST))
        await results.wait(1, timeout=30)
        started = time.monotonic()
        pool.update_settings(msgspec.structs.replace(settings, rate=rate))
        for i in range(n):
            pool.submit(make_job([f"r{i}@dest.test"], tag=str(i), results=results, job_route=DEST))
        await results.wait(n + 1, timeout=30)
        later = sorted(seen.arrived)[1:]
        assert len(later) == n
        for k, at in enumerate(later):  # a fresh bucket holds one message
            assert at - started >= k / rate - 1e-3, (k, at - started)
        await pool.close()

    run_bounded(main, deadline=60)


def test_update_settings_raises_max_connections() -> None:
    async def main() -> None:
        sink = await sink_at("127.0.0.2")
        settings = settings_for(sink, max_connections=1)
        pool = make_pool(settings)
        results = Results()
        for i in range(30):
            pool.submit(make_job([f"a{i}@dest.test"], tag=f"a{i}", results=results, job_route=DEST))
        await results.wait(30, timeout=30)
        assert sink.max_live == 1
        pool.update_settings(msgspec.structs.replace(settings, max_connections=3))
        for i in range(60):
            pool.submit(make_job([f"b{i}@dest.test"], tag=f"b{i}", results=results, job_route=DEST))
        await results.wait(90, timeout=30)
        assert sink.max_live == 3  # slow start grows to the new maximum
        assert pool.stats.concurrency_limit == 3
        await pool.close()

    run_bounded(main, deadline=60)


def test_update_settings_lowers_max_connections_busy_sessions_retire() -> None:
    async def main() -> None:
        seen = Transactions()
        sink = await sink_at("127.0.0.2", script=seen.script)
        # Long idle timeout: sessions over the new limit must go because of it, not idleness.
        settings = settings_for(sink, max_connections=3, idle_timeout=120.0)
        pool = make_pool(settings)
        results = Results()
        for i in range(200):
            pool.submit(make_job([f"a{i}@dest.test"], tag=f"a{i}", results=results, job_route=DEST))
        await pool.wait_for(lambda p: p.stats.connections_open == 3, 30)
        pool.update_settings(msgspec.structs.replace(settings, max_connections=1))
        assert pool.stats.concurrency_limit == 1
        await results.wait(200, timeout=30)
        await pool.wait_for(lambda p: p.stats.connections_open == 1, 30)
        connections = sink.connections
        seen.most = seen.active
        for i in range(30):
            pool.submit(make_job([f"b{i}@dest.test"], tag=f"b{i}", results=results, job_route=DEST))
        await results.wait(230, timeout=30)
        assert seen.most == 1  # one transaction at a time from now on
        assert sink.connections == connections  # and on the one session left
        assert len(sink.messages) == 230
        await pool.close()

    run_bounded(main, deadline=90)
