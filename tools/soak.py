"""`make soak`: mixed load against a real `volley serve` for a while, with faults injected
on a seeded schedule, then a reconciliation that must find no message lost.

    .venv/bin/python tools/soak.py [--duration 600] [--seed N] [--workers 2] [--rate 100]
                                   [--json] [--keep DIR]

The lab, all on 127.0.0.0/8: a lab DNS zone (engine.lab.dns, in this process), one
`volley sink --store` process per destination on 127.0.0.2.. (one clean, one deferring
451, one rejecting 550, one dropping connections at the end of data, and the sender's
own domain where the DSNs arrive), `volley serve` as a process (fsync durability,
delivery on, a small queue.max_size, a short retry schedule so deferred mail drains in
the run), and `volley blast` as a process sending one templated message whose
X-Soak-Id header is unique per message. soak_faults.py injects worker kills, sink
restarts and queue fills; soak_report.py reconciles and prints the table.

At the end the faults stop, delivery resumes, the queue drains (bounded wait), every
process is stopped (also on Ctrl-C, SIGTERM or an exception) and the table is printed.
Exit 0 only if nothing was lost, duplicates stay within the crash window, and each
worker's RSS at the end is within 20% of its value one minute into its life.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import soak_report
from soak_faults import KINDS, Faults, RssWatch, status
from soak_lab import Blast, DemoError, ServerProcess, Sink, SinkSpec

PROG = "soak"
ORIGIN = "soak.test"
SENDER = f"soak@s.{ORIGIN}"
SINKS = (
    SinkSpec("127.0.0.2", f"r0.{ORIGIN}"),
    SinkSpec("127.0.0.3", f"r1.{ORIGIN}", defer_rate=0.10),
    SinkSpec("127.0.0.4", f"r2.{ORIGIN}", reject_rate=0.03),
    SinkSpec("127.0.0.5", f"r3.{ORIGIN}", disconnect_rate=0.05),
    SinkSpec("127.0.0.6", f"s.{ORIGIN}"),  # the sender's domain: DSNs arrive here
)
RECIPIENT_DOMAINS = 4  # r0 .. r3, blast's {d}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Soak volley serve under load and faults.")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault schedule (default: random)")
    p.add_argument("--workers", type=int, default=2, help="volley serve workers (default 2)")
    p.add_argument("--rate", type=float, default=100.0, help="blast messages/s (default 100)")
    p.add_argument("--concurrency", type=int, default=10, help="blast sessions (default 10)")
    p.add_argument("--queue-size", default="1MiB", help="queue.max_size (default 1MiB)")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the queue to empty")
    p.add_argument("--faults", default=",".join(KINDS),
                   help=f"fault kinds on the schedule, comma-separated (default {','.join(KINDS)})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--keep", metavar="DIR", help="work in DIR (new or empty) and keep it")
    args = p.parse_args(argv)
    args.faults = tuple(k for k in args.faults.split(",") if k)
    if any(k not in KINDS for k in args.faults):
        p.error(f"--faults: kinds are {', '.join(KINDS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    return args


def zone() -> dict[str, Any]:
    data: dict[str, Any] = {}
    for spec in SINKS:
        data[spec.domain] = {"MX": [[10, f"mx.{spec.domain}"]]}
        data[f"mx.{spec.domain}"] = {"A": [spec.host]}
    return data


def write_config(work: Path, args: argparse.Namespace, dns_address: str, sink_port: int) -> Path:
    import tomli_w

    config = {
        "server": {"hostname": f"relay.{ORIGIN}", "workers": args.workers, "shutdown_timeout": "5s"},
        "listeners": [{"address": "127.0.0.1:0"}],
        "queue": {"path": str(work / "queue"), "durability": "fsync", "max_size": args.queue_size},
        "relay": {"networks": ["127.0.0.0/8"]},
        "control": {"socket": str(work / "volley.sock")},
        "log": {"delivery": str(work / "delivery.jsonl")},
        # A short retry schedule and backoff: deferred mail and restarted sinks are
        # retried within the run, so the final drain is seconds, not hours.
        "delivery": {"enabled": True, "port": sink_port, "poll_interval": "50ms",
                     "retry": "1s, 2s, 4s", "backoff": "1s", "backoff_max": "4s"},
        "dns": {"nameservers": [dns_address], "timeout": "2s"},
    }
    path = work / "volley.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def write_message(work: Path) -> Path:
    """The blast template: {id} is unique per run and message, {n} the message number."""
    body = "".join(f"line {i:02d} of a soak message, padding it to about a kilobyte.\r\n" for i in range(12))
    text = (f"From: Soak <{SENDER}>\r\nTo: undisclosed-recipients:;\r\nSubject: soak {{n}}\r\n"
            f"Message-ID: <{{id}}@{ORIGIN}>\r\nX-Soak-Id: {{id}}\r\n\r\n{body}")
    path = work / "message.eml"
    path.write_text(text)
    return path


async def start_sinks(work: Path, seed: int, stack: contextlib.AsyncExitStack) -> list[Sink]:
    """Every sink on one port (delivery.port is one number); another port if one is taken."""
    from engine.lab.demo.processes import free_port

    for _ in range(5):
        port = free_port(SINKS[0].host)
        sinks = [Sink(spec, work, port, seed + 1000 * i) for i, spec in enumerate(SINKS)]
        started = []
        for sink in sinks:
            stack.push_async_callback(sink.stop)
            if not await sink.start():
                break
            started.append(sink)
        if len(started) == len(sinks):
            return sinks
        for sink in started:
            await sink.stop()
    raise DemoError(f"the sinks could not start: see {work}/sink-*.log")


def blast_argv(args: argparse.Namespace, port: int, message: Path) -> list[str]:
    return ["--to", f"127.0.0.1:{port}", "--duration", f"{args.duration:g}s", "-n", "0",
            "-c", str(args.concurrency), "--rate", f"{args.rate:g}", "--timeout", "20s",
            "--message", str(message), "--template", "--from", SENDER,
            "--domains", str(RECIPIENT_DOMAINS), "--to-template", "u{n}@r{d}." + ORIGIN]


async def sample_rss(server: ServerProcess, rss: RssWatch) -> None:
    while True:
        with contextlib.suppress(Exception):
            rss.sample((await status(server.sock))["workers"])
        await asyncio.sleep(2.0)


async def drain(server: ServerProcess, seconds: float) -> int:
    """Queued messages once the queue is empty or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        queued = int((await status(server.sock))["queue"]["messages"])
        if queued == 0 or time.monotonic() > deadline:
            return queued
        await asyncio.sleep(0.5)  # polling the queue's exact count, with a deadline


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from engine.lab.dns import start_dns_server

    rng = random.Random(args.seed)
    say(f"{PROG}: seed {args.seed}, {args.duration:g}s at {args.rate:g} msgs/s, working in {work}")
    async with contextlib.AsyncExitStack() as stack:
        dns = await start_dns_server(zone(), origin=ORIGIN + ".")
        stack.push_async_callback(dns.close)
        sinks = await start_sinks(work, args.seed, stack)
        server = await ServerProcess.start(work, write_config(work, args, dns.address, sinks[0].port))
        stack.push_async_callback(server.stop)
        faults = Faults(sock=server.sock, sinks=sinks, domains=[s.domain for s in SINKS], rng=rng,
                        interval=max(3.0, args.duration / 25), fill_seconds=min(15.0, args.duration / 5),
                        outage=min(3.0, args.duration / 10), kinds=args.faults)
        rss = RssWatch(after=min(60.0, args.duration / 4))
        blast = Blast(work, blast_argv(args, server.port, write_message(work)))
        stack.push_async_callback(blast.stop)
        await blast.start()
        tasks = [asyncio.ensure_future(faults.run()), asyncio.ensure_future(sample_rss(server, rss))]
        stack.push_async_callback(_cancel, tasks)
        say(f"{PROG}: volley serve pid {server.proc.pid} on 127.0.0.1:{server.port},"
            f" sinks {SINKS[0].host}..{SINKS[-1].host}:{sinks[0].port}")
        report = await blast.report()
        await _cancel(tasks[:1])  # the faults stop with the load
        await faults.settle()
        say(f"{PROG}: load done ({report['accepted']:,} accepted); draining the queue")
        queued = await drain(server, args.drain)
        await asyncio.sleep(1.5)  # workers push their counters every second: let the last push land
        received = (await server.counters()).get("volley_messages_received_total")
        workers = (await status(server.sock))["workers"]
        rss.sample(workers)
        await _cancel(tasks)
        await server.stop()
        for sink in sinks:
            await sink.stop()
    sink_faults = {k: sum(s.total(k) for s in sinks) for k in ("deferred", "rejected", "disconnected")}
    result = soak_report.reconcile(
        report, soak_report.scan_stores([s.store for s in sinks]), queued, received,
        soak_report.delivery_log(work / "delivery.jsonl"), dict(faults.counts), faults.kill_bound,
        rss.rows({int(w["pid"]) for w in workers if w.get("pid")}), sink_faults, queued == 0)
    result.update(seed=args.seed, duration=args.duration, events=faults.events)
    return result


async def _cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _cancellable(coro: Any) -> Any:
    """SIGTERM handled as Ctrl-C is: cancel, so the exit stack stops every process."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await coro


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="volley-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(_cancellable(soak(args, work)))
    except (asyncio.CancelledError, KeyboardInterrupt):
        say(f"\n{PROG}: interrupted; everything it started is stopped")
        return 130
    except (DemoError, OSError) as err:
        say(f"{PROG}: {err}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for t, kind, detail in result["events"]:
            print(f"  t={t:>6.1f}s  {kind:<13} {detail}")
        print(soak_report.render(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
