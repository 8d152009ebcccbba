"""The processes `volley demo` starts and watches: `volley sink` and `volley serve`.

Each is a real child process; readiness comes from its own word (the sink's "ready"
JSON line, the server's "ready" log line), never from a fixed wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from engine.lab.demo import report as demo_report


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
            with log_file(work / "sink.log") as err:
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
        await reap(self.proc, 10.0)
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
        with log_file(log) as err:
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
        await reap(self.proc, 30.0)


async def reap(proc: asyncio.subprocess.Process, grace: float, *, terminate: bool = False) -> None:
    """Wait up to `grace` seconds for `proc` to exit (after SIGTERM if `terminate`), then
    kill it; returns once it is gone. Also used by the soak (tools/soak_lab.py)."""
    if terminate and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def log_file(path: Path) -> IO[bytes]:
    """A child's stderr, appended to `path` (opening a local file does not block for long)."""
    return open(path, "ab")  # noqa: SIM115 (the caller's with-block closes it)
