"""`volley blast`: a fast asyncio SMTP load generator, usable as a library or a process.

    report = await run(BlastOptions(port=2525, messages=10_000, concurrency=50))

or, to measure its CPU apart from the server's:

    python -m engine.lab.blast --to 127.0.0.1:2525 -n 10000 -c 50 --size 1024 --json

(the same command line as `volley blast`, engine.lab.blast.cli). Every message is counted
exactly once: accepted, refused (by the code that refused it), or failed (an error
while it was in flight); messages never started (the run stopped early: interrupted,
or every session gave up connecting) are `unsent`. Every wait has a deadline, so a
silent server costs `timeout` seconds, not a hang.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import time
from collections.abc import Callable

import msgspec

from engine.lab.blast.auth import BlastAuth
from engine.lab.blast.message import RCPT_TEMPLATE, SENDER, bodies
from engine.lab.blast.protocol import BlastConnection
from engine.lab.blast.shared import Shared

# A session that cannot connect (or gets nothing done on) this many connections in a
# row gives up, so a dead server ends the run quickly instead of spinning.
_GIVE_UP_AFTER = 3


class BlastOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to send, where, and how hard."""

    host: str = "127.0.0.1"
    port: int = 2525
    messages: int = 1000  # total over all sessions; 0 with a duration: no count limit
    concurrency: int = 10  # parallel sessions (connections at a time)
    messages_per_session: int = 0  # 0: keep each connection for as many as it gets
    recipients: int = 1  # RCPT TO per message
    size: int = 1024  # bytes per message, headers included (minimum ~200)
    sizes: str = ""  # a size distribution ("1k:70,10k:30", "1k-100k"); overrides size
    domains: int = 1  # recipients spread over d0.example .. d{N-1}.example
    sender: str = SENDER  # MAIL FROM (and the generated From: header)
    rcpt_template: str = RCPT_TEMPLATE  # {n}: recipient number, {d}: domain number
    message_file: str = ""  # send this RFC 5322 file as every message's content
    template: bool = False  # substitute {n} / {id} in message_file per message
    pipelining: bool = True  # used only when the server offers PIPELINING
    # With pipelining, send the next message's MAIL/RCPT/DATA in the same write as the
    # previous message's end of data (RFC 2920; what Postfix does): one write per message.
    chain: bool = True
    tls: bool = False  # STARTTLS on every connection (a connection without it sends nothing)
    tls_verify: bool = False  # check the certificate and the host name (default: don't)
    tls_ca: str = ""  # CA file for tls_verify (default: the system's)
    auth: str = ""  # "user:password": AUTH after EHLO (after STARTTLS with tls)
    # "plain" or "login" forces that mechanism; "": PLAIN when the server offers it, else LOGIN
    auth_mech: str = ""
    rate: float = 0.0  # messages/s over the whole run; 0: as fast as possible
    duration: float = 0.0  # stop starting messages after this many seconds; 0: none
    timeout: float = 30.0  # seconds to wait for any one reply (and for connect)


class Latency(msgspec.Struct, kw_only=True):
    """End of DATA written -> final reply, in milliseconds (nearest-rank percentiles)."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0


class Progress(msgspec.Struct, kw_only=True):
    """Counters so far, handed to a `run(progress=...)` callback a few times a second."""

    elapsed: float
    total: int  # messages the run will send; 0: no count limit
    attempted: int
    sent: int
    accepted: int
    refused: int
    failed: int
    connections: int


class Report(msgspec.Struct, kw_only=True):
    """The outcome of one run."""

    options: BlastOptions  # (the password in `auth` blanked)
    attempted: int  # transactions started (MAIL sent) = accepted + refused + failed
    sent: int  # message bodies written (end of DATA sent): <= attempted
    accepted: int  # 2xx after the end of DATA
    refused: dict[int, int]  # messages refused, by the code that decided it
    rcpt_refused: dict[int, int]  # individual recipients refused, by code
    failed: int  # messages lost to an error (timeout, connection lost) while in flight
    unsent: int  # messages never started (0 when the duration ended an unlimited run)
    errors: dict[str, int]  # error events by kind (connect failures, timeouts, ...)
    connections: int  # connections established
    elapsed: float  # seconds, first connect to last connection closed
    msgs_per_s: float  # accepted / elapsed
    latency_ms: Latency  # all 0.0 when `timed` is 0
    cpu_s: float  # CPU (user+system) this process used during the run
    # Why the run ended: "done" (every message decided), "duration" (the cap ended it),
    # "interrupted" (stop / Ctrl-C), "gave up" (sessions could not connect or got nothing done)
    stopped: str = "done"
    timed: int = 0  # messages whose final reply to the end of data was timed (latency_ms)

    @property
    def ok(self) -> bool:
        """Every message accepted: none refused or failed, none left unsent except those
        the duration cap held back. The command's exit status is 0 iff ok."""
        return not self.refused and not self.failed and self.stopped in ("done", "duration")

    def summary(self) -> str:
        """A few human-readable lines. The counts add up: every message started is decided
        exactly once, so attempted = accepted + refused + failed; "bodies sent" counts the
        messages whose data was written (a message refused at MAIL, RCPT or DATA sends
        none, so it is at most `attempted`)."""
        refused = sum(self.refused.values())
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.refused.items()))
        lines = [
            f"attempted {self.attempted:,} = accepted {self.accepted:,} + refused {refused:,}"
            + (f" ({codes})" if codes else "") + f" + failed {self.failed:,}"
            + (f";  unsent {self.unsent:,} (never started)" if self.unsent else ""),
            f"bodies sent {self.sent:,} of {self.attempted:,} (a message refused before DATA"
            " sends none)",
            f"{self.msgs_per_s:,.0f} msgs/s over {self.elapsed:.2f} s, {self.connections:,}"
            " connections" + (f"; client CPU {1e6 * self.cpu_s / self.attempted:.0f} us/msg"
                              if self.attempted else ""),
            self._latency_line(),
        ]
        if self.rcpt_refused:
            by_code = ", ".join(f"{c}: {n}" for c, n in sorted(self.rcpt_refused.items()))
            lines.append(f"recipients refused ({by_code})")
        if self.errors:
            lines.append("errors (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.errors.items())) + ")")
        if self.stopped != "done":
            lines.append(f"stopped: {self.stopped}")
        return "\n".join(lines)

    def _latency_line(self) -> str:
        if not self.timed:  # no final reply after an end of data: there is nothing to show
            return "latency ms (end of data -> reply)  n/a (no message got a reply to its data)"
        lat = self.latency_ms
        return (f"latency ms (end of data -> reply, {self.timed:,} timed)  p50 {lat.p50:.2f}"
                f"  p90 {lat.p90:.2f}  p99 {lat.p99:.2f}  max {lat.max:.2f}")


def _percentiles(samples: list[float]) -> Latency:
    if not samples:
        return Latency()
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return 1000.0 * ordered[max(0, math.ceil(q * n) - 1)]

    return Latency(p50=rank(0.50), p90=rank(0.90), p99=rank(0.99), max=1000.0 * ordered[-1])


def _factory(conn: BlastConnection) -> Callable[[], BlastConnection]:
    """The protocol factory create_connection wants, for a connection built beforehand."""
    return lambda: conn


async def _session(shared: Shared, options: BlastOptions) -> None:
    """Open connections one after another until the run has no messages left."""
    loop = shared.loop
    misses = 0
    while misses < _GIVE_UP_AFTER:
        quota = shared.reserve()
        if not quota:
            return
        done: asyncio.Future[int] = loop.create_future()
        conn = BlastConnection(shared, done, quota)
        try:
            await asyncio.wait_for(
                loop.create_connection(_factory(conn), options.host, options.port),
                options.timeout,
            )
        except (TimeoutError, OSError) as err:
            kind = "connect timeout" if isinstance(err, asyncio.TimeoutError) else type(err).__name__
            shared.error(f"connect: {kind}")
            shared.release(conn.quota)
            misses += 1
            continue
        # `done` resolves in connection_lost; the sweeper aborts a stalled connection,
        # so this await is bounded by `timeout` per reply.
        completed = await done
        shared.release(conn.quota)
        misses = 0 if completed else misses + 1


async def _sweeper(shared: Shared, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        shared.sweep()


async def _ticker(shared: Shared, progress: Callable[[Progress], None], interval: float,
                  t0: float, total: int) -> None:
    while True:
        await asyncio.sleep(interval)
        progress(Progress(
            elapsed=time.perf_counter() - t0, total=total, attempted=shared.attempted,
            sent=shared.sent, accepted=shared.accepted, refused=sum(shared.refused.values()),
            failed=shared.failed, connections=shared.connections,
        ))


async def _watch(shared: Shared, stop: asyncio.Event) -> None:
    await stop.wait()
    shared.interrupt()


def _tls_context(options: BlastOptions) -> ssl.SSLContext | None:
    if not options.tls:
        return None
    ctx = ssl.create_default_context(cafile=options.tls_ca or None)
    if not options.tls_verify:  # a load generator talks to test servers: self-signed is normal
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _shared(options: BlastOptions, loop: asyncio.AbstractEventLoop) -> Shared:
    message = None
    if options.message_file:
        with open(options.message_file, "rb") as f:
            message = f.read()
    return Shared(
        messages=options.messages, recipients=options.recipients, domains=options.domains,
        pipelining=options.pipelining, chain=options.chain, rate=options.rate,
        duration=options.duration, timeout=options.timeout,
        per_session=options.messages_per_session, loop=loop,
        body=bodies(size=options.size, sizes=options.sizes, sender=options.sender,
                    message=message, template=options.template, run_id=os.urandom(6).hex()),
        sender=options.sender, rcpt_template=options.rcpt_template,
        tls_context=_tls_context(options), tls_name=options.host if options.tls_verify else None,
        auth=BlastAuth(options.auth, options.auth_mech) if options.auth else None,
    )


async def run(
    options: BlastOptions,
    *,
    progress: Callable[[Progress], None] | None = None,
    interval: float = 0.25,
    stop: asyncio.Event | None = None,
) -> Report:
    """Send `options.messages` messages and report what happened. Never raises for
    server behaviour (refusals, resets, silence): those are counted in the report.

    `progress` is called every `interval` seconds with the counters so far; setting
    `stop` starts no more messages and lets those in flight finish.
    Raises ValueError (bad options) and OSError (an unreadable message file).
    """
    if options.messages < 0 or options.concurrency < 1:
        raise ValueError("messages must be >= 0 and concurrency >= 1")
    if options.auth_mech and not options.auth:
        raise ValueError("auth_mech needs auth")
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    shared = _shared(options, loop)
    t0 = time.perf_counter()
    helpers = [asyncio.ensure_future(_sweeper(shared, min(0.1, options.timeout / 4)))]
    if progress is not None:
        total = 0 if shared.unlimited else options.messages
        helpers.append(asyncio.ensure_future(_ticker(shared, progress, interval, t0, total)))
    if stop is not None:
        helpers.append(asyncio.ensure_future(_watch(shared, stop)))
    sessions = [asyncio.ensure_future(_session(shared, options)) for _ in range(options.concurrency)]
    try:
        await asyncio.gather(*sessions)
    finally:
        for task in sessions + helpers:
            task.cancel()
        for conn in list(shared.live):  # only on cancellation: don't leak sockets
            conn.abort()
        await asyncio.gather(*helpers, *sessions, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    return _report(options, shared, elapsed, time.process_time() - cpu0)


def _report(options: BlastOptions, shared: Shared, elapsed: float, cpu: float) -> Report:
    decided = shared.accepted + sum(shared.refused.values()) + shared.failed
    stopped = "done"
    if shared.interrupted:
        stopped = "interrupted"
    elif shared.next_ticket < shared.total and shared.due(shared.next_ticket) >= shared.stop_at:
        stopped = "duration"  # the next message would have started past the cap
    elif shared.unlimited or decided < options.messages:
        stopped = "gave up"  # every session failed to connect (or got nothing done) 3 times
    if options.auth:
        options = msgspec.structs.replace(options, auth=options.auth.partition(":")[0] + ":***")
    return Report(
        options=options,
        attempted=shared.attempted,
        sent=shared.sent,
        accepted=shared.accepted,
        refused=dict(shared.refused),
        rcpt_refused=dict(shared.rcpt_refused),
        failed=shared.failed,
        unsent=0 if shared.unlimited else options.messages - decided,
        errors=dict(shared.errors),
        connections=shared.connections,
        elapsed=elapsed,
        msgs_per_s=shared.accepted / elapsed if elapsed > 0 else 0.0,
        latency_ms=_percentiles(shared.latencies),
        cpu_s=cpu,
        stopped=stopped,
        timed=len(shared.latencies),
    )
