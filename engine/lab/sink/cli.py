"""`volley sink`: a fast SMTP receiver that counts and discards (or stores) what it gets.

    volley sink --listen 127.0.0.2:2526 --listen 127.0.0.3:2526 --latency 20ms --defer-rate 0.1

The protocol is `engine.lab.sink.protocol`; this module is the command: options, the
optional store, the status line every second and the summary at the end.

- `--store DIR`: each accepted message is written as DIR/<n>.eml, byte for byte what
  the client sent (unstuffed, without the final dot), renamed into place when complete;
  DIR/index.jsonl gets one JSON line per message with its envelope
  (`{"file", "mail_from", "rcpt_tos", "tls", "size", "time"}`). Numbering continues after
  the highest <n>.eml already there.
- `--defer-rate`, `--reject-rate`, `--disconnect-rate`: fractions of transactions that
  get, at the end of data, `451 4.3.0`, `550 5.7.1`, or a dropped connection with no
  reply (the message was sent, its fate unknown to the client: the duplicate window of
  RFC 1047). One seeded draw per transaction (`--seed`, printed at start).
- `--latency`: delay before every end-of-data reply (a timer, never blocking).
- `--json`: JSON lines on stdout: `{"event": "ready", "listeners": [...], ...}` first,
  then a counter line (no "event" key) each `--interval` when counts changed, then
  `{"event": "stopped", ...}`. `--targets-from-stdin` (for benchmarks) reads message
  counts from stdin, prints `{"event": "reached", "target": n, "t": monotonic}` when
  each is reached, and exits when stdin closes.
Without --json: one status line per second (rewritten in place on a terminal, a plain
line when counts changed otherwise), and a summary when it stops: SIGINT, SIGTERM or
after `--duration`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.cmdline import duration, host_port

PROG = "volley sink"


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="append", required=True, type=host_port, metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port); repeatable")
    p.add_argument("--store", metavar="DIR", help="write each accepted message as DIR/<n>.eml"
                   " (envelopes in DIR/index.jsonl); default: count and discard")
    p.add_argument("--defer-rate", type=_rate, default=0.0, metavar="F",
                   help="fraction of transactions answered 451 4.3.0 at the end of data")
    p.add_argument("--reject-rate", type=_rate, default=0.0, metavar="F",
                   help="fraction of transactions answered 550 5.7.1 at the end of data")
    p.add_argument("--disconnect-rate", type=_rate, default=0.0, metavar="F",
                   help="fraction of transactions whose connection is dropped at the end of data")
    p.add_argument("--latency", type=duration, default=0.0, metavar="DURATION",
                   help='delay before each end-of-data reply, e.g. "20ms"')
    p.add_argument("--seed", type=int, default=None, help="seed of the random choices")
    p.add_argument("--no-pipelining", action="store_true", help="do not advertise PIPELINING")
    p.add_argument("--chunking", action="store_true", help="advertise CHUNKING (BDAT)")
    p.add_argument("--no-starttls", action="store_true",
                   help="do not offer STARTTLS (offered by default, with a throwaway certificate)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate for STARTTLS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM key for STARTTLS")
    p.add_argument("--duration", "--lifetime", type=duration, default=0.0, metavar="DURATION",
                   help="stop after this long (default: until SIGINT/SIGTERM)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between status lines (default %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument("--targets-from-stdin", action="store_true",
                   help="(benchmarks) read message counts from stdin, report when each is reached;"
                        " exit when stdin closes")


def add_parser(sub: Any) -> None:
    """Register `volley sink` on the `volley` subparsers."""
    p = sub.add_parser("sink", help="a fast SMTP receiver that counts (or stores) and discards",
                       description="A fast SMTP receiver for load tests and drills.")
    add_arguments(p)
    p.set_defaults(handler=run)


def tls_context(cert: str | None, key: str | None) -> Any:
    """A server SSLContext from PEM files, else with a fresh self-signed certificate."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if cert:
        ctx.load_cert_chain(cert, key or None)
        return ctx
    import trustme  # a throwaway CA and leaf, in memory, ~25 ms

    trustme.CA().issue_cert("sink.test", "localhost", "127.0.0.1", "::1").configure_cert(ctx)
    return ctx


class Store:
    """Writes accepted messages as DIR/<n>.eml plus one envelope line in DIR/index.jsonl."""

    def __init__(self, path: str) -> None:
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem) for p in self.dir.glob("*.eml") if p.stem.isdigit()]
        self.n = max(taken, default=0)
        self.stored = 0
        self._index = open(self.dir / "index.jsonl", "ab")

    def __call__(self, mail_from: str, rcpt_tos: list[str], data: bytes, tls: bool) -> None:
        self.n += 1
        name = f"{self.n}.eml"
        tmp = self.dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, self.dir / name)  # a reader never sees half a message
        line = {"file": name, "mail_from": mail_from, "rcpt_tos": rcpt_tos, "tls": tls,
                "size": len(data), "time": time.time()}
        self._index.write(json.dumps(line).encode() + b"\n")
        self._index.flush()
        self.stored += 1

    def close(self) -> None:
        self._index.close()


class Targets:
    """Pending message counts (from stdin); `reached(n, t)` fires when each is reached."""

    def __init__(self, reached: Callable[[int, float], None]) -> None:
        self.pending: list[int] = []  # sorted
        self.reached = reached
        self.count = 0

    def add(self, n: int, count: int, last: float) -> None:
        if count >= n:
            self.reached(n, last)
        else:
            bisect.insort(self.pending, n)

    def __call__(self) -> None:  # Sink.on_accepted: counts without a copy of the data
        self.count += 1
        while self.pending and self.count >= self.pending[0]:
            self.reached(self.pending.pop(0), time.monotonic())


class Output:
    """Status lines and the summary, as JSON lines or for people (tty or not)."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.json = as_json
        self.out = stream or sys.stdout
        self.tty = not as_json and self.out.isatty()
        self.started = time.monotonic()
        self._seen: tuple[int, ...] = ()
        self._prev = (self.started, 0)

    def emit(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def say(self, text: str) -> None:
        if self.tty:
            text = "\r\x1b[K" + text
        self.out.write(text + "\n")
        self.out.flush()

    def tick(self, sink: Any) -> None:
        now = time.monotonic()
        counts = (sink.accepted, sink.connections, sink.deferred, sink.rejected, sink.disconnected)
        t0, n0 = self._prev
        rate = (sink.accepted - n0) / (now - t0) if now > t0 else 0.0
        self._prev = (now, sink.accepted)
        if counts == self._seen and not self.tty:
            return
        self._seen = counts
        if self.json:
            self.emit({"messages": sink.accepted, "msgs_per_s": round(rate, 1),
                       "connections": sink.connections, "live": len(sink.live),
                       "deferred": sink.deferred, "rejected": sink.rejected,
                       "disconnected": sink.disconnected, "last": sink.last, "t": now})
            return
        line = (f"{time.strftime('%H:%M:%S')} messages {sink.accepted:,} ({rate:,.0f}/s)"
                f"  connections {sink.connections:,} (live {len(sink.live)})"
                f"  deferred {sink.deferred:,}  rejected {sink.rejected:,}"
                f"  disconnected {sink.disconnected:,}")
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
        else:
            self.say(line)

    def summary(self, sink: Any, store: Store | None) -> None:
        elapsed = time.monotonic() - self.started
        avg = sink.accepted / elapsed if elapsed > 0 else 0.0
        if self.json:
            self.emit({"event": "stopped", "messages": sink.accepted, "connections": sink.connections,
                       "max_live": sink.max_live, "deferred": sink.deferred,
                       "rejected": sink.rejected, "disconnected": sink.disconnected,
                       "elapsed": round(elapsed, 3), "msgs_per_s": round(avg, 1),
                       "stored": store.stored if store else 0})
            return
        self.say(f"{PROG}: stopped after {elapsed:.1f}s: {sink.accepted:,} messages"
                 f" ({avg:,.0f}/s on average), {sink.connections:,} connections"
                 f" (at most {sink.max_live:,} at once), {sink.deferred:,} deferred,"
                 f" {sink.rejected:,} rejected, {sink.disconnected:,} disconnected")
        if store is not None:
            self.say(f"{PROG}: {store.stored:,} messages stored in {store.dir}")


async def _read_targets(loop: asyncio.AbstractEventLoop, targets: Targets, sink: Any,
                        stop: asyncio.Event) -> None:
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        text = line.decode().strip()
        if text.isdigit():
            targets.add(int(text), sink.accepted, sink.last)
    stop.set()  # our parent closed the pipe (or died): nobody is listening


async def serve(args: argparse.Namespace, out: Output) -> None:
    from engine.lab.sink.protocol import Faults, start_sinks

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    faults = Faults(defer_rate=args.defer_rate, reject_rate=args.reject_rate,
                    disconnect_rate=args.disconnect_rate, latency=args.latency, seed=args.seed)
    ctx = None if args.no_starttls else tls_context(args.tls_cert, args.tls_key)
    store = Store(args.store) if args.store else None
    targets = Targets(lambda n, t: out.emit({"event": "reached", "target": n, "t": t})) \
        if args.targets_from_stdin else None
    sink = await start_sinks(
        args.listen, pipelining=not args.no_pipelining, chunking=args.chunking,
        starttls_context=ctx, keep_segments=False, record=False,
        faults=faults if faults.active or faults.latency else None, on_message=store,
        on_accepted=targets)
    try:
        ready = {"event": "ready", "listeners": sink.addresses, "pid": os.getpid(),
                 "starttls": ctx is not None, "pipelining": not args.no_pipelining,
                 "chunking": args.chunking, "seed": faults.seed, "store": args.store}
        if out.json:
            out.emit(ready)
        else:
            out.say(f"{PROG}: listening on {', '.join(sink.addresses)}"
                    f" (STARTTLS {'on' if ctx else 'off'}, PIPELINING"
                    f" {'off' if args.no_pipelining else 'on'}, seed {faults.seed})")
        reading = asyncio.ensure_future(_read_targets(loop, targets, sink, stop)) if targets else None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.interval)
            except TimeoutError:
                pass
            out.tick(sink)
        if reading is not None:
            reading.cancel()
    finally:
        await sink.close()
        if store is not None:
            store.close()
    out.summary(sink, store)


def run(args: argparse.Namespace) -> int:
    """The `volley sink` handler: exit 0 after a clean stop, 1 if it could not start."""
    import uvloop

    if args.defer_rate + args.reject_rate + args.disconnect_rate > 1.0 + 1e-9:
        print(f"{PROG}: --defer-rate, --reject-rate and --disconnect-rate add up to more than 1",
              file=sys.stderr)
        return 2
    if args.tls_key and not args.tls_cert:
        print(f"{PROG}: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    out = Output(args.json)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args, out))
    except OSError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.lab.sink ...`, the same as `volley sink ...`."""
    p = argparse.ArgumentParser(prog=PROG, description="A fast SMTP receiver for load tests and drills.")
    add_arguments(p)
    return run(p.parse_args(argv))

