"""The `volley blast` command line (also `python -m engine.lab.blast`): arguments, the live
progress line, the summary and the exit status. The load generator itself is
engine.lab.blast (`run`), which this only configures and watches.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from engine.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, duration, host_port
from engine.lab.blast.auth import MECHANISMS
from engine.lab.blast.message import RCPT_TEMPLATE, SENDER, check_rcpt_template, parse_size_spec

if TYPE_CHECKING:  # engine.lab.blast (asyncio, msgspec, ssl) is imported when a run starts,
    # so registering the subcommand costs `volley --help` (and `volley ctl`) nothing.
    from engine.lab.blast.run import BlastOptions, Progress, Report

EXIT_NOT_ALL_ACCEPTED = EXIT_FAILURE  # some message was refused or never sent
_MIN_BAR = 10  # the progress bar's least width: on any terminal, the numbers give way to it

DESCRIPTION = """\
An SMTP load generator (like Postfix's smtp-source): sends -n messages over -c
concurrent sessions to HOST:PORT (default 127.0.0.1:2525) and prints the messages
attempted = accepted + refused (by reply code) + failed, the bodies sent, msgs/s and
latency (end of DATA -> final reply) percentiles ("n/a" when no reply was timed).

--size takes one size (1024, 10k, 1MiB; k = 1000, KiB = 1024) or a distribution:
"1k:70,10k:25,100k:5" (weights), "1k,10k" (equal shares), "1k-100k" (uniform, in
64 evenly spaced sizes). Sizes include the generated headers (minimum ~200 bytes).
Recipients: --to-template with {n} (recipient number, 0 .. r*domains-1) and {d}
(domain number, 0 .. domains-1); default u{n}@d{d}.example.
--message FILE sends an RFC 5322 file as every message (line ends made CRLF,
dot-stuffed); with --template, {n} (message number) and {id} (unique per run and
message) in it are replaced per message.
--auth USER:PASS authenticates each connection once, after EHLO (after STARTTLS
with --tls): AUTH PLAIN when the server's EHLO offers it, else AUTH LOGIN (334
challenges answered in base64); --auth-mech forces one. A connection whose AUTH is
not offered or is refused sends nothing; the summary counts it under errors
("auth 535: 3", "AUTH LOGIN not offered: 3").
"""

EPILOG = """\
Progress: a status line redrawn 4 times a second on a terminal (with a bar when the
total is known, sized to the terminal itself, whatever COLUMNS says), a plain line every
second otherwise, none with --json. Exit status: 0 when every message was accepted
(with --duration: every message started), 1 when any was refused, failed, or never
sent; 2 on a usage error.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every `volley blast` option, on `p`."""
    a = p.add_argument
    a("--to", type=host_port, default=("127.0.0.1", 2525), metavar="HOST:PORT",
      help="the server to load (default 127.0.0.1:2525)")
    a("-n", "--messages", type=int, default=None, metavar="N",
      help="messages in all (default 1000; with --duration: no limit)")
    a("-c", "--concurrency", type=int, default=10, metavar="N", help="parallel sessions (default 10)")
    a("-m", "--per-session", type=int, default=0, metavar="N",
      help="messages per connection, then reconnect (default 0: reuse for as many as it gets)")
    a("-r", "--recipients", type=int, default=1, metavar="N", help="recipients per message (default 1)")
    a("--size", default=None, metavar="SIZE|DIST",
      help="bytes per message incl. headers, or a distribution (see above; default 1024)")
    a("--domains", type=int, default=1, metavar="N",
      help="spread recipients over N domains d0.example .. (default 1)")
    a("--from", dest="sender", default=SENDER, metavar="ADDR", help=f"MAIL FROM (default {SENDER})")
    a("--to-template", default=RCPT_TEMPLATE, metavar="TEMPLATE",
      help=f"recipient address, {{n}} and {{d}} replaced (default {RCPT_TEMPLATE})")
    a("--message", default="", metavar="FILE", help="send this RFC 5322 file as the message")
    a("--template", action="store_true", help="replace {n} and {id} in --message per message")
    a("--rate", type=float, default=0.0, metavar="MSGS/S", help="cap on messages/s (default: none)")
    a("--duration", type=duration, default=0.0, metavar="TIME",
      help="stop starting messages after TIME (30s, 5m; default: none)")
    a("--pipelining", action=argparse.BooleanOptionalAction, default=True,
      help="pipeline commands when the server offers PIPELINING (default: on)")
    a("--no-chain", action="store_true",
      help="with pipelining, wait for each final reply before the next MAIL")
    a("--tls", action="store_true", help="STARTTLS on every connection (certificate not checked)")
    a("--tls-verify", action="store_true", help="STARTTLS and check the certificate and host name")
    a("--tls-ca", default="", metavar="FILE", help="CA file for --tls-verify (default: the system's)")
    a("--auth", default="", metavar="USER:PASS",
      help="AUTH PLAIN, or LOGIN when only that is offered (after STARTTLS with --tls)")
    a("--auth-mech", choices=MECHANISMS, default="", help="use this AUTH mechanism only")
    a("--timeout", type=duration, default=30.0, metavar="TIME",
      help="wait for any one reply or connect (default 30s)")
    a("--json", action="store_true", help="print the report as one JSON object, no progress")


def options_from_args(args: argparse.Namespace) -> BlastOptions:
    """The parsed command line -> BlastOptions; ValueError names a bad combination."""
    from engine.lab.blast.run import BlastOptions

    messages = args.messages
    if messages is None:
        messages = 0 if args.duration else 1000
    if messages < 0 or (messages == 0 and not args.duration):
        raise ValueError("-n must be > 0 (or 0 with --duration: no limit)")
    for flag, value, low in (("-c", args.concurrency, 1), ("-r", args.recipients, 1),
                             ("--domains", args.domains, 1), ("-m", args.per_session, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}")
    if args.rate < 0:
        raise ValueError("--rate must be >= 0")
    size, sizes = 1024, ""
    if args.size is not None:
        if args.message:
            raise ValueError("--size and --message exclude each other")
        pairs = parse_size_spec(args.size)
        if len(pairs) == 1:
            size = pairs[0][0]
        else:
            sizes = args.size
    if args.template and not args.message:
        raise ValueError("--template needs --message FILE")
    if args.message:
        with open(args.message, "rb"):  # unreadable: say so now, not after connecting
            pass
    check_rcpt_template(args.to_template)
    if not args.sender or any(c in args.sender for c in "<> \r\n"):
        raise ValueError(f"--from {args.sender!r} is not an address")
    if args.auth and ":" not in args.auth:
        raise ValueError("--auth must be USER:PASS")
    if args.auth_mech and not args.auth:
        raise ValueError("--auth-mech needs --auth USER:PASS")
    host, port = args.to
    return BlastOptions(
        host=host, port=port, messages=messages, concurrency=args.concurrency,
        messages_per_session=args.per_session, recipients=args.recipients, size=size,
        sizes=sizes, domains=args.domains, sender=args.sender, rcpt_template=args.to_template,
        message_file=args.message, template=args.template, pipelining=args.pipelining,
        chain=not args.no_chain, tls=args.tls or args.tls_verify, tls_verify=args.tls_verify,
        tls_ca=args.tls_ca, auth=args.auth, auth_mech=args.auth_mech, rate=args.rate,
        duration=args.duration, timeout=args.timeout,
    )


class ProgressLine:
    """The live status: redrawn in place on a terminal, one plain line per call otherwise."""

    def __init__(self, out: IO[str], tty: bool, duration: float) -> None:
        self.out = out
        self.tty = tty
        self.duration = duration
        self.window: collections.deque[tuple[float, int]] = collections.deque(maxlen=5)
        self.drawn = False
        self.bar = -1  # bar width, 0: no room for one

    def __call__(self, p: Progress) -> None:
        self.window.append((p.elapsed, p.accepted))
        t_old, a_old = self.window[0]
        if len(self.window) < 2:  # (a rate over the last second, once there is one)
            t_old, a_old = 0.0, 0
        rate = (p.accepted - a_old) / (p.elapsed - t_old) if p.elapsed > t_old else 0.0
        # The decided counts (they add up to the messages started), as in the summary.
        text = (f"accepted {p.accepted:,}  refused {p.refused:,}  failed {p.failed:,}"
                f"  {rate:,.0f} msgs/s  {p.elapsed:.1f}s")
        if not self.tty:
            self.out.write(text + "\n")
            self.out.flush()
            return
        fraction = None
        if p.total:
            fraction = (p.accepted + p.refused + p.failed) / p.total
        elif self.duration:
            fraction = p.elapsed / self.duration
        columns = self._columns()
        if self.bar < 0:  # chosen once (room for the numbers to grow): no jitter
            self.bar = max(_MIN_BAR, min(40, columns - len(text) - 28))
        if fraction is not None:
            width = self.bar
            filled = int(width * min(1.0, fraction))
            text = f"[{'#' * filled}{'.' * (width - filled)}] {100 * min(1.0, fraction):3.0f}%  {text}"
        # Never wider than the terminal: a wrapped line cannot be redrawn with "\r".
        self.out.write("\r" + text[: columns - 1] + "\x1b[K")
        self.out.flush()
        self.drawn = True

    def _columns(self) -> int:
        """The width of the terminal the line is drawn on: asked of the terminal itself,
        so a stale or missing COLUMNS (a resized window, a shell that does not export it)
        neither hides the bar nor wraps the line. COLUMNS only when the output is no file
        descriptor that knows its size."""
        try:
            return max(1, os.get_terminal_size(self.out.fileno()).columns)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return max(1, shutil.get_terminal_size().columns)

    def finish(self) -> None:
        if self.drawn:  # leave the terminal clean for the summary
            self.out.write("\r\x1b[K")
            self.out.flush()


async def _run_interruptible(options: BlastOptions, progress: ProgressLine | None) -> Report:
    """run() with Ctrl-C: the first one starts no more messages (those in flight finish
    and the summary is printed), a second one aborts."""
    import asyncio

    from engine.lab.blast.run import run

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.current_task()

    def on_sigint() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (RuntimeError, ValueError):  # not the main thread: Ctrl-C stays the default
        pass
    try:
        interval = 0.25 if progress is not None and progress.tty else 1.0
        return await run(options, progress=progress, interval=interval, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def command(args: argparse.Namespace) -> int:
    """Run `volley blast` as parsed; returns the exit status."""
    import asyncio

    import msgspec
    import uvloop

    try:
        options = options_from_args(args)
    except (ValueError, OSError) as err:
        print(f"volley blast: {err}", file=sys.stderr)
        return EXIT_USAGE
    progress = None if args.json else ProgressLine(sys.stdout, sys.stdout.isatty(), options.duration)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(_run_interruptible(options, progress))
    except asyncio.CancelledError:  # a second Ctrl-C
        if progress is not None:
            progress.finish()
        print("volley blast: aborted", file=sys.stderr)
        return 130
    if progress is not None:
        progress.finish()
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print(report.summary())
    sys.stdout.flush()
    return EXIT_OK if report.ok else EXIT_NOT_ALL_ACCEPTED


def add_blast(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `volley blast` on the `volley` subcommand parser."""
    p = sub.add_parser("blast", help="SMTP load generator", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volley blast", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.lab.blast ARGS` (the same as `volley blast ARGS`)."""
    return command(build_parser().parse_args(argv))
