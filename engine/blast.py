"""`volley blast`: a fast asyncio SMTP load generator, usable as a library or a process.

    report = await run(BlastOptions(port=2525, messages=10_000, concurrency=50))

or, to measure its CPU apart from the server's:

    python -m engine.blast --to 127.0.0.1:2525 -n 10000 -c 50 --size 1024 --json

Every message is counted exactly once: accepted, refused (by the code that refused
it), or failed (an error while it was in flight); messages never started (the run
stopped early: duration cap, or every session gave up connecting) are `unsent`.
Every wait has a deadline, so a silent server costs `timeout` seconds, not a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from typing import Sequence

import msgspec

from engine.blast_protocol import BlastConnection, Shared

# A session that cannot connect (or gets nothing done on) this many connections in a
# row gives up, so a dead server ends the run quickly instead of spinning.
_GIVE_UP_AFTER = 3


class BlastOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to send, where, and how hard."""

    host: str = "127.0.0.1"
    port: int = 2525
    messages: int = 1000  # total over all sessions
    concurrency: int = 10  # parallel sessions (connections at a time)
    messages_per_session: int = 0  # 0: keep each connection for as many as it gets
    recipients: int = 1  # RCPT TO per message
    size: int = 1024  # bytes per message, headers included (minimum ~200)
    domains: int = 1  # recipients spread over d0.example .. d{N-1}.example
    pipelining: bool = True  # used only when the server offers PIPELINING
    # With pipelining, send the next message's MAIL/RCPT/DATA in the same write as the
    # previous message's end of data (RFC 2920; what Postfix does): one write per message.
    chain: bool = True
    rate: float = 0.0  # messages/s over the whole run; 0: as fast as possible
    duration: float = 0.0  # stop starting messages after this many seconds; 0: none
    timeout: float = 30.0  # seconds to wait for any one reply (and for connect)


class Latency(msgspec.Struct, kw_only=True):
    """End of DATA written -> final reply, in milliseconds (nearest-rank percentiles)."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0


class Report(msgspec.Struct, kw_only=True):
    """The outcome of one run."""

    options: BlastOptions
    attempted: int  # transactions started (MAIL sent)
    sent: int  # message bodies written (end of DATA sent)
    accepted: int  # 2xx after the end of DATA
    refused: dict[int, int]  # messages refused, by the code that decided it
    rcpt_refused: dict[int, int]  # individual recipients refused, by code
    failed: int  # messages lost to an error (timeout, connection lost) while in flight
    unsent: int  # messages never started
    errors: dict[str, int]  # error events by kind (connect failures, timeouts, ...)
    connections: int  # connections established
    elapsed: float  # seconds, first connect to last connection closed
    msgs_per_s: float  # accepted / elapsed
    latency_ms: Latency
    cpu_s: float  # CPU (user+system) this process used during the run

    def summary(self) -> str:
        """A few human-readable lines."""
        lat = self.latency_ms
        lines = [
            f"accepted {self.accepted}/{self.options.messages} in {self.elapsed:.3f}s"
            f" = {self.msgs_per_s:,.0f} msgs/s; client CPU {self.cpu_s:.2f}s"
            f" ({1e6 * self.cpu_s / max(1, self.attempted):.0f} us/msg)",
            f"latency ms p50 {lat.p50:.2f} p90 {lat.p90:.2f} p99 {lat.p99:.2f} max {lat.max:.2f}",
            f"sent {self.sent}, connections {self.connections}, failed {self.failed},"
            f" unsent {self.unsent}",
        ]
        if self.refused:
            lines.append(f"refused {dict(sorted(self.refused.items()))}")
        if self.rcpt_refused:
            lines.append(f"recipients refused {dict(sorted(self.rcpt_refused.items()))}")
        if self.errors:
            lines.append(f"errors {dict(sorted(self.errors.items()))}")
        return "\n".join(lines)


def _percentiles(samples: list[float]) -> Latency:
    if not samples:
        return Latency()
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return 1000.0 * ordered[max(0, math.ceil(q * n) - 1)]

    return Latency(p50=rank(0.50), p90=rank(0.90), p99=rank(0.99), max=1000.0 * ordered[-1])


async def _session(shared: Shared, options: BlastOptions) -> None:
    """Open connections one after another until the run has no messages left."""
    loop = shared.loop
    misses = 0
    while shared.next_ticket < shared.total and misses < _GIVE_UP_AFTER:
        if loop.time() >= shared.stop_at:
            return
        done: asyncio.Future[int] = loop.create_future()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: BlastConnection(shared, done), options.host, options.port
                ),
                options.timeout,
            )
        except (OSError, asyncio.TimeoutError) as err:
            kind = "connect timeout" if isinstance(err, asyncio.TimeoutError) else type(err).__name__
            shared.error(f"connect: {kind}")
            misses += 1
            continue
        # `done` resolves in connection_lost; the sweeper aborts a stalled connection,
        # so this await is bounded by `timeout` per reply.
        completed = await done
        misses = 0 if completed else misses + 1


async def _sweeper(shared: Shared, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        shared.sweep()


async def run(options: BlastOptions) -> Report:
    """Send `options.messages` messages and report what happened. Never raises for
    server behaviour (refusals, resets, silence): those are counted in the report."""
    if options.messages < 0 or options.concurrency < 1:
        raise ValueError("messages must be >= 0 and concurrency >= 1")
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    shared = Shared(
        messages=options.messages,
        recipients=options.recipients,
        domains=options.domains,
        size=options.size,
        pipelining=options.pipelining,
        chain=options.chain,
        rate=options.rate,
        duration=options.duration,
        timeout=options.timeout,
        per_session=options.messages_per_session,
        loop=loop,
    )
    t0 = time.perf_counter()
    sweeper = asyncio.ensure_future(_sweeper(shared, min(0.1, options.timeout / 4)))
    sessions = [asyncio.ensure_future(_session(shared, options)) for _ in range(options.concurrency)]
    try:
        await asyncio.gather(*sessions)
    finally:
        for task in sessions:
            task.cancel()
        sweeper.cancel()
        for conn in list(shared.live):  # only on cancellation: don't leak sockets
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.gather(sweeper, *sessions, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    return Report(
        options=options,
        attempted=shared.attempted,
        sent=shared.sent,
        accepted=shared.accepted,
        refused=dict(shared.refused),
        rcpt_refused=dict(shared.rcpt_refused),
        failed=shared.failed,
        unsent=options.messages - shared.accepted - sum(shared.refused.values()) - shared.failed,
        errors=dict(shared.errors),
        connections=shared.connections,
        elapsed=elapsed,
        msgs_per_s=shared.accepted / elapsed if elapsed > 0 else 0.0,
        latency_ms=_percentiles(shared.latencies),
        cpu_s=time.process_time() - cpu0,
    )


def run_sync(options: BlastOptions) -> Report:
    """Run on a fresh uvloop event loop (for scripts and the command line)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(options))


def _parse_args(argv: Sequence[str] | None) -> tuple[BlastOptions, bool]:
    p = argparse.ArgumentParser(prog="volley blast", description="SMTP load generator")
    p.add_argument("--to", default="127.0.0.1:2525", help="HOST:PORT (default %(default)s)")
    p.add_argument("-n", "--messages", type=int, default=1000)
    p.add_argument("-c", "--concurrency", type=int, default=10, help="parallel sessions")
    p.add_argument("-m", "--per-session", type=int, default=0,
                   help="messages per connection, 0 = reuse for as many as it gets")
    p.add_argument("-r", "--recipients", type=int, default=1)
    p.add_argument("--size", type=int, default=1024, help="message bytes incl. headers")
    p.add_argument("--domains", type=int, default=1)
    p.add_argument("--no-pipelining", action="store_true")
    p.add_argument("--no-chain", action="store_true",
                   help="with pipelining, wait for each final reply before the next MAIL")
    p.add_argument("--rate", type=float, default=0.0, help="msgs/s cap, 0 = none")
    p.add_argument("--duration", type=float, default=0.0, help="seconds cap, 0 = none")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per reply")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    host, _, port = a.to.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--to must be HOST:PORT, got {a.to!r}")
    return BlastOptions(
        host=host.strip("[]"), port=int(port), messages=a.messages, concurrency=a.concurrency,
        messages_per_session=a.per_session, recipients=a.recipients, size=a.size,
        domains=a.domains, pipelining=not a.no_pipelining, chain=not a.no_chain, rate=a.rate,
        duration=a.duration, timeout=a.timeout,
    ), a.json


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; exit status 1 when nothing at all was accepted."""
    options, as_json = _parse_args(argv)
    report = run_sync(options)
    if as_json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print(report.summary())
    return 0 if report.accepted or not options.messages else 1


if __name__ == "__main__":
    raise SystemExit(main())
