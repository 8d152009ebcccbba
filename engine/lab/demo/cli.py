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
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.cmdline import duration, positive_int
from engine.lab.demo import report as demo_report

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


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


# --- the processes -------------------------------------------------------------------


class DemoError(Exception):
    """The demo could not run (a part failed to start); the message says which."""


class SinkProcess:
    """`volley sink --json` on every sink address, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.messages = 0
        self.progress = time.monotonic()  # when `messages` last moved
        self.reached: dict[int, float] = {}
        self.ready: dict[str, Any] = {}
        self.changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, work: Path, hosts: list[str], latency: float) -> SinkProcess:
        """Retries on another port if one was taken meanwhile on some address."""
        for _ in range(5):
            port = free_port(hosts[0])
            listen = [arg for h in hosts for arg in ("--listen", f"{h}:{port}")]
            with open(work / "sink.log", "ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "engine.lab.sink", "--json", "--no-starttls", "--interval",
                    "0.25", "--targets-from-stdin", "--latency", f"{latency * 1000:g}ms", *listen,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err)
            sink = cls(proc)
            try:
                if await sink._wait_ready(30.0):
                    return sink
            except BaseException:  # cancelled (Ctrl-C) while starting: stop it all the same
                await sink.stop()
                raise
            await sink.stop()
        raise DemoError(f"the sinks could not start: see {work / 'sink.log'}")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "ready":
                self.ready = event
            elif kind == "reached":
                self.reached[int(event["target"])] = float(event["t"])
            elif kind is None and int(event.get("messages", 0)) != self.messages:
                self.messages = int(event["messages"])
                self.progress = time.monotonic()
            self.changed.set()
        self.changed.set()  # EOF: the process is gone

    async def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready and not self._reader.done() and time.monotonic() < deadline:
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))
        return bool(self.ready)

    @property
    def port(self) -> int:
        return int(str(self.ready["listeners"][0]).rpartition(":")[2])

    async def expect(self, count: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{count}\n".encode())
        await self.proc.stdin.drain()

    async def wait_reached(self, count: int, stall: float) -> float | None:
        """Monotonic time of the message that made the count `count`; None if the count
        stopped moving for `stall` seconds or the sink died."""
        self.progress = time.monotonic()
        while count not in self.reached:
            if self._reader.done() or time.monotonic() - self.progress > stall:
                return None
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)
        return self.reached[count]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
        await _reap(self.proc, 10.0)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class ServerProcess:
    """`volley serve -c FILE`, its JSON log in work/volley.log."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, sock: Path) -> None:
        self.proc = proc
        self.log = log
        self.sock = sock
        self.port = 0

    @classmethod
    async def start(cls, work: Path, config: Path) -> ServerProcess:
        log = work / "volley.log"
        with open(log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine", "serve", "-c", str(config), cwd=work,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err)
        server = cls(proc, log, work / "volley.sock")
        deadline = time.monotonic() + 60.0
        try:
            while time.monotonic() < deadline and proc.returncode is None:
                ready = server._ready_line()
                if ready is not None:
                    server.port = int(str(ready["listeners"][0]).rpartition(":")[2])
                    return server
                await asyncio.sleep(0.05)  # polling the log for the ready line, with a deadline
        except BaseException:  # cancelled (Ctrl-C) while starting: stop it all the same
            await server.stop()
            raise
        await server.stop()
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise DemoError("volley serve did not become ready:\n  " + "\n  ".join(tail))

    def _ready_line(self) -> dict[str, Any] | None:
        with open(self.log, "rb") as f:
            for line in f:
                if b'"ready"' in line and b'"supervisor"' in line:
                    event: dict[str, Any] = json.loads(line)
                    if event.get("event") == "ready":
                        return event
        return None

    async def counters(self) -> dict[str, float]:
        """The server's Prometheus counters, from `metrics` on the control socket."""
        from engine.control.client import ControlError, request
        from engine.control.protocol import Metrics

        try:
            reply = await asyncio.to_thread(request, str(self.sock), Metrics(), 5.0)
        except ControlError:
            return {}
        return demo_report.counters(str(reply.get("text", "")))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        await _reap(self.proc, 30.0)


async def _reap(proc: asyncio.subprocess.Process, grace: float) -> None:
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


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

