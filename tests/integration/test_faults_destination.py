"""Destination faults (issue 11): a remote server that misbehaves at the byte level.

Each test runs a tiny raw asyncio server on 127.0.0.1 that plays one fault, drives a
real DeliverySession against it, and checks three things: the affected recipients get a
4xx (a deferral: never a 250 for a delivery that did not happen, never a bounce for a
remote fault), the client survives (the next message, to a healthy sink on the same
loop, is delivered), and the peer's own count shows what it really accepted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import trustme

from engine.delivery import connect
from engine.delivery.connect import client_tls_context
from engine.delivery.dialogue import SetupError
from engine.delivery.job import JobResult
from engine.delivery.pool import SitePool
from engine.delivery.session import DeliverySession
from engine.lab.sink.state import Faults
from engine.queue.records import PENDING
from engine.smtp.client_replies import MAX_REPLY_LINE, MAX_REPLY_LINES
from tests.integration.relay_helpers import Lab, body, lab  # noqa: F401  (fixture)
from tests.integration.test_session import (
    Results,
    codes,
    fast_timeouts,
    make_job,
    open_session,
    route,
    run_bounded,
    server_tls,
    settings_for,
    sink_at,
)

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Play = Callable[[Reader, Writer], Awaitable[None]]
EHLO_PIPELINING = b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class Peer:
    """A raw SMTP peer on loopback (127.0.0.0/8 only): `play` owns each connection. No
    peer here takes a message by the protocol's rules, so any 2xx outcome the client
    reports would count a delivery that did not happen."""

    def __init__(self, play: Play, host: str = "127.0.0.1") -> None:
        self.play = play
        self.host = host
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Peer:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: Reader, writer: Writer) -> None:
        try:
            await self.play(reader, writer)
        except (OSError, asyncio.IncompleteReadError):  # ssl.SSLError is an OSError
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def greet(reader: Reader, writer: Writer, ehlo: bytes = EHLO_PIPELINING) -> None:
    writer.write(b"220 peer.test ESMTP\r\n")
    await reader.readuntil(b"\r\n")  # EHLO
    writer.write(ehlo)
    await writer.drain()


async def read_until_quiet(reader: Reader, marker: bytes) -> bytes:
    """Everything up to and including `marker` (e.g. the DATA line)."""
    return await reader.readuntil(marker)


async def peer_session(peer: Peer, **kw: object) -> DeliverySession:
    return await connect.open_session("peer.test", "127.0.0.1", peer.port,
                                      settings_for(peer, **kw), fast_timeouts(1.0), None)  # type: ignore[arg-type]


async def healthy_delivery_still_works() -> None:
    """The worker survives: a fresh session to a healthy sink delivers a message."""
    sink = await sink_at()
    session = await open_session(sink)
    result = await session.run(make_job(["ok@d.test"], tag="after"))
    assert codes(result) == [250]
    await sink.wait_for(1, 5.0)
    assert sink.accepted == 1  # the sink's own count: exactly the one message
    await session.quit()


def run_setup_refused(play: Play) -> SetupError:
    """Open a session to a peer playing `play`: the setup must fail with SetupError (its
    reply for the caller to check), and a healthy delivery must still work after it."""
    holder: list[SetupError] = []

    async def main() -> None:
        peer = await Peer(play).start()
        try:
            with pytest.raises(SetupError) as info:
                await peer_session(peer)
            holder.append(info.value)
            await healthy_delivery_still_works()
        finally:
            await peer.close()

    run_bounded(main)
    return holder[0]


def assert_deferred(result: JobResult, n: int) -> None:
    assert len(result.replies) == n
    for reply in result.replies.values():
        assert reply.code // 100 == 4, reply  # a deferral, never 2xx or 5xx


def run_fault(play: Play, rcpts: int = 1, *, check: Callable[[JobResult], None] | None = None) -> Peer:
    """One transaction against a peer playing `play`; every recipient must defer."""
    holder: list[Peer] = []

    async def main() -> None:
        peer = await Peer(play).start()
        holder.append(peer)
        try:
            session = await peer_session(peer)
            job = make_job([f"r{i}@d.test" for i in range(rcpts)])
            result = await session.run(job)
            assert_deferred(result, rcpts)
            if check is not None:
                check(result)
            await session.wait_closed()  # a faulty connection is never reused
            await healthy_delivery_still_works()
        finally:
            await peer.close()

    run_bounded(main)
    return holder[0]


# --- the faults ------------------------------------------------------------------------
def test_connection_reset_mid_data() -> None:
    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await writer.drain()
        await reader.readexactly(10)  # part of the body, then a reset (RST)
        writer.transport.abort()

    run_fault(play, check=lambda r: _assert_enhanced(r, "4.4.2"))  # connection lost


def test_reply_never_comes_after_mail() -> None:
    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer, b"250 peer.test\r\n")  # no PIPELINING: MAIL alone
        await reader.readuntil(b"\r\n")
        await reader.read()  # silent until the client gives up

    run_fault(play, check=lambda r: _assert_text(r, "timeout"))


def _assert_text(result: JobResult, word: str) -> None:
    assert all(word in " ".join(r.lines).lower() for r in result.replies.values()), result.replies


def _assert_enhanced(result: JobResult, enhanced: str) -> None:
    assert all(r.enhanced == enhanced for r in result.replies.values()), result.replies


def test_greeting_never_comes() -> None:
    async def play(reader: Reader, writer: Writer) -> None:
        await reader.read()

    err = run_setup_refused(play)
    assert err.reply.code // 100 == 4 and "greeting" in str(err)


def test_multiline_reply_that_never_ends_is_cut_at_a_bound() -> None:
    sent: list[int] = []

    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await reader.readuntil(b"\r\n")
        line = b"250-more\r\n"
        # 250- lines for ever (until the client hangs up): the client must stop reading.
        while not writer.is_closing() and not reader.at_eof():
            writer.write(line * 1000)
            sent.append(1000)
            await writer.drain()
            if sum(sent) > 10 * MAX_REPLY_LINES * 1000:  # far beyond any bound
                break

    run_fault(play, check=lambda r: _assert_text(r, "too many lines"))
    assert sum(sent) < 10 * MAX_REPLY_LINES * 1000  # the client hung up, not the peer


def test_one_megabyte_reply_line() -> None:
    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await reader.readuntil(b"\r\n")
        writer.write(b"250 " + b"x" * (1 << 20) + b"\r\n")
        await writer.drain()
        await reader.read()

    assert MAX_REPLY_LINE < 1 << 20
    run_fault(play, check=lambda r: _assert_text(r, "too long"))


@pytest.mark.parametrize("reply", [
    b"999 what\r\n", b"abc def\r\n", b"2500 ok\r\n", b"250-first\r\n251 second\r\n", b"\r\n",
])
def test_invalid_reply_codes(reply: bytes) -> None:
    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer, b"250 peer.test\r\n")
        await reader.readuntil(b"\r\n")  # MAIL
        writer.write(reply)
        await writer.drain()
        await reader.read()

    run_fault(play, check=lambda r: _assert_enhanced(r, "4.5.0"))


def test_250_to_data_is_not_a_delivery() -> None:
    """A 2xx where 354 is due: the body was never sent, so nothing was delivered."""

    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")  # MAIL, 2 RCPT, DATA
        await writer.drain()
        # A client that took the 250 as a 354 would send the body: say 250 to it as well.
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()
        await reader.read()

    run_fault(play, rcpts=2, check=lambda r: _assert_enhanced(r, "4.5.0"))


def test_fewer_replies_than_pipelined_commands() -> None:
    """MAIL and one of three RCPTs answered, then the server closes: nobody is delivered,
    and the recipient whose RCPT got 250 defers too (its DATA never completed)."""

    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer)
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
        await writer.drain()

    run_fault(play, rcpts=3, check=lambda r: _assert_enhanced(r, "4.4.2"))


def test_bytes_injected_after_starttls_220_are_never_used(ca: trustme.CA) -> None:
    """RFC 3207 §5 / CVE-2011-0411 on the client side: anything after the 220 to STARTTLS
    arrived in plaintext, so a client that kept it would read the attacker's EHLO reply
    after the handshake. The peer here really does TLS after its 220 and would answer
    EHLO over it; the client must refuse the connection before the handshake (4.7.5),
    never reaching the TLS EHLO."""
    over_tls: list[bytes] = []

    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer, b"250-peer.test\r\n250 STARTTLS\r\n")
        await reader.readuntil(b"STARTTLS\r\n")
        writer.write(b"220 2.0.0 Ready to start TLS\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await writer.drain()
        await writer.start_tls(server_tls(ca))
        over_tls.append(await reader.readuntil(b"\r\n"))  # EHLO over TLS
        writer.write(EHLO_PIPELINING)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        peer = await Peer(play).start()
        try:
            with pytest.raises(SetupError) as info:
                await connect.open_session(
                    "peer.test", "127.0.0.1", peer.port, settings_for(peer, tls="required"),  # type: ignore[arg-type]
                    fast_timeouts(1.0), client_tls_context(False))
            assert (info.value.reply.code, info.value.reply.enhanced) == (454, "4.7.5"), info.value.reply
            assert "after its 220" in str(info.value)
            assert over_tls == []
            await healthy_delivery_still_works()
        finally:
            await peer.close()

    run_bounded(main)


# --- the whole relay ---------------------------------------------------------------------
RELAY_ZONE = {
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.2"]},
    "good.test": {"MX": [(10, "mx.good.test")]},
    "mx.good.test": {"A": ["127.0.0.3"]},
}


@pytest.mark.parametrize("fault", ["250 to DATA", "invalid code", "dropped at end of data"])
def test_relay_defers_a_faulty_destination_and_delivers_the_next(lab: Lab, fault: str) -> None:
    """Through the whole relay: the faulty destination's recipients are logged deferred
    and stay queued with a next attempt, the sink there counts no message, and a message
    to a healthy destination sent after it is delivered by the same worker."""

    def script(verb: str, arg: str) -> str | None:
        if fault == "250 to DATA" and verb == "DATA":
            return "250 2.0.0 queued"  # 354 was due: nothing can have been delivered
        if fault == "invalid code" and verb == "RCPT":
            return "2500 ok"
        return None

    drop = Faults(disconnect_rate=1.0) if fault == "dropped at end of data" else None
    bad = lab.sink("127.0.0.2", script=script, faults=drop)
    good = lab.sink("127.0.0.3")
    lab.zone(RELAY_ZONE)
    lab.start()
    started = time.time()
    qid = lab.send(["r0@dest.test", "r1@dest.test", "r2@dest.test"], body("faulty"))
    lines = lab.wait_log(lambda e: e["id"] == qid, 3)
    assert {e["outcome"] for e in lines} == {"deferred"}, lines
    assert all(e["code"] // 100 == 4 for e in lines), lines
    record = lab.records()[qid]
    assert all(r.state == PENDING and r.attempts >= 1 and r.next_attempt > started
               for r in record.recipients), record
    ok = lab.send(["x@good.test"], body("healthy"))
    lab.wait_log(lambda e: e["id"] == ok and e["outcome"] == "delivered")
    lab.wait_sink(good, 1)
    assert bad.accepted == 0 and len(bad.messages) == 0
    assert bad.disconnected >= (1 if drop else 0)


def test_a_reply_trickling_in_does_not_extend_the_deadline() -> None:
    """A server that sends a byte now and then (an endless 250- line, slowly) is still cut
    off at the phase's deadline: reads never push the deadline back."""
    sent = []

    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer, b"250 peer.test\r\n")
        await reader.readuntil(b"\r\n")  # MAIL
        writer.write(b"250-")
        while not writer.is_closing():
            writer.write(b"x")
            sent.append(1)
            await writer.drain()
            await asyncio.sleep(0.02)  # the fault itself: a slow trickle, not a synchronisation

    run_fault(play, check=lambda r: _assert_text(r, "timeout"))
    assert len(sent) < MAX_REPLY_LINE  # cut by the deadline, not by the line bound


def test_pool_moves_past_a_host_that_never_greets() -> None:
    """RFC 5321 §5.1 through the pool: the most preferred MX accepts TCP and then says
    nothing; after the greeting timeout the job goes to the next MX and is delivered."""
    async def play(reader: Reader, writer: Writer) -> None:
        await reader.read()

    async def main() -> None:
        mute = await Peer(play, "127.0.0.2").start()
        try:
            sink = await sink_at("127.0.0.3", mute.port)
            r = route(("mx1.dest.test", ("127.0.0.2",)), ("mx2.dest.test", ("127.0.0.3",)))
            pool = SitePool(r.site_key, settings_for(sink), fast_timeouts(0.5),
                            lambda: client_tls_context(False), asyncio.get_running_loop())
            results = Results()
            pool.submit(make_job(["a@dest.test"], tag="j", results=results, job_route=r))
            await results.wait(1, timeout=8.0)
            result = results.by_tag["j"]
            assert codes(result) == [250] and result.mx_host == "mx2.dest.test"
            assert sink.accepted == 1
            await pool.close()
        finally:
            await mute.close()

    run_bounded(main)


def test_reply_nobody_asked_for_after_ehlo_is_never_matched_to_mail() -> None:
    """A second 250 after the EHLO reply answers nothing; kept, it would be taken as the
    reply to MAIL and shift every later reply by one. The connection is refused."""
    async def play(reader: Reader, writer: Writer) -> None:
        await greet(reader, writer, b"250 peer.test\r\n250 2.1.0 stale\r\n")
        await reader.read()

    err = run_setup_refused(play)
    assert (err.reply.code, err.reply.enhanced) == (451, "4.5.0")
