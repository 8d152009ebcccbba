"""The sink's BDAT (RFC 3030) on real loopback sockets: a chunk is stored byte for byte,
and a refused BDAT's chunk is still read and dropped (RFC 3030 §2) so its octets are
never taken for commands: a pipelining client (Volley) sends MAIL, RCPT, BDAT and the
chunk in one write before it knows whether any RCPT was accepted."""

from __future__ import annotations

from engine.lab.sink.protocol import Sink, start_sink
from tests.integration.test_sink_protocol import _replies, _run, _session

HOST = "127.0.0.8"
# Looks like commands: a sink that read a refused chunk as input would answer them.
CHUNK = b"QUIT\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n"
BODY = b"Subject: b\r\n\r\n.a dotted line, sent as is\r\n"


def refuse_nobody(verb: str, arg: str) -> str | None:
    return "550 5.1.1 no such user" if verb == "RCPT" and "nobody@" in arg else None


def test_a_chunk_is_stored_exactly_and_a_refused_one_is_read_and_dropped() -> None:
    async def go() -> tuple[list[bytes], list[bytes], Sink]:
        sink = await start_sink(HOST, 0, chunking=True, script=refuse_nobody)
        try:
            reader, writer = await _session(sink)
            # Every RCPT refused, BDAT and its chunk pipelined behind them.
            writer.write(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody@y.test>\r\n"
                         + b"BDAT %d LAST\r\n" % len(CHUNK) + CHUNK + b"RSET\r\n")
            refused = [r[:3] for r in await _replies(reader, 4)]
            writer.write(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                         + b"BDAT %d LAST\r\n" % len(BODY) + BODY + b"QUIT\r\n")
            accepted = [r[:3] for r in await _replies(reader, 4)]
            assert await reader.read() == b""  # closed after QUIT: no stray reply left
            writer.close()
            return refused, accepted, sink
        finally:
            await sink.close()

    refused, accepted, sink = _run(go)
    assert refused == [b"250", b"550", b"503", b"250"]  # MAIL, RCPT, BDAT, RSET
    assert accepted == [b"250", b"250", b"250", b"221"]
    assert [m.data for m in sink.messages] == [BODY]
    verbs = [v for v, _ in sink.commands]
    assert verbs == ["EHLO", "MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT", "QUIT"], verbs


def test_two_chunks_make_one_message() -> None:
    async def go() -> tuple[list[bytes], Sink]:
        sink = await start_sink(HOST, 0, chunking=True)
        try:
            reader, writer = await _session(sink)
            rest = BODY[5:]
            writer.write(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5\r\n" + BODY[:5]
                         + b"BDAT %d LAST\r\n" % len(rest) + rest)
            replies = [r[:3] for r in await _replies(reader, 4)]
            writer.close()
            return replies, sink
        finally:
            await sink.close()

    replies, sink = _run(go)
    assert replies == [b"250", b"250", b"250", b"250"]
    assert [m.data for m in sink.messages] == [BODY]
