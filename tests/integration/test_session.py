"""DeliverySession against the scripted sink on loopback: setup (greeting, EHLO/HELO,
STARTTLS, AUTH), one transaction's per-recipient outcomes, chaining, BDAT, and every
failure path giving each job exactly one result.

Each test runs its own uvloop loop under a hard deadline (`run_bounded`); nothing
synchronises with sleeps: tests await results, the sink's `wait_for`, or closures.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trustme
import uvloop

from engine.config import TimeoutsConfig
from engine.delivery import connect
from engine.delivery.connect import client_tls_context
from engine.delivery.dialogue import SetupError
from engine.delivery.job import Job, JobResult, PoolSettings
from engine.delivery.session import DeliverySession
from engine.dns.mx import Route, RouteHost
from engine.lab.sink.protocol import NO_REPLY, Sink, start_sink
from engine.queue.records import MessageRecord, Recipient

T = TypeVar("T")
DEADLINE = 10.0
BODY = b"Subject: test\r\n\r\n" + b"x" * 1000 + b"\r\n"


_OPEN: list[Sink] = []


async def sink_at(*args: Any, **kw: Any) -> Sink:
    """`start_sink`, closed by `run_bounded` even when the test fails (an unclosed
    server turns into a ResourceWarning error that can wedge the loop's close)."""
    sink = await start_sink(*args, **kw)
    _OPEN.append(sink)
    return sink


def run_bounded(factory: Callable[[], Awaitable[T]], deadline: float = DEADLINE) -> T:
    async def bounded() -> T:
        try:
            return await asyncio.wait_for(factory(), deadline)
        finally:
            while _OPEN:
                await _OPEN.pop().close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


def route(*hosts: tuple[str, tuple[str, ...]], domain: str = "dest.test") -> Route:
    rh = tuple(RouteHost(name, 10 * (n + 1), addrs) for n, (name, addrs) in enumerate(hosts))
    return Route(domain, rh, ",".join(sorted(name for name, _ in hosts)))


LOCAL_ROUTE = route(("mx.volley.test", ("127.0.0.1",)))


class Results:
    """Collects JobResults by job tag; `wait(n)` returns when n have arrived."""

    def __init__(self) -> None:
        self.by_tag: dict[str, JobResult] = {}
        self.count: dict[str, int] = {}
        self._event = asyncio.Event()

    def done_for(self, tag: str) -> Callable[[JobResult], None]:
        def done(result: JobResult) -> None:
            self.count[tag] = self.count.get(tag, 0) + 1
            self.by_tag[tag] = result
            self._event.set()
        return done

    async def wait(self, n: int, timeout: float = 5.0) -> None:
        async def wait() -> None:
            while len(self.by_tag) < n:
                self._event.clear()
                await self._event.wait()
        await asyncio.wait_for(wait(), timeout)


def make_job(rcpts: list[str], *, tag: str = "j", results: Results | None = None,
             body: bytes = BODY, job_route: Route = LOCAL_ROUTE,
             sender: str = "sender@src.test") -> Job:
    record = MessageRecord(id=tag.encode(), sender=sender,
                           recipients=[Recipient(a) for a in rcpts],
                           received_at=0.0, size=len(body))
    done = results.done_for(tag) if results is not None else (lambda r: None)
    return Job(record, body, list(range(len(rcpts))), job_route.domain, job_route, done, 0.0)


def fast_timeouts(t: float = 2.0) -> TimeoutsConfig:
    return TimeoutsConfig(connect=t, greeting=t, ehlo=t, starttls=t, auth=t, mail=t, rcpt=t,
                          data=t, data_block=t, data_end=t, quit=t)  # type: ignore[arg-type]


def settings_for(sink: Sink, **kw: object) -> PoolSettings:
    base: dict[str, object] = {"port": sink.port, "tls": "none", "helo_name": "client.test"}
    base.update(kw)
    return PoolSettings(**base)  # type: ignore[arg-type]


async def open_session(sink: Sink, ctx: ssl.SSLContext | None = None, *,
                       timeouts: TimeoutsConfig | None = None, **kw: object) -> DeliverySession:
    return await connect.open_session(
        "mx.volley.test", "127.0.0.1", sink.port, settings_for(sink, **kw),
        timeouts or fast_timeouts(), ctx)


def codes(result: JobResult) -> list[int]:
    return [result.replies[i].code for i in sorted(result.replies)]


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.volley.test", "127.0.0.1").configure_cert(ctx)
    return ctx


def verifying_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_tls_context(True)
    ca.configure_trust(ctx)
    return ctx


# --- one transaction -----------------------------------------------------------------
def test_per_recipient_outcomes() -> None:
    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and "bad" in arg:
            return "550 5.1.1 no such user"
        if verb == "RCPT" and "later" in arg:
            return "451 4.2.0 try later"
        return None

    async def main() -> None:
        sink = await sink_at(script=script)
        session = await open_session(sink, source_address="127.0.0.5")
        assert session.transport is not None
        assert session.transport.get_extra_info("sockname")[0] == "127.0.0.5"
        result = await session.run(make_job(["a@d.test", "bad@d.test", "later@d.test", "b@d.test"]))
        assert codes(result) == [250, 550, 451, 250]
        assert result.replies[1].enhanced == "5.1.1"
        assert result.mx_host == "mx.volley.test" and result.ip == "127.0.0.1" and result.tls == ""
        assert sink.messages[0].rcpt_tos == ["a@d.test", "b@d.test"]
        assert sink.messages[0].data == BODY
        # MAIL, every RCPT and DATA went out in one write and arrived in one read.
        assert any(seg.startswith(b"MAIL FROM:") and seg.endswith(b"DATA\r\n") and seg.count(b"RCPT") == 4
                   for seg in sink.segments)
        await session.quit()
        assert sink.commands[-1][0] == "QUIT"
        await sink.close()

    run_bounded(main)


def test_all_recipients_refused_sends_lone_dot() -> None:
    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT":
            return "550 5.1.1 no" if "x" in arg else "551 5.1.6 moved"
        if verb == "DATA":
            return "354 go ahead anyway"  # RFC 2920 §3.1: the client must send a lone dot
        return None

    async def main() -> None:
        sink = await sink_at(script=script)
        session = await open_session(sink)
        result = await session.run(make_job(["x@d.test", "y@d.test"]))
        assert [(r.code, r.enhanced) for r in result.replies.values()] == [(550, "5.1.1"), (551, "5.1.6")]
        assert b"DATA\r\n.\r\n" in b"".join(sink.segments) and BODY not in b"".join(sink.segments)
        # The connection is still good for the next message.
        ok = await session.run(make_job(["z@d.test"], body=b"hi\r\n"))
        assert codes(ok) == [551]  # scripted
        await session.quit()
        await sink.close()

    run_bounded(main)


def test_run_many_chains_end_of_data_and_next_mail() -> None:
    async def main() -> None:
        sink = await sink_at()
        session = await open_session(sink)
        results = await session.run_many([make_job([f"r{i}@d.test"], tag=str(i)) for i in range(10)])
        assert all(codes(r) == [250] for r in results)
        assert len(sink.messages) == 10 and sink.connections == 1
        assert any(b"\r\n.\r\nMAIL FROM:" in seg for seg in sink.segments)
        assert session.messages == 10
        # No RSET at all: the first message needs none, later ones follow clean ones.
        assert all(verb != "RSET" for verb, _ in sink.commands)
        await session.quit()
        await sink.close()

    run_bounded(main)


def test_bdat_when_chunking_is_offered() -> None:
    async def main() -> None:
        sink = await sink_at(chunking=True)
        session = await open_session(sink)
        results = await session.run_many([make_job(["a@d.test"], tag="1"), make_job(["b@d.test"], tag="2")])
        assert [codes(r) for r in results] == [[250], [250]]
        assert [m.data for m in sink.messages] == [BODY, BODY]
        assert any(verb == "BDAT" and arg == f"{len(BODY)} LAST" for verb, arg in sink.commands)
        assert all(verb != "DATA" for verb, _ in sink.commands)
        await session.quit()
        await sink.close()

    run_bounded(main)


def test_helo_fallback_when_ehlo_refused() -> None:
    async def main() -> None:
        sink = await sink_at(script=lambda v, a: "502 5.5.1 EHLO? never heard" if v == "EHLO" else None)
        session = await open_session(sink)
        assert not session.caps.pipelining
        result = await session.run(make_job(["a@d.test", "b@d.test"]))  # lockstep
        assert codes(result) == [250, 250]
        assert ("HELO", "client.test") in sink.commands
        await session.quit()
        await sink.close()

    run_bounded(main)


# --- setup failures ------------------------------------------------------------------
@pytest.mark.parametrize(("banner", "code", "enhanced"), [
    ("421 4.7.0 busy, come back later", 421, "4.7.0"),
    ("554 5.7.1 go away", 421, "4.4.1"),  # a 5xx greeting defers, never bounces
])
def test_refused_greeting(banner: str, code: int, enhanced: str) -> None:
    async def main() -> None:
        sink = await sink_at(script=lambda v, a: banner if v == "BANNER" else None)
        with pytest.raises(SetupError) as info:
            await open_session(sink)
        assert info.value.kind == "greeting"
        assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)
        await sink.close()

    run_bounded(main)


def test_starttls_opportunistic(ca: trustme.CA) -> None:
    async def main() -> None:
        sink = await sink_at(starttls_context=server_tls(ca))
        session = await open_session(sink, client_tls_context(False), tls="opportunistic")
        result = await session.run(make_job(["a@d.test"]))
        assert result.tls.startswith("TLS") and codes(result) == [250]
        assert sink.messages[0].tls
        await session.quit()
        await sink.close()

    run_bounded(main)


def test_tls_required_without_starttls_defers_474() -> None:
    async def main() -> None:
        sink = await sink_at()
        with pytest.raises(SetupError) as info:
            await open_session(sink, client_tls_context(False), tls="required")
        assert info.value.reply.code == 454 and info.value.reply.enhanced == "4.7.4"
        assert all(verb != "MAIL" for verb, _ in sink.commands)
        await sink.close()

    run_bounded(main)


def test_tls_required_handshake_failure_defers_475(ca: trustme.CA) -> None:
    async def main() -> None:
        sink = await sink_at(starttls_context=server_tls(trustme.CA()))  # unknown CA
        with pytest.raises(SetupError) as info:
            await open_session(sink, verifying_client(ca), tls="required", tls_verify=True)
        assert (info.value.kind, info.value.reply.enhanced) == ("tls_failed", "4.7.5")
        await sink.close()

    run_bounded(main)


def test_auth_only_after_tls(ca: trustme.CA) -> None:
    async def main() -> None:
        users = {"relay": "s3cret"}
        sink = await sink_at(starttls_context=server_tls(ca), auth=users)
        session = await open_session(sink, verifying_client(ca), tls="required", tls_verify=True,
                                     auth_user="relay", auth_password="s3cret")
        result = await session.run(make_job(["a@d.test"]))
        assert codes(result) == [250] and sink.auth_users == ["relay"]
        await session.quit()
        # Wrong password: a 454 deferral quoting the 535, never a bounce.
        with pytest.raises(SetupError) as info:
            await open_session(sink, verifying_client(ca), tls="required", tls_verify=True,
                               auth_user="relay", auth_password="wrong")
        assert info.value.reply.code == 454 and "535" in str(info.value.reply.text)
        await sink.close()
        # A smarthost without STARTTLS never sees the credentials.
        plain = await sink_at(auth=users)
        with pytest.raises(SetupError) as info:
            await open_session(plain, client_tls_context(False), tls="opportunistic",
                               auth_user="relay", auth_password="s3cret")
        assert info.value.reply.enhanced == "4.7.4"
        assert all(verb != "AUTH" for verb, _ in plain.commands)
        await plain.close()

    run_bounded(main)


# --- failures mid-transaction ---------------------------------------------------------
def test_malformed_reply_defers_and_closes() -> None:
    async def main() -> None:
        sink = await sink_at(script=lambda v, a: "hello there" if v == "RCPT" and "b@" in a else None)
        session = await open_session(sink)
        result = await session.run(make_job(["a@d.test", "b@d.test"]))
        assert [(r.code, r.enhanced) for r in result.replies.values()] == [(451, "4.5.0")] * 2
        await session.wait_closed()
        assert session.closed
        await sink.close()

    run_bounded(main)


def test_overlong_reply_defers() -> None:
    async def main() -> None:
        sink = await sink_at(script=lambda v, a: "250 " + "x" * 5000 if v == "MAIL" else None)
        session = await open_session(sink)
        result = await session.run(make_job(["a@d.test"]))
        assert result.replies[0].code == 451 and "too long" in str(result.replies[0].text)
        await session.wait_closed()
        await sink.close()

    run_bounded(main)


def test_connection_lost_keeps_decided_replies() -> None:
    async def main() -> None:
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def script(verb: str, arg: str) -> str | None:
            if verb == "RCPT" and "bad" in arg:
                return "550 5.1.1 no"
            if verb == ".":
                reached.done() or reached.set_result(None)
                return NO_REPLY
            return None

        sink = await sink_at(script=script)
        session = await open_session(sink)
        pending = asyncio.ensure_future(session.run(make_job(["a@d.test", "bad@d.test"])))
        await reached
        await sink.close()  # drops the connection while the end of data is unanswered
        result = await pending
        assert [(r.code, r.enhanced) for r in result.replies.values()] == [(451, "4.4.2"), (550, "5.1.1")]

    run_bounded(main)


def test_timeout_waiting_for_end_of_data() -> None:
    async def main() -> None:
        sink = await sink_at(script=lambda v, a: NO_REPLY if v == "." else None)
        session = await open_session(sink, timeouts=fast_timeouts(0.25))
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await session.run(make_job(["a@d.test"]))
        # data_end + one data-block allowance: 0.5 s.
        assert 0.4 < loop.time() - started < 3.0
        assert result.replies[0].code == 421 and result.replies[0].enhanced == "4.4.1"
        await session.wait_closed()
        await sink.close()

    run_bounded(main)


def test_jobs_given_to_a_closed_session_still_get_results() -> None:
    async def main() -> None:
        sink = await sink_at()
        session = await open_session(sink)
        await session.quit()
        result = await session.run(make_job(["a@d.test"]))
        assert result.replies[0].code == 451 and result.replies[0].enhanced == "4.4.2"
        await sink.close()

    run_bounded(main)


def test_failure_mid_chain_answers_every_job() -> None:
    async def main() -> None:
        hung = False

        def script(verb: str, arg: str) -> str | None:
            nonlocal hung
            hung = hung or verb == "."
            return NO_REPLY if hung else None  # hangs from the first end of data on

        sink = await sink_at(script=script)
        session = await open_session(sink, timeouts=fast_timeouts(0.1))
        results = await session.run_many([make_job(["a@d.test", "b@d.test"], tag=str(i)) for i in range(3)])
        # The head timed out with the second chained behind it; the third never started.
        assert [codes(r) for r in results[:2]] == [[421, 421], [421, 421]]
        assert [r.enhanced for r in results[2].replies.values()] == ["4.4.2", "4.4.2"]
        assert any(b"\r\n.\r\nMAIL FROM:" in seg for seg in sink.segments)

    run_bounded(main)


def test_big_bodies_under_flow_control() -> None:
    async def main() -> None:
        sink = await sink_at(keep_segments=False)
        session = await open_session(sink)
        big = [(b"line %d " % i + b"y" * 70 + b"\r\n") * 60000 for i in range(3)]  # ~4.7 MB each
        results = await session.run_many(
            [make_job([f"r{i}@d.test"], tag=str(i), body=body) for i, body in enumerate(big)])
        assert [codes(r) for r in results] == [[250]] * 3
        assert [m.data for m in sink.messages] == big
        await session.quit()

    run_bounded(main)


def test_verified_tls_checks_the_mx_name(ca: trustme.CA) -> None:
    """tls_verify: the certificate must name the MX host we connected to (SNI and
    hostname check both use it); a valid certificate for another name is refused."""
    async def main() -> None:
        sink = await sink_at(starttls_context=server_tls(ca))  # cert for mx.volley.test
        with pytest.raises(SetupError) as info:
            await connect.open_session(
                "other.volley.test", "127.0.0.1", sink.port,
                settings_for(sink, tls="required", tls_verify=True), fast_timeouts(),
                verifying_client(ca))
        assert info.value.kind == "tls_failed"
        session = await open_session(sink, verifying_client(ca), tls="required", tls_verify=True)
        assert session.tls_version.startswith("TLS")
        await session.quit()
        await sink.close()

    run_bounded(main)
