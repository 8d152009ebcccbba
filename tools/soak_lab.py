"""The soak's processes: lab sinks (`volley sink --json --store`), `volley serve`, and
`volley blast`, each a real child process on 127.0.0.0/8.

Readiness always comes from the process's own word (the sink's "ready" JSON line, the
server's "ready" log line), never from a fixed wait. `stop()` is safe to call twice and
on a process that already died; the orchestrator calls it for every process it started,
Ctrl-C and exceptions included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.lab.demo.processes import DemoError, ServerProcess, log_file, reap

__all__ = ["Blast", "DemoError", "ServerProcess", "Sink", "SinkSpec"]


@dataclass(frozen=True)
class SinkSpec:
    """One lab sink: its address, its domain and the faults it answers with."""

    host: str
    domain: str
    defer_rate: float = 0.0
    reject_rate: float = 0.0
    disconnect_rate: float = 0.0


class Sink:
    """`volley sink --json --store DIR` on one address; restartable on the same port."""

    def __init__(self, spec: SinkSpec, work: Path, port: int, seed: int) -> None:
        self.spec = spec
        self.port = port
        self.seed = seed
        self.store = work / "sinks" / spec.host
        self.log = work / f"sink-{spec.host}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.counts: dict[str, int] = {}  # the last counter line, summed over restarts below
        self.totals: dict[str, int] = {}
        self.starts = 0

    async def start(self) -> bool:
        """Start (or restart) the sink; False if it did not say ready (port taken)."""
        s = self.spec
        args = ["--json", "--no-starttls", "--interval", "0.5", "--listen", f"{s.host}:{self.port}",
                "--store", str(self.store), "--seed", str(self.seed + self.starts),
                "--defer-rate", str(s.defer_rate), "--reject-rate", str(s.reject_rate),
                "--disconnect-rate", str(s.disconnect_rate)]
        self.starts += 1
        with log_file(self.log) as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.lab.sink", *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
        except TimeoutError:
            line = b""
        if b'"ready"' not in line:
            await self.stop()
            return False
        self.counts = {}
        self._reader = asyncio.ensure_future(self._read(self.proc))
        return True

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") in (None, "stopped"):
                    self.counts = {k: int(event.get(k, 0)) for k in
                                   ("messages", "deferred", "rejected", "disconnected")}

    async def stop(self) -> None:
        """SIGTERM (the sink closes its connections: a reset to its clients), then reap."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        await reap(proc, 10.0, terminate=True)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(reader, 5.0)
        for key, value in self.counts.items():
            self.totals[key] = self.totals.get(key, 0) + value
        self.counts = {}

    def total(self, key: str) -> int:
        return self.totals.get(key, 0) + self.counts.get(key, 0)


class Blast:
    """`python -m engine.lab.blast --json` for a fixed duration; its report at the end."""

    def __init__(self, work: Path, argv: list[str]) -> None:
        self.work = work
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0

    async def start(self) -> None:
        with log_file(self.work / "blast.log") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.lab.blast", *self.argv, "--json",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err)
        self.started = time.monotonic()

    async def report(self) -> dict[str, Any]:
        """Wait for the run to end and return its JSON report (DemoError if there is none)."""
        assert self.proc is not None
        out, _ = await self.proc.communicate()
        (self.work / "blast.json").write_bytes(out)
        try:
            report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DemoError(f"volley blast printed no report (exit {self.proc.returncode}):"
                            f" see {self.work / 'blast.log'}") from None
        return report

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            await reap(proc, 10.0, terminate=True)


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB (proc(5)); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
