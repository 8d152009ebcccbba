"""SitePool and PoolManager against scripted sinks on 127.0.0.x: reuse and chaining,
the connection limit, failover, dead-destination backoff, 421, timeouts, idle and
retirement, TLS fallback, and shutdown. Every job must get exactly one result.
"""

from __future__ import annotations

import asyncio
import socket

import trustme

from engine.delivery.connect import client_tls_context
from engine.delivery.job import PoolSettings
from engine.delivery.pool import SitePool
from engine.delivery.pool_manager import PoolManager
from engine.dns.mx import Route
from engine.lab.sink.protocol import NO_REPLY
from tests.integration.test_session import (
    LOCAL_ROUTE,
    Results,
    codes,
    fast_timeouts,
    make_job,
    route,
    run_bounded,
    server_tls,
    settings_for,
    sink_at,
)


def make_pool(settings: PoolSettings, r: Route = LOCAL_ROUTE, t: float = 2.0) -> SitePool:
    return SitePool(r.site_key, settings, fast_timeouts(t),
                    lambda: client_tls_context(settings.tls_verify), asyncio.get_running_loop())


def free_port(host: str) -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_one_connection_carries_many_messages_chained() -> None:
    async def main() -> None:
        sink = await sink_at()
        pool = make_pool(settings_for(sink, max_connections=1))
        results = Results()
        for i in range(50):
            pool.submit(make_job([f"r{i}@d.test", f"s{i}@d.test"], tag=str(i), results=results))
        await results.wait(50)
        assert all(codes(r) == [250, 250] for r in results.by_tag.values())
        assert set(results.count.values()) == {1}
        assert sink.connections == 1 and len(sink.messages) == 50
        first = next(seg for seg in sink.segments if b"MAIL FROM:" in seg)
        assert first.startswith(b"MAIL FROM:") and first.endswith(b"DATA\r\n")  # one segment
        assert any(b"\r\n.\r\nMAIL FROM:" in seg for seg in sink.segments)  # chained
        assert pool.stats.messages_sent == 50 and pool.stats.connections_opened == 1
        await pool.close()
        assert sink.commands[-1][0] == "QUIT"
        await sink.close()

    run_bounded(main)


def test_max_connections_respected() -> None:
    async def main() -> None:
        sink = await sink_at()
        pool = make_pool(settings_for(sink, max_connections=3))
        results = Results()
        for i in range(60):
            pool.submit(make_job([f"r{i}@d.test"], tag=str(i), results=results))
        await results.wait(60)
        assert sink.max_live == 3 and sink.connections == 3  # slow start 2, then +1 per success
        assert pool.stats.connections_open <= 3
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_failover_to_next_host() -> None:
    async def main() -> None:
        sink = await sink_at("127.0.0.3")
        r = route(("mx1.dest.test", ("127.0.0.2",)), ("mx2.dest.test", ("127.0.0.3",)))
        pool = make_pool(settings_for(sink), r)
        results = Results()
        pool.submit(make_job(["a@d.test"], results=results, job_route=r))
        await results.wait(1)
        result = results.by_tag["j"]
        assert codes(result) == [250] and (result.mx_host, result.ip) == ("mx2.dest.test", "127.0.0.3")
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_failover_past_421_greeting() -> None:
    async def main() -> None:
        busy = await sink_at("127.0.0.2", script=lambda v, a: "421 4.7.0 busy" if v == "BANNER" else None)
        good = await sink_at("127.0.0.3", busy.port)
        r = route(("mx.dest.test", ("127.0.0.2", "127.0.0.3")))
        pool = make_pool(settings_for(good), r)
        results = Results()
        pool.submit(make_job(["a@d.test"], results=results, job_route=r))
        await results.wait(1)
        assert codes(results.by_tag["j"]) == [250] and busy.connections == 1
        await pool.close()
        await busy.close()
        await good.close()

    run_bounded(main)


def test_all_addresses_dead_backs_off() -> None:
    async def main() -> None:
        port = free_port("127.0.0.2")
        r = route(("mx1.dest.test", ("127.0.0.2",)), ("mx2.dest.test", ("127.0.0.4",)))
        settings = PoolSettings(port=port, tls="none", backoff=30.0)
        pool = make_pool(settings, r)
        results = Results()
        for i in range(5):
            pool.submit(make_job(["a@d.test", "b@d.test"], tag=str(i), results=results, job_route=r))
        await results.wait(5)
        now = asyncio.get_running_loop().time()
        for result in results.by_tag.values():
            assert all(reply.code // 100 == 4 for reply in result.replies.values())
            assert result.destination_failed and result.retry_after > now + 20
        assert pool.in_backoff and pool.stats.backoff_until > now
        # Answered at once, inside submit: no connection attempt.
        pool.submit(make_job(["c@d.test"], tag="late", results=results, job_route=r))
        assert results.by_tag["late"].destination_failed
        assert pool.stats.connections_opened == 0
        await pool.close()

    run_bounded(main)


def test_tls_required_without_starttls_defers_every_job() -> None:
    async def main() -> None:
        sink = await sink_at()
        pool = make_pool(settings_for(sink, tls="required"))
        results = Results()
        for i in range(3):
            pool.submit(make_job(["a@d.test"], tag=str(i), results=results))
        await results.wait(3)
        for result in results.by_tag.values():
            assert result.replies[0].enhanced == "4.7.4" and result.destination_failed
        assert all(verb != "MAIL" for verb, _ in sink.commands)
        await pool.close()

    run_bounded(main)


def test_421_mid_session_backs_off() -> None:
    async def main() -> None:
        mails = 0

        def script(verb: str, arg: str) -> str | None:
            nonlocal mails
            if verb == "MAIL":
                mails += 1
                if mails == 2:
                    return "421 4.7.0 too much mail from you"
            return None

        sink = await sink_at(script=script)
        pool = make_pool(settings_for(sink, max_connections=1, backoff=30.0))
        results = Results()
        for i in range(4):
            pool.submit(make_job([f"r{i}@d.test"], tag=str(i), results=results))
        await results.wait(4)
        assert codes(results.by_tag["0"]) == [250] and not results.by_tag["0"].destination_failed
        second = results.by_tag["1"]
        assert codes(second) == [421] and second.destination_failed and second.retry_after > 0
        for tag in ("2", "3"):  # queued (or chained) behind the 421: deferred, not lost
            assert all(r.code // 100 == 4 for r in results.by_tag[tag].replies.values())
        assert pool.in_backoff and set(results.count.values()) == {1}
        connections = sink.connections
        pool.submit(make_job(["x@d.test"], tag="late", results=results))
        assert results.by_tag["late"].destination_failed and sink.connections == connections
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_timeout_defers_and_pool_keeps_working() -> None:
    async def main() -> None:
        dots = 0

        def script(verb: str, arg: str) -> str | None:
            nonlocal dots
            if verb == ".":
                dots += 1
                if dots == 1:
                    return NO_REPLY  # the first end of data is never answered
            return None

        sink = await sink_at(script=script)
        pool = make_pool(settings_for(sink, max_connections=1), t=0.25)
        results = Results()
        pool.submit(make_job(["a@d.test"], tag="slow", results=results))
        await results.wait(1)
        slow = results.by_tag["slow"]
        assert slow.replies[0].code == 421 and slow.replies[0].enhanced.startswith("4.4.")
        pool.submit(make_job(["b@d.test"], tag="next", results=results))
        await results.wait(2)
        assert codes(results.by_tag["next"]) == [250] and sink.connections == 2
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_idle_timeout_quits() -> None:
    async def main() -> None:
        sink = await sink_at()
        pool = make_pool(settings_for(sink, idle_timeout=0.2))
        results = Results()
        pool.submit(make_job(["a@d.test"], results=results))
        await results.wait(1)
        await pool.wait_for(lambda p: p.stats.connections_open == 0, 3.0)
        assert sink.commands[-1][0] == "QUIT"
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_max_messages_per_connection_opens_a_new_one() -> None:
    async def main() -> None:
        sink = await sink_at()
        pool = make_pool(settings_for(sink, max_connections=1, max_messages_per_connection=2))
        results = Results()
        for i in range(5):
            pool.submit(make_job([f"r{i}@d.test"], tag=str(i), results=results))
        await results.wait(5)
        assert all(codes(r) == [250] for r in results.by_tag.values())
        assert sink.connections == 3 and sink.max_live == 1
        assert sum(1 for verb, _ in sink.commands if verb == "QUIT") >= 2
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_opportunistic_tls_failure_falls_back_to_plaintext(ca: trustme.CA) -> None:
    async def main() -> None:
        sink = await sink_at(starttls_context=server_tls(trustme.CA()))  # untrusted cert
        settings = settings_for(sink, tls="opportunistic", tls_verify=True)
        pool = SitePool(LOCAL_ROUTE.site_key, settings, fast_timeouts(),
                        lambda: client_tls_context(True), asyncio.get_running_loop())
        results = Results()
        pool.submit(make_job(["a@d.test"], tag="1", results=results))
        await results.wait(1)
        assert codes(results.by_tag["1"]) == [250] and results.by_tag["1"].tls == ""
        assert sink.connections == 2 and not sink.messages[0].tls
        await pool.close()
        await sink.close()

    run_bounded(main)


def test_manager_shares_pools_and_close_answers_everything(ca: trustme.CA) -> None:
    async def main() -> None:
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def script(verb: str, arg: str) -> str | None:
            if verb == ".":
                reached.done() or reached.set_result(None)
            # From the first end of data on, the server hangs: later jobs stay queued.
            return NO_REPLY if reached.done() else None

        sink = await sink_at(starttls_context=server_tls(ca), script=script)
        manager = PoolManager(fast_timeouts(1.0))
        settings = settings_for(sink, max_connections=1, tls="opportunistic")
        r1 = route(("mx.volley.test", ("127.0.0.1",)), domain="one.test")
        r2 = route(("mx.volley.test", ("127.0.0.1",)), domain="two.test")
        assert manager.pool_for(r1, settings) is manager.pool_for(r2, settings)
        results = Results()
        for i in range(6):
            manager.submit(make_job([f"r{i}@d.test"], tag=str(i), results=results,
                                    job_route=r1 if i % 2 else r2), settings)
        await reached
        await manager.close(grace=0.1)
        await results.wait(6)
        assert set(results.count.values()) == {1}
        deferred = [r for r in results.by_tag.values() if r.replies[next(iter(r.replies))].enhanced == "4.3.2"]
        assert len(deferred) >= 4  # the queued ones; the held one was aborted
        assert not any(r.attempted for r in deferred)  # handed back unsent: no attempt
        assert all(code // 100 == 4 for r in results.by_tag.values() for code in codes(r)), results.by_tag
        manager.submit(make_job(["z@d.test"], tag="after", results=results), settings)
        assert results.by_tag["after"].replies[0].enhanced == "4.3.2"
        assert not results.by_tag["after"].attempted
        await sink.close()

    run_bounded(main)



def test_idle_pool_is_dropped_and_the_site_still_delivers() -> None:
    """A pool with no session, job or backoff for its idle_timeout leaves the manager
    (its counters stay in the totals); the next message to the site makes a new pool."""
    async def main() -> None:
        sink = await sink_at("127.0.0.4")
        r = route(("mx.dest.test", ("127.0.0.4",)))
        manager = PoolManager(fast_timeouts(1.0), sweep_interval=0.05)
        settings = settings_for(sink, idle_timeout=0.2)
        results = Results()
        manager.submit(make_job(["a@d.test"], tag="first", results=results, job_route=r), settings)
        await results.wait(1)
        first = manager.pool_for(r, settings)
        # The session QUITs after idle_timeout; the empty pool goes idle_timeout later.
        await manager.wait_for(lambda m: not m.pools, 5.0)
        assert sink.commands[-1][0] == "QUIT"
        assert manager.connections_opened == 1 and manager.bytes_sent > 0
        manager.submit(make_job(["b@d.test"], tag="again", results=results, job_route=r), settings)
        await results.wait(2)
        assert codes(results.by_tag["again"]) == [250]
        assert manager.pool_for(r, settings) is not first
        assert manager.connections_opened == 2 and sink.connections == 2
        await manager.close()
        await sink.close()

    run_bounded(main)
