"""`volley demo`: the whole loop on loopback with one command.

    volley demo [--domains 20] [--messages 20000] [--concurrency 50] [--latency 0ms]
                [--workers 2] [--keep DIR]

In a temporary directory (or DIR with --keep): a lab DNS zone (`engine.lab.dns`, in this
process) with domains d0.demo.test .. whose MX hosts resolve to 127.0.0.2, 127.0.0.3, ..;
one `volley sink` process listening on all of those addresses at one port; `volley
serve` as a real process with a generated config (delivery on, `dns.nameservers` = the
lab DNS, `delivery.port` = the sinks' port, queue, logs and control socket in the
directory); then `engine.lab.blast` (in this process) sends the messages over the domains.
A live line shows received/s (from the control socket's metrics) and delivered/s (the
sinks' count); the end is a one-screen report (`engine.lab.demo.report`). Everything it
started is stopped, Ctrl-C included. Exit 0 when every message was delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.cmdline import duration, positive_int
from engine.lab.demo import report as demo_report
from engine.lab.demo.processes import DemoError, ServerProcess, SinkProcess

PROG = "volley demo"
MAX_SINKS = 100  # listeners on 127.0.0.2 ..; more domains share them round-robin
ORIGIN = "demo.test"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domains", type=positive_int, default=20, help="destination domains (default 20)")
    p.add_argument("--messages", type=positive_int, default=20000, help="messages to send (default 20000)")
    p.add_argument("--concurrency", type=positive_int, default=50, help="sending sessions (default 50)")
    p.add_argument("--latency", type=duration, default=0.0, metavar="DURATION",
                   help='the sinks\' delay before each end-of-data reply, e.g. "20ms" (default 0ms)')
    p.add_argument("--workers", type=positive_int, default=2, help="volley serve workers (default 2)")
    p.add_argument("--size", type=positive_int, default=1024, help="message bytes (default 1024)")
    p.add_argument("--durability", choices=("fsync", "batch", "memory"), default="fsync",
                   help="queue.durability of the server (default fsync)")
    p.add_argument("--stall", type=duration, default=60.0, metavar="DURATION",
                   help="give up when nothing is delivered for this long (default 60s)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR (new or empty) and keep it")


def add_parser(sub: Any) -> None:
    """Register `volley demo` on the `volley` subparsers."""
    p = sub.add_parser("demo", help="run blast -> serve -> sinks on loopback and report",
                       description="The whole loop on loopback: lab DNS, sinks, volley serve, blast.")
    add_arguments(p)
    p.set_defaults(handler=run)


# --- the lab: zone, addresses, config -----------------------------------------------


def sink_hosts(domains: int) -> list[str]:
    first = ipaddress.IPv4Address("127.0.0.2")
    return [str(first + i) for i in range(min(domains, MAX_SINKS))]


def zone(domains: int, hosts: list[str]) -> dict[str, Any]:
    """d{i}.demo.test MX 10 mx.d{i}.demo.test, whose A is a sink address."""
    data: dict[str, Any] = {}
    for i in range(domains):
        data[f"d{i}.{ORIGIN}"] = {"MX": [[10, f"mx.d{i}.{ORIGIN}"]]}
        data[f"mx.d{i}.{ORIGIN}"] = {"A": [hosts[i % len(hosts)]]}
    return data


def write_config(work: Path, args: argparse.Namespace, dns_address: str, sink_port: int) -> Path:
    import tomli_w

    config = {
        "server": {"hostname": f"relay.{ORIGIN}", "workers": args.workers, "shutdown_timeout": "5s"},
        "listeners": [{"address": "127.0.0.1:0"}],
        "queue": {"path": str(work / "queue"), "durability": args.durability},
        "relay": {"networks": ["127.0.0.0/8"]},
        "control": {"socket": str(work / "volley.sock")},
        "log": {"delivery": str(work / "delivery.jsonl")},
        "delivery": {"enabled": True, "port": sink_port, "poll_interval": "50ms"},
        "dns": {"nameservers": [dns_address], "timeout": "2s"},
    }
    path = work / "volley.toml"
    path.write_text(tomli_w.dumps(config))
    return path


# --- the run -------------------------------------------------------------------------


async def _live(live: demo_report.Live, server: ServerProcess, sinks: SinkProcess) -> None:
    while True:
        await asyncio.sleep(1.0)
        counters = await server.counters()
        # Workers push their counters every second, the sinks every 0.25 s: what was
        # delivered was received, whatever the push lag says.
        received = max(counters.get("volley_messages_received_total", 0.0), sinks.messages)
        live.show(received, sinks.messages, int(counters.get("volley_queue_messages", 0)))


async def _run_blast(args: argparse.Namespace, port: int) -> Any:
    from engine.lab.blast.run import BlastOptions
    from engine.lab.blast.run import run as blast_run

    return await blast_run(BlastOptions(
        host="127.0.0.1", port=port, messages=args.messages, concurrency=args.concurrency,
        size=args.size, domains=args.domains, rcpt_template="u{n}@d{d}." + ORIGIN, timeout=30.0))


async def demo(args: argparse.Namespace, work: Path) -> demo_report.Outcome:
    """Start the lab, send, wait for delivery, stop everything; the outcome to report."""
    from engine.lab.dns import start_dns_server

    hosts = sink_hosts(args.domains)
    data = zone(args.domains, hosts)
    (work / "zone.json").write_text(json.dumps(data, indent=1))
    async with contextlib.AsyncExitStack() as stack:
        dns = await start_dns_server(data, origin=ORIGIN + ".")
        stack.push_async_callback(dns.close)
        sinks = await SinkProcess.start(work, hosts, args.latency)
        stack.push_async_callback(sinks.stop)
        server = await ServerProcess.start(work, write_config(work, args, dns.address, sinks.port))
        stack.push_async_callback(server.stop)
        print(f"{PROG}: lab DNS {dns.address}, {len(hosts)} sinks on {hosts[0]}..{hosts[-1]}:"
              f"{sinks.port}, volley serve on 127.0.0.1:{server.port} (pid {server.proc.pid}),"
              f" working in {work}", flush=True)
        await sinks.expect(args.messages)
        cpu0 = demo_report.tree_cpu_seconds(server.proc.pid)
        t0 = time.monotonic()
        live = demo_report.Live(sys.stdout, args.messages, tty=sys.stdout.isatty())
        ticker = asyncio.ensure_future(_live(live, server, sinks))
        try:
            report = await _run_blast(args, server.port)
            note = ""
            t_last = None
            if report.accepted:
                if report.accepted < args.messages:
                    await sinks.expect(report.accepted)
                t_last = await sinks.wait_reached(report.accepted, args.stall)
                if t_last is None:
                    note = f"nothing delivered for {args.stall:g}s (or the sinks died)"
            else:
                note = "the server accepted nothing"
        finally:
            ticker.cancel()
            live.end()
        cpu = demo_report.tree_cpu_seconds(server.proc.pid) - cpu0
        delivered = report.accepted if t_last is not None else sinks.messages
        out_seconds = (t_last if t_last is not None else time.monotonic()) - t0
    # Everything stopped: the delivery log is complete now.
    return demo_report.Outcome(
        messages=args.messages, size=args.size, domains=args.domains, sinks=len(hosts),
        concurrency=args.concurrency, workers=args.workers, durability=args.durability,
        latency_ms=args.latency * 1000, blast=report, delivered=delivered, out_seconds=out_seconds,
        server_cpu=cpu, queue_times=demo_report.queue_times(work / "delivery.jsonl"),
        workdir=work, kept=bool(args.keep), note=note)


async def _cancellable(coro: Any) -> Any:
    """Run `coro` with SIGTERM handled as Ctrl-C is: cancel it, so every part it started
    is stopped on the way out (the exit stack in `demo`)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await coro


def _workdir(keep: str | None) -> Path:
    if not keep:
        return Path(tempfile.mkdtemp(prefix="volley-demo-"))
    work = Path(keep).resolve()
    if work.exists() and any(work.iterdir()):
        raise DemoError(f"--keep {keep}: the directory is not empty (an old queue would be relayed too)")
    work.mkdir(parents=True, exist_ok=True)
    return work


def run(args: argparse.Namespace) -> int:
    """The `volley demo` handler: 0 when every message was delivered, 1 otherwise."""
    import uvloop

    try:
        work = _workdir(args.keep)
    except (DemoError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            outcome = runner.run(_cancellable(demo(args, work)))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"\n{PROG}: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (DemoError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(demo_report.render(outcome), flush=True)
    return 0 if outcome.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.lab.demo ...`, the same as `volley demo ...`."""
    p = argparse.ArgumentParser(prog=PROG, description="The whole loop on loopback.")
    add_arguments(p)
    return run(p.parse_args(argv))

