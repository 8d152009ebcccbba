"""The load generator against the scripted sink: counts, sizes, and how commands are grouped.

Each test runs its own uvloop event loop under a hard deadline (`_run`), so a bug that
would hang fails in seconds instead.
"""

from __future__ import annotations

import asyncio
import re
from typing import Awaitable, Callable, TypeVar

import pytest
import uvloop

from engine.blast import BlastOptions, Report, run
from engine.blast_protocol import make_message
from tests.peers.smtp_sink import Sink, start_sink

T = TypeVar("T")
_DEADLINE = 10.0  # generous per test; each normally takes well under a second


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), _DEADLINE)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


async def _blast(sink: Sink, **kw: object) -> Report:
    return await run(BlastOptions(port=sink.port, timeout=3.0, **kw))  # type: ignore[arg-type]


def _command_segments(sink: Sink) -> list[bytes]:
    return [seg for seg in sink.segments if b"MAIL FROM:" in seg or b"RCPT TO:" in seg]


@pytest.mark.parametrize("size", [300, 1024, 5000])
def test_message_bytes_have_exact_size_and_need_no_stuffing(size: int) -> None:
    data = make_message(size)
    assert len(data) == size
    assert data.endswith(b"\r\n")
    assert b"\r\n." not in data and not data.startswith(b".")
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))


def test_pipelined_sessions_send_mail_rcpt_data_in_one_segment() -> None:
    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink()
        try:
            report = await _blast(sink, messages=200, concurrency=5, size=1024,
                                  recipients=2, domains=3)
            return sink, report
        finally:
            await sink.close()

    sink, report = _run(scenario)
    assert len(sink.messages) == 200
    assert {len(m.data) for m in sink.messages} == {1024}
    assert all(m.mail_from == "blast@volley.test" for m in sink.messages)
    domains = {r.split("@")[1] for m in sink.messages for r in m.rcpt_tos}
    assert domains == {"d0.example", "d1.example", "d2.example"}
    assert all(len(set(m.rcpt_tos)) == 2 for m in sink.messages)
    segments = _command_segments(sink)
    assert len(segments) == 200  # one segment per transaction...
    for seg in segments:  # ...holding exactly MAIL, RCPT, RCPT, DATA
        assert re.fullmatch(rb"MAIL FROM:<[^>]*>\r\n(RCPT TO:<[^>]*>\r\n){2}DATA\r\n", seg), seg
    assert (report.attempted, report.sent, report.accepted) == (200, 200, 200)
    assert (report.failed, report.unsent, report.refused, report.errors) == (0, 0, {}, {})
    assert report.connections == sink.connections == 5
    assert report.msgs_per_s > 0 and 0 < report.latency_ms.p50 <= report.latency_ms.max


@pytest.mark.parametrize("offered", [True, False], ids=["not-asked", "not-offered"])
def test_lock_step_sends_one_command_per_segment(offered: bool) -> None:
    # Lock-step either because the client was told not to pipeline, or because the
    # server does not advertise PIPELINING (RFC 2920: the client must not then).
    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink(pipelining=offered)
        try:
            return sink, await _blast(sink, messages=200, concurrency=5, size=700,
                                      pipelining=not offered)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    assert len(sink.messages) == 200
    assert {len(m.data) for m in sink.messages} == {700}
    commands = [seg for seg in sink.segments if seg.endswith(b"\r\n") and len(seg) < 100]
    assert all(seg.count(b"\r\n") == 1 for seg in commands)
    assert len(_command_segments(sink)) == 400  # MAIL and RCPT apart, every message
    assert (report.sent, report.accepted, report.failed, report.refused) == (200, 200, 0, {})


@pytest.mark.parametrize("pipelining", [True, False])
def test_refusals_are_counted_by_code(pipelining: bool) -> None:
    ends = 0

    def script(verb: str, arg: str) -> str | None:
        nonlocal ends
        if verb == "RCPT" and "@d1.example" in arg:
            return "550 5.1.1 no such user"
        if verb == ".":
            ends += 1
            return "451 4.3.0 try later" if ends % 3 == 0 else None
        return None

    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink(script=script)
        try:
            return sink, await _blast(sink, messages=200, concurrency=5, domains=4,
                                      pipelining=pipelining)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    # d1 is every 4th message: 50 refused at RCPT; of the 150 bodies, every 3rd gets 451.
    assert report.rcpt_refused == {550: 50}
    assert report.refused == {550: 50, 451: 50}
    assert (report.sent, report.accepted, report.failed, report.unsent) == (150, 100, 0, 0)
    assert len(sink.messages) == 100 and len(sink.refused) == 50
    assert not any("@d1.example" in r for m in sink.messages for r in m.rcpt_tos)


def test_refused_data_command_resets_before_the_next_transaction() -> None:
    datas = 0

    def script(verb: str, arg: str) -> str | None:
        nonlocal datas
        if verb == "DATA":
            datas += 1
            return "452 4.3.1 out of space" if datas % 2 == 0 else None
        return None

    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink(script=script)
        try:
            return sink, await _blast(sink, messages=20, concurrency=1)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    assert report.refused == {452: 10} and report.accepted == 10
    assert len(sink.messages) == 10
    # After each refused DATA the next group starts with RSET, in the same segment.
    assert sum(seg.startswith(b"RSET\r\nMAIL FROM:") for seg in sink.segments) == 9


def test_sessions_reconnect_after_messages_per_session() -> None:
    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink()
        try:
            return sink, await _blast(sink, messages=200, concurrency=5, messages_per_session=10)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    assert report.accepted == 200 and len(sink.messages) == 200
    assert report.connections == sink.connections == 20
    assert sum(seg == b"QUIT\r\n" for seg in sink.segments) == 20


def test_rate_cap_spreads_messages_over_time() -> None:
    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink(keep_segments=False)
        try:
            return sink, await _blast(sink, messages=40, concurrency=4, rate=200.0)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    assert report.accepted == 40
    assert report.elapsed >= 39 / 200.0 * 0.9  # the last one may not start before 0.195 s


def test_connection_refused_is_counted_not_hung() -> None:
    async def scenario() -> Report:
        sink = await start_sink()
        port = sink.port
        await sink.close()  # nothing listens there now
        return await run(BlastOptions(port=port, messages=50, concurrency=3, timeout=1.0))

    report = _run(scenario)
    assert report.accepted == 0 and report.attempted == 0 and report.unsent == 50
    assert report.errors == {"connect: ConnectionRefusedError": 9}  # 3 tries per session


def test_silent_server_times_out() -> None:
    async def scenario() -> Report:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)  # never speaks
        port = server.sockets[0].getsockname()[1]
        try:
            return await run(BlastOptions(port=port, messages=5, concurrency=2, timeout=0.2))
        finally:
            server.close()
            await server.wait_closed()

    report = _run(scenario)
    assert report.accepted == 0 and report.unsent == 5
    assert report.errors == {"timeout": 6}  # 3 connections per session, each waited 0.2 s
    assert report.elapsed < 3.0
