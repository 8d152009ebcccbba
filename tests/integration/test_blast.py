"""The load generator against the scripted sink: counts, sizes, and how commands are grouped.

Each test runs its own uvloop event loop under a hard deadline (`_run`), so a bug that
would hang fails in seconds instead.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import pytest
import uvloop

from engine.lab.blast.cli import build_parser, options_from_args
from engine.lab.blast.message import make_message
from engine.lab.blast.run import BlastOptions, Report, run
from engine.lab.sink.protocol import Sink, start_sink

T = TypeVar("T")
_DEADLINE = 10.0  # generous per test; each normally takes well under a second


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), _DEADLINE)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


class _Server(Protocol):
    port: int

    async def close(self) -> None: ...


S = TypeVar("S", bound=_Server)


def _against_server(start: Callable[[], Awaitable[S]], **options: object) -> tuple[S, Report]:
    """One run of blast against a server `start` brings up (and this closes); (it, the report)."""

    async def scenario() -> tuple[S, Report]:
        server = await start()
        try:
            opts = BlastOptions(port=server.port, timeout=5.0, **options)  # type: ignore[arg-type]
            return server, await run(opts)
        finally:
            await server.close()

    return _run(scenario)


async def _blast_raw(protocol: Callable[[], asyncio.Protocol], **kw: object) -> Report:
    """One run of blast against a bare asyncio server of `protocol` on a free port."""
    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        return await run(BlastOptions(port=port, **kw))  # type: ignore[arg-type]
    finally:
        server.close()
        await server.wait_closed()


async def _blast(sink: Sink, **kw: object) -> Report:
    return await run(BlastOptions(port=sink.port, timeout=3.0, **kw))  # type: ignore[arg-type]


def _cli_options(argv: list[str]) -> BlastOptions:
    return options_from_args(build_parser().parse_args(argv))


def _command_segments(sink: Sink) -> list[bytes]:
    return [seg for seg in sink.segments if b"MAIL FROM:" in seg or b"RCPT TO:" in seg]


def _chained_segments(sink: Sink) -> list[bytes]:
    """Reads holding an end of data and, after it, the next transaction's MAIL."""
    return [seg for seg in sink.segments if b"\r\n.\r\nMAIL FROM:" in seg]


def _outcome(report: Report) -> tuple[object, ...]:
    return (report.attempted, report.sent, report.accepted, report.refused,
            report.rcpt_refused, report.failed, report.unsent, report.errors)


def _balanced(report: Report) -> bool:
    """Every message counted exactly once, none invented."""
    decided = report.accepted + sum(report.refused.values()) + report.failed
    return report.unsent >= 0 and decided + report.unsent == report.options.messages


@pytest.mark.parametrize("size", [300, 1024, 5000])
def test_message_bytes_have_exact_size_and_need_no_stuffing(size: int) -> None:
    data = make_message(size)
    assert len(data) == size
    assert data.endswith(b"\r\n")
    assert b"\r\n." not in data and not data.startswith(b".")
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))


def test_no_chain_sends_mail_rcpt_data_in_one_segment_and_the_body_in_another() -> None:
    # The pre-chaining behaviour, selected on the command line: two writes per message.
    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink()
        try:
            options = _cli_options([
                "--to", f"127.0.0.1:{sink.port}", "-n", "200", "-c", "5", "--size", "1024",
                "-r", "2", "--domains", "3", "--timeout", "3", "--no-chain",
            ])
            assert options.pipelining and not options.chain
            report = await run(options)
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
    bodies = [seg for seg in sink.segments if seg.endswith(b"\r\n.\r\n")]
    assert len(bodies) == 200  # the body and its end of data alone in their write
    assert not _chained_segments(sink)


def test_chained_pipelining_sends_the_next_group_with_the_end_of_data() -> None:
    assert BlastOptions().chain and _cli_options([]).chain  # the default

    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink()
        try:
            return sink, await _blast(sink, messages=300, concurrency=3, size=1024)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    assert len(sink.messages) == 300
    assert {len(m.data) for m in sink.messages} == {1024}
    assert all(m.rcpt_tos == ["u0@d0.example"] for m in sink.messages)
    assert (report.attempted, report.sent, report.accepted) == (300, 300, 300)
    assert (report.failed, report.unsent, report.refused, report.errors) == (0, 0, {}, {})
    assert report.connections == sink.connections == 3
    assert 0 < report.latency_ms.p50 <= report.latency_ms.max
    chained = _chained_segments(sink)
    assert chained  # proof of chaining: end of data and the next MAIL in one read
    for seg in chained:  # ...and what follows the end of data is exactly one group
        tail = seg[seg.index(b"\r\n.\r\nMAIL FROM:") + 5 :]
        assert re.fullmatch(rb"MAIL FROM:<[^>]*>\r\nRCPT TO:<[^>]*>\r\nDATA\r\n", tail), tail
    assert sum(seg == b"QUIT\r\n" for seg in sink.segments) == 3


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
def test_refusals_are_counted_by_code(pipelining: bool) -> None:  # (chained if pipelining)
    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink(script=_rcpt_and_end_refusals())
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


def _rcpt_and_end_refusals() -> Callable[[str, str], str | None]:
    ends = 0

    def script(verb: str, arg: str) -> str | None:
        nonlocal ends
        if verb == "RCPT" and "@d1.example" in arg:
            return "550 5.1.1 no such user"
        if verb == ".":
            ends += 1
            return "451 4.3.0 try later" if ends % 3 == 0 else None
        return None

    return script


def test_chained_refusals_count_exactly_as_unchained() -> None:
    async def one(chain: bool) -> tuple[Sink, Report]:
        sink = await start_sink(script=_rcpt_and_end_refusals())
        try:
            return sink, await _blast(sink, messages=300, concurrency=3, domains=4, chain=chain)
        finally:
            await sink.close()

    async def scenario() -> tuple[tuple[Sink, Report], tuple[Sink, Report]]:
        return await one(True), await one(False)

    (sink_c, chained), (sink_u, unchained) = _run(scenario)
    assert _outcome(chained) == _outcome(unchained)
    # d1 is every 4th message: 75 refused at RCPT (DATA then 554); of the 225 bodies,
    # every 3rd end of data gets 451.
    assert chained.rcpt_refused == {550: 75} and chained.refused == {550: 75, 451: 75}
    assert (chained.sent, chained.accepted, chained.failed, chained.unsent) == (225, 150, 0, 0)
    assert len(sink_c.messages) == len(sink_u.messages) == 150
    assert len(sink_c.refused) == len(sink_u.refused) == 75
    assert _chained_segments(sink_c) and not _chained_segments(sink_u)


def _harsh_script() -> Callable[[str, str], str | None]:
    """MAIL refused now and then, d1 recipients refused, DATA always opened (even with no
    valid recipient: the RFC 2920 §3.1 case), empty messages and every 4th body refused."""
    mails = ends = 0

    def script(verb: str, arg: str) -> str | None:
        nonlocal mails, ends
        if verb == "MAIL":
            mails += 1
            return "451 4.3.2 busy" if mails % 5 == 0 else None
        if verb == "RCPT" and "@d1.example" in arg:
            return "550 5.1.1 no such user"
        if verb == "DATA":
            return "354 go ahead"
        if verb == ".":
            if arg == "0":
                return "554 5.5.1 no valid recipients"
            ends += 1
            return "451 4.3.0 try later" if ends % 4 == 0 else None
        return None

    return script


def test_chained_mail_and_all_rcpt_refusals_match_unchained_command_for_command() -> None:
    # One session, so the order of events (and thus the script's choices) is the same.
    async def one(chain: bool) -> tuple[Sink, Report]:
        sink = await start_sink(script=_harsh_script())
        try:
            return sink, await _blast(sink, messages=60, concurrency=1, domains=3, chain=chain)
        finally:
            await sink.close()

    async def scenario() -> tuple[tuple[Sink, Report], tuple[Sink, Report]]:
        return await one(True), await one(False)

    (sink_c, chained), (sink_u, unchained) = _run(scenario)
    assert _outcome(chained) == _outcome(unchained)
    assert sink_c.commands == sink_u.commands  # same commands, RSETs included, same order
    assert chained.refused.get(451, 0) > 0 and chained.refused.get(550, 0) > 0
    assert set(chained.rcpt_refused) == {550}  # (no RCPT counted after a refused MAIL)
    assert chained.failed == 0 and chained.unsent == 0 and chained.errors == {}
    assert ("RSET", "") in sink_c.commands  # after a refused MAIL whose DATA got 354
    assert b".\r\n" in sink_c.segments  # the lone "." closing DATA with no recipient
    assert _chained_segments(sink_c) and _balanced(chained)


def test_421_at_end_of_data_refuses_the_chained_message_too() -> None:
    ends = 0

    def script(verb: str, arg: str) -> str | None:
        nonlocal ends
        if verb == ".":
            ends += 1
            return "421 4.3.2 going away" if ends == 3 else None
        return None

    async def scenario() -> tuple[Sink, Report]:
        sink = await start_sink(script=script)
        try:
            return sink, await _blast(sink, messages=6, concurrency=1)
        finally:
            await sink.close()

    sink, report = _run(scenario)
    # Messages 0, 1 accepted; 2 gets the 421 and 3 rode along with it; 4, 5 on a new
    # connection. Nothing is lost to an error: the server said why it hung up.
    assert report.refused == {421: 2} and report.accepted == 4 == len(sink.messages)
    assert (report.failed, report.unsent, report.errors) == (0, 0, {})
    assert report.connections == 2 and report.attempted == 6 and report.sent == 5


class _DropAtEndOfData(asyncio.Protocol):
    """Pipelining server that hangs up, unanswered, as soon as a message's end arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.in_data = False
        self.t.write(b"220 drop.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.in_data:
            if b"\r\n.\r\n" in b"\r\n" + self.buf:
                self.t.abort()
            return
        out = b""
        while not self.in_data and b"\r\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\r\n")
            verb = line[:4].upper()
            if verb == b"EHLO":
                out += b"250-drop.test\r\n250 PIPELINING\r\n"
            elif verb == b"DATA":
                out += b"354 go ahead\r\n"
                self.in_data = True
            else:
                out += b"221 bye\r\n" if verb == b"QUIT" else b"250 ok\r\n"
        self.t.write(out)
        if self.in_data and self.buf:
            self.data_received(b"")


def test_server_closing_mid_chain_fails_both_messages_in_flight() -> None:
    report = _run(lambda: _blast_raw(_DropAtEndOfData, messages=4, concurrency=1, timeout=2.0))
    # Each connection: message A's group, then A's body + B's group, then the hang-up.
    assert (report.attempted, report.sent, report.failed, report.accepted) == (4, 2, 4, 0)
    assert report.connections == 2 and report.unsent == 0 and _balanced(report)
    assert sum(report.errors.values()) == 2  # one lost connection, two messages
    # Noticed at once by the lost connection, not by the 2 s reply timeout ("timeout").
    assert set(report.errors) <= {"connection lost", "ConnectionResetError"}


def test_chaining_never_takes_more_than_the_run_allows() -> None:
    async def scenario() -> tuple[Sink, Report, Report]:
        sink = await start_sink(keep_segments=False)
        try:
            few = await _blast(sink, messages=7, concurrency=3, messages_per_session=2)
            capped = await _blast(sink, messages=10_000, concurrency=4, rate=400.0,
                                  duration=0.25)
            return sink, few, capped
        finally:
            await sink.close()

    sink, few, capped = _run(scenario)
    assert (few.attempted, few.accepted, few.unsent) == (7, 7, 0) and few.connections >= 4
    # The duration cap stops chaining too: nothing due after 0.25 s at 400/s is started.
    assert capped.attempted == capped.accepted <= 100 and capped.failed == 0
    assert _balanced(few) and _balanced(capped) and len(sink.messages) == 7 + capped.accepted


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
    # A lower bound only (a loaded machine can only make it later): the last of 40
    # tickets at 200/s may not start before 0.195 s.
    assert report.elapsed >= 39 / 200.0 * 0.9


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
    # asyncio.Protocol: a server that never speaks.
    report = _run(lambda: _blast_raw(asyncio.Protocol, messages=5, concurrency=2, timeout=0.2))
    assert report.accepted == 0 and report.unsent == 5
    assert report.errors == {"timeout": 6}  # 3 connections per session, each waited 0.2 s
