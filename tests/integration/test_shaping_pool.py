"""Site pools under [[shaping]] settings, in one process against real sinks: jobs leave
by priority, a job over max_recipients goes as several transactions, and the pools of
one provider (different MX sites) share its connection cap and its rate."""

from __future__ import annotations

import asyncio
import time

from engine.delivery.job import JobResult
from engine.delivery.pool_manager import PoolManager
from engine.delivery.pool_queue import JobQueue, merge_results, split_job
from engine.lab.sink.protocol import start_sinks
from engine.smtp.replies import Reply
from tests.integration.test_pool import free_port, make_pool
from tests.integration.test_session import (
    Results,
    codes,
    fast_timeouts,
    make_job,
    route,
    run_bounded,
    settings_for,
    sink_at,
)
from tests.unit.test_shared_limits import most_in_window


def test_queue_is_by_priority_then_arrival() -> None:
    q = JobQueue()
    prios = [1, 5, 9, 5, 0, 9, 5]
    for n, p in enumerate(prios):
        job = make_job([f"r{n}@dest.test"], tag=f"{p}-{n}")
        job.record.priority = p
        q.push(job)
    order = [q.pop().record.id.decode() for _ in prios]
    assert order == ["9-2", "9-5", "5-1", "5-3", "5-6", "1-0", "0-4"]


def test_split_job_answers_once_with_every_reply() -> None:
    got: list[JobResult] = []
    job = make_job([f"r{i}@dest.test" for i in range(5)])
    job.done = got.append
    parts = split_job(job, 2)
    assert [p.indices for p in parts] == [[0, 1], [2, 3], [4]]
    for p in parts:
        p.done(JobResult({i: Reply(250, "2.0.0", "ok") for i in p.indices}, mx_host="mx"))
    assert len(got) == 1 and sorted(got[0].replies) == [0, 1, 2, 3, 4]
    assert split_job(job, 0) == [job] and split_job(job, 5) == [job]
    assert merge_results([JobResult({}, attempted=False)]).attempted is False


def test_pool_sends_higher_priority_first() -> None:
    async def main() -> None:
        sink = await sink_at("127.0.0.2")
        dest = route(("mx.dest.test", ("127.0.0.2",)))
        pool = make_pool(settings_for(sink, max_connections=1), dest)
        results = Results()
        prios = [1, 5, 9, 5, 0, 9]
        for n, p in enumerate(prios):
            job = make_job([f"r{n}@dest.test"], tag=f"{p}-{n}", results=results, job_route=dest)
            job.record.priority = p
            pool.submit(job)  # all queued before the one connection is up
        await results.wait(len(prios))
        arrived = [m.rcpt_tos[0] for m in sink.messages]
        assert arrived == ["r2@dest.test", "r5@dest.test", "r1@dest.test", "r3@dest.test",
                           "r0@dest.test", "r4@dest.test"]
        await pool.close()

    run_bounded(main)


def test_max_recipients_splits_into_transactions() -> None:
    async def main() -> None:
        sink = await sink_at("127.0.0.2")
        dest = route(("mx.dest.test", ("127.0.0.2",)))
        pool = make_pool(settings_for(sink, max_connections=1, max_recipients=2), dest)
        results = Results()
        pool.submit(make_job([f"r{i}@dest.test" for i in range(5)], tag="big",
                             results=results, job_route=dest))
        await results.wait(1)
        assert codes(results.by_tag["big"]) == [250] * 5
        assert results.count["big"] == 1
        assert sorted(len(m.rcpt_tos) for m in sink.messages) == [1, 2, 2]
        await pool.close()

    run_bounded(main)


class Sessions:
    """Sink script: sessions between the banner and QUIT (the client holds its
    connection token over all of that), their peak, and when messages arrived."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.arrived: list[float] = []

    def script(self, verb: str, arg: str) -> None:
        if verb == "BANNER":
            self.active += 1
            self.peak = max(self.peak, self.active)
        elif verb == "QUIT":
            self.active -= 1
        elif verb == ".":
            self.arrived.append(time.monotonic())
        return None


def test_pools_of_one_provider_share_its_connection_cap_and_rate() -> None:
    """Three MX sites (three pools), one provider capped at 2 connections and 20/s."""
    rate, n = 20.0, 40
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

    async def main() -> None:
        seen = Sessions()
        port = free_port("127.0.0.2")
        sink = await start_sinks([(h, port) for h in hosts], script=seen.script)
        manager = PoolManager(fast_timeouts(), asyncio.get_running_loop())
        settings = settings_for(sink, max_connections=4, provider="mx:.provider.test",
                                provider_connections=2, provider_rate=rate)
        results = Results()
        for i in range(n):
            r = route((f"mx{i % 3}.provider.test", (hosts[i % 3],)), domain=f"d{i % 3}.test")
            manager.submit(make_job([f"u{i}@d{i % 3}.test"], tag=str(i), results=results,
                                    job_route=r), settings)
        assert len(manager.pools) == 3
        await results.wait(n, timeout=20)
        assert all(codes(r) == [250] for r in results.by_tag.values())
        assert seen.peak <= 2
        assert manager.gates.gates["mx:.provider.test"].held <= 2
        # GCRA at 20/s (burst 2): never more than the rate allows plus the burst.
        for window in (0.1, 0.5, 1.0):
            assert most_in_window(seen.arrived, window) <= rate * window + 2, window
        await manager.close()
        await sink.close()

    run_bounded(main, deadline=30)


def test_connect_rate_spaces_new_connections() -> None:
    """connect_rate 5/s (burst 1): the k-th connection no sooner than k/5 s after the
    start; max_messages_per_connection 1 makes every message need a new one."""
    n, per_second = 5, 5.0

    async def main() -> None:
        opened: list[float] = []

        def script(verb: str, arg: str) -> None:
            if verb == "BANNER":
                opened.append(time.monotonic())
            return None

        sink = await sink_at("127.0.0.2", script=script)
        dest = route(("mx.dest.test", ("127.0.0.2",)))
        manager = PoolManager(fast_timeouts(), asyncio.get_running_loop())
        settings = settings_for(sink, max_connections=4, max_messages_per_connection=1,
                                provider="slow", provider_connect_rate=per_second)
        results = Results()
        started = time.monotonic()  # the first grant comes after this
        for i in range(n):
            manager.submit(make_job([f"r{i}@dest.test"], tag=str(i), results=results,
                                    job_route=dest), settings)
        await results.wait(n, timeout=20)
        assert all(codes(r) == [250] for r in results.by_tag.values())
        assert len(opened) == n
        # Granted k intervals after the first grant; connected (banner) after the grant.
        for k, at in enumerate(sorted(opened)):
            assert at - started >= k / per_second - 1e-3, (k, at - started)
        await manager.close()

    run_bounded(main, deadline=30)
