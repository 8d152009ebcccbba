"""The sink protocol in-process on real loopback sockets: latency keeps pipelined replies
in order, faults are counted, counters-only mode and the on_message hook, several
listeners sharing one count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop

from engine.lab.sink.protocol import Faults, Sink, start_sink, start_sinks

T = TypeVar("T")
HOST = "127.0.0.8"
BODY = b"Subject: x\r\n\r\nhello\r\n"


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), 20.0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


async def _replies(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    """The next n replies (a multi-line reply counts once), as their final lines."""
    out: list[bytes] = []
    while len(out) < n:
        line = await reader.readline()
        if not line:
            break
        if line[3:4] != b"-":
            out.append(line.rstrip())
    return out


async def _session(sink: Sink, host: str = HOST) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, sink.port)
    writer.write(b"EHLO c.test\r\n")
    assert [r[:3] for r in await _replies(reader, 2)] == [b"220", b"250"]
    return reader, writer


def test_latency_holds_later_pipelined_replies_behind_the_delayed_one() -> None:
    async def go() -> tuple[list[bytes], float]:
        sink = await start_sink(HOST, 0, faults=Faults(latency=0.2))
        try:
            reader, writer = await _session(sink)
            writer.write(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            assert [r[:3] for r in await _replies(reader, 3)] == [b"250", b"250", b"354"]
            t0 = time.monotonic()
            # The end of data and the next transaction in one write, as a chaining client does.
            writer.write(BODY + b".\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n")
            first = await _replies(reader, 1)
            waited = time.monotonic() - t0
            rest = await _replies(reader, 3)
            writer.write(BODY + b".\r\nQUIT\r\n")
            rest += await _replies(reader, 2)
            writer.close()
            assert [m.mail_from for m in sink.messages] == ["a@x.test", "c@x.test"]
            return first + rest, waited
        finally:
            await sink.close()

    replies, waited = _run(go)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    assert replies[0].startswith(b"250 2.0.0") and replies[1].startswith(b"250 2.1.0")
    assert waited >= 0.2  # lower bound only


def test_faults_are_counted_and_recorded_as_refused() -> None:
    async def go() -> Sink:
        sink = await start_sink(HOST, 0, faults=Faults(defer_rate=1.0))
        try:
            reader, writer = await _session(sink)
            for _ in range(2):
                writer.write(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
                await _replies(reader, 3)
                writer.write(BODY + b".\r\n")
                assert (await _replies(reader, 1))[0].startswith(b"451 4.3.0")
            writer.close()
            return sink
        finally:
            await sink.close()

    sink = _run(go)
    assert (sink.accepted, sink.deferred, sink.rejected) == (0, 2, 0)
    assert [m.data for m in sink.refused] == [BODY, BODY] and sink.messages == []


def test_counters_only_mode_keeps_nothing_but_calls_the_hook_and_shares_counts() -> None:
    seen: list[tuple[str, list[str], bytes, bool]] = []

    async def go() -> Sink:
        sink = await start_sinks([(HOST, 0), ("127.0.0.9", 0)], record=False, keep_segments=False,
                                 on_message=lambda *a: seen.append(a))
        try:
            assert len(sink.addresses) == 2 and sink.addresses[1].startswith("127.0.0.9:")
            for host, address in zip((HOST, "127.0.0.9"), sink.addresses):
                reader, writer = await asyncio.open_connection(host, int(address.rpartition(":")[2]))
                writer.write(b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
                assert [r[:3] for r in await _replies(reader, 5)] == [
                    b"220", b"250", b"250", b"250", b"354"]
                writer.write(b"..dot\r\n.\r\n")
                assert (await _replies(reader, 1))[0].startswith(b"250")
                writer.close()
            await sink.wait_for(2, 5)
            return sink
        finally:
            await sink.close()

    sink = _run(go)
    assert sink.accepted == 2 and sink.connections == 2 and sink.last > 0
    assert sink.messages == [] and sink.commands == [] and sink.segments == []
    assert seen == [("a@x.test", ["b@y.test"], b".dot\r\n", False)] * 2  # unstuffed
