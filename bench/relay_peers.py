"""Peer processes and measurements for bench/relay.py: the CPU of a process tree per
process, the DNS/sink peer processes, and the delivery-log reader."""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import REPO, TICK, _env, _stat_fields, stop_group  # noqa: E402

SINK_HOST = "127.0.0.2"  # the MX address: not volley's own listener address
LIFETIME = 3600  # seconds any peer process may live, whatever happens to this runner


# --- CPU per process ------------------------------------------------------------------

def descendants_cpu(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (comm, utime+stime+cutime+cstime seconds) for `root` and its descendants."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields is None:
            continue
        try:
            comm = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                "utf-8", "replace").strip()[:120]
        except OSError:
            comm = ""
        parents[pid] = int(fields[1])
        info[pid] = (comm, sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK)
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info:
            out[pid] = info[pid]
        todo.extend(children.get(pid, ()))
    return out


def worker_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 workers: int) -> list[float]:
    """Each of the `workers` busiest processes' share (%) of the server's Δ CPU, largest first.
    The supervisor and the `timeout` wrapper use next to nothing, so these are the workers."""
    deltas = sorted((after[p][1] - before.get(p, ("", 0.0))[1] for p in after), reverse=True)
    total = sum(deltas) or 1.0
    return [round(100 * d / total, 1) for d in deltas[:workers]]


# --- peers: DNS server and sink -------------------------------------------------------

class Peer:
    """A peer process (own session, bounded by `timeout`) printing JSON lines on stdout."""

    def __init__(self, name: str, argv: list[str], stdin: bool = False) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", str(LIFETIME), sys.executable, *argv], cwd=REPO, env=_env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.err: collections.deque[str] = collections.deque(maxlen=30)
        self.last: dict[str, Any] = {}  # the latest counter line
        self.progress = time.monotonic()  # when `last` last changed
        self.reached: dict[int, float] = {}
        self.peak_live = 0  # most connections open at once, as sampled by the counter lines
        self.cond = threading.Condition()
        self._threads = [threading.Thread(target=self._out, daemon=True),
                         threading.Thread(target=self._errs, daemon=True)]
        for t in self._threads:
            t.start()

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                self.err.append(raw.decode("utf-8", "replace").rstrip())
                continue
            with self.cond:
                if event.get("event") == "reached":
                    self.reached[int(event["target"])] = float(event["t"])
                elif "messages" in event and "event" not in event:
                    if event.get("messages") != self.last.get("messages"):
                        self.progress = time.monotonic()
                    self.last = event
                    self.peak_live = max(self.peak_live, int(event.get("live", 0)))
                else:
                    self.lines.put(event)
                self.cond.notify_all()

    def _errs(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err.append(raw.decode("utf-8", "replace").rstrip())

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no {name!r} line (exit {self.proc.poll()}):\n"
                                       + "\n".join(f"  | {line}" for line in self.err)) from None
                continue
            if event.get("event") == name:
                return event

    def stop(self) -> None:
        stop_group(self.proc)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(2)


class Sink(Peer):
    def __init__(self, chunking: bool = False) -> None:
        super().__init__("sink", ["-m", "engine.lab.sink", "--json", "--no-starttls", "--listen", f"{SINK_HOST}:0",
                                  "--interval", "0.2", "--lifetime", str(LIFETIME - 60),
                                  "--targets-from-stdin", *(["--chunking"] if chunking else [])],
                         stdin=True)
        ready = self.wait_event("ready", 30)
        self.port = int(ready["listeners"][0].rpartition(":")[2])

    def counts(self) -> tuple[int, int]:
        """(messages, connections) as of the latest counter line (≤ 0.2 s old)."""
        with self.cond:
            return int(self.last.get("messages", 0)), int(self.last.get("connections", 0))

    def settle(self) -> tuple[int, int]:
        """Counts once they have not changed for half a second."""
        seen, since = self.counts(), time.monotonic()
        while time.monotonic() - since < 0.5:
            time.sleep(0.1)
            now = self.counts()
            if now != seen:
                seen, since = now, time.monotonic()
        return seen

    def expect(self, target: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{target}\n".encode())
        self.proc.stdin.flush()

    def wait_reached(self, target: int, stall: float, cap: float) -> float:
        """time.monotonic() of the message that made the count `target`. Raises if the
        count stops moving for `stall` seconds or `cap` seconds pass."""
        deadline = time.monotonic() + cap
        with self.cond:
            self.progress = time.monotonic()
            while target not in self.reached:
                now = time.monotonic()
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sink exited {self.proc.returncode}")
                if now - self.progress > stall or now > deadline:
                    got = self.last.get("messages", 0)
                    why = f"no progress for {stall:.0f}s" if now <= deadline else f"{cap:.0f}s cap"
                    raise RuntimeError(f"sink has {got}/{target} messages ({why})")
                self.cond.wait(0.2)
            return self.reached[target]


class DeliveryLog:
    """Follows the delivery log: outcomes and the queue/latency times of new lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.tail: collections.deque[str] = collections.deque(maxlen=10)

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            if not line:
                continue
            rec = json.loads(line)
            self.outcomes[rec.get("outcome", "?")] += 1
            self.tail.append(line.decode("utf-8", "replace")[:400])
            out.append(rec)
        return out

    def wait_delivered(self, total: int, stall: float, cap: float) -> list[dict[str, Any]]:
        """New lines until `total` delivered lines were seen in all (drained), or raise."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + cap
        progress, seen = time.monotonic(), -1
        while self.outcomes["delivered"] < total:
            got += self.read()
            n = sum(self.outcomes.values())
            if n != seen:
                progress, seen = time.monotonic(), n
            now = time.monotonic()
            if now - progress > stall or now > deadline:
                raise RuntimeError(f"delivery log: {dict(self.outcomes)} of {total} expected delivered"
                                   f" (stalled {now - progress:.0f}s)")
            time.sleep(0.05)
        return got
