"""`volley blast`'s summary adds up, checked against the server's own count: attempted =
accepted + refused + failed, "bodies sent" is what the server saw as data, and no latency
is printed for a run that timed no reply."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import uvloop

from engine.lab.blast.run import BlastOptions, Report, run
from engine.lab.sink.protocol import start_sink

_DEADLINE = 20.0


def _counts(summary: str) -> dict[str, int]:
    first = summary.splitlines()[0]
    m = re.fullmatch(r"attempted ([\d,]+) = accepted ([\d,]+) \+ refused ([\d,]+)(?: \([^)]*\))?"
                     r" \+ failed ([\d,]+)", first)
    assert m, first
    names = ("attempted", "accepted", "refused", "failed")
    counts = {k: int(v.replace(",", "")) for k, v in zip(names, m.groups(), strict=True)}
    bodies = re.search(r"^bodies sent ([\d,]+) of ([\d,]+)", summary, re.M)
    assert bodies, summary
    counts["bodies"] = int(bodies[1].replace(",", ""))
    assert int(bodies[2].replace(",", "")) == counts["attempted"]
    return counts


def test_summary_counts_add_up_against_the_sinks_count() -> None:
    seen = {"rcpt_refused": 0, "ends": 0, "end_refused": 0}

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and "@d1.example" in arg:
            seen["rcpt_refused"] += 1
            return "550 5.1.1 no such user"
        if verb == ".":
            seen["ends"] += 1
            if seen["ends"] % 3 == 0:
                seen["end_refused"] += 1
                return "451 4.3.0 try later"
        return None

    async def scenario() -> tuple[int, Report]:
        sink = await start_sink(script=script)
        try:
            report = await run(BlastOptions(port=sink.port, messages=200, concurrency=5,
                                            domains=4, timeout=5.0))
            return len(sink.messages), report
        finally:
            await sink.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stored, report = runner.run(asyncio.wait_for(scenario(), _DEADLINE))
    counts = _counts(report.summary())
    assert counts["attempted"] == 200 == counts["accepted"] + counts["refused"] + counts["failed"]
    assert counts["accepted"] == stored  # the sink's own count
    assert counts["refused"] == seen["rcpt_refused"] + seen["end_refused"]
    assert counts["bodies"] == seen["ends"] < counts["attempted"]  # data the sink received
    assert re.search(r"latency ms \(end of data -> reply, 150 timed\)  p50 \d", report.summary())


class _DropAtEndOfData(asyncio.Protocol):
    """A server that hangs up, unanswered, as soon as a message's end arrives (no
    PIPELINING: one message in flight at a time)."""

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
        while not self.in_data and b"\r\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\r\n")
            verb = line[:4].upper()
            if verb == b"DATA":
                self.t.write(b"354 go ahead\r\n")
                self.in_data = True
            else:
                self.t.write(b"250 ok\r\n")


def test_no_latency_figures_when_no_reply_was_timed() -> None:
    async def scenario() -> Report:
        factory: Callable[[], asyncio.Protocol] = _DropAtEndOfData
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            return await run(BlastOptions(port=port, messages=3, concurrency=1, timeout=5.0))
        finally:
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(asyncio.wait_for(scenario(), _DEADLINE))
    summary = report.summary()
    counts = _counts(summary)
    assert counts == {"attempted": 3, "accepted": 0, "refused": 0, "failed": 3, "bodies": 3}
    assert report.timed == 0
    latency = [line for line in summary.splitlines() if line.startswith("latency")]
    assert len(latency) == 1 and "n/a" in latency[0]
    assert "p50" not in summary and "max" not in summary
