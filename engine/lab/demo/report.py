"""What `volley demo` measures and shows: the live line, the final report, and the readings
behind them (Prometheus counters from the control socket, CPU of a process tree from
/proc, queue times from the delivery log). Split from `engine.lab.demo`, which runs the loop.
"""

from __future__ import annotations

import collections
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

_TICK = os.sysconf("SC_CLK_TCK")


def counters(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus exposition: {name: value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and line[0] != "#" and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of `root` and every descendant, reaped ones included (cutime)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # comm may hold spaces: split after it
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = sum(int(fields[i]) for i in (11, 12, 13, 14))
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / _TICK


def percentile(ordered: list[float], q: float) -> float:
    """Nearest rank of a sorted list (as engine.lab.blast reports); nan when empty."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def queue_times(path: Path) -> list[float]:
    """Sorted arrival-to-delivery seconds of every delivered recipient in the delivery log."""
    times: list[float] = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line cut by a crash: the rest still counts
                if rec.get("outcome") == "delivered":
                    times.append(float(rec.get("queue_time", 0.0)))
    except OSError:
        return []
    times.sort()
    return times


@dataclass
class Live:
    """The one progress line, rewritten in place on a terminal, a plain line otherwise."""

    out: TextIO
    total: int
    tty: bool = False
    started: float = field(default_factory=time.monotonic)
    _prev: tuple[float, float, int] = (0.0, 0.0, 0)  # time, received, delivered

    def __post_init__(self) -> None:
        self._prev = (self.started, 0.0, 0)

    def show(self, received: float, delivered: int, queued: int) -> None:
        now = time.monotonic()
        t0, r0, d0 = self._prev
        span = max(1e-6, now - t0)
        self._prev = (now, received, delivered)
        line = (f"{now - self.started:6.1f}s  received {int(received):>9,}/{self.total:,}"
                f" ({(received - r0) / span:>7,.0f}/s)  delivered {delivered:>9,}"
                f" ({(delivered - d0) / span:>7,.0f}/s)  in queue {queued:,}")
        if self.tty:
            self.out.write("\r\x1b[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


@dataclass
class Outcome:
    """Everything the final report shows."""

    messages: int
    size: int
    domains: int
    sinks: int
    concurrency: int
    workers: int
    durability: str
    latency_ms: float  # the sinks' added latency
    blast: Any  # engine.lab.blast.run.Report
    delivered: int
    out_seconds: float  # first message sent -> last one delivered (sink clock)
    server_cpu: float
    queue_times: list[float]
    workdir: Path
    kept: bool
    note: str = ""  # why it ended early, if it did

    @property
    def ok(self) -> bool:
        return self.blast.accepted == self.messages and self.delivered >= self.messages


def render(o: Outcome) -> str:
    b = o.blast
    lat = b.latency_ms
    refused = sum(b.refused.values())
    out_rate = o.delivered / o.out_seconds if o.out_seconds > 0 else 0.0
    qt = o.queue_times
    lines = [
        "",
        f"volley demo: {o.messages:,} messages of {o.size:,} bytes to {o.domains} domains"
        f" ({o.sinks} sinks, latency {o.latency_ms:g} ms), {o.concurrency} sessions,"
        f" {o.workers} workers, durability {o.durability}",
        f"  attempted   {b.attempted:>9,} = accepted {b.accepted:,} + refused {refused:,}"
        f" + failed {b.failed:,}   (bodies sent {b.sent:,})",
        f"  delivered   {o.delivered:>9,}   to the sinks",
        f"  in          {b.msgs_per_s:>9,.0f} msgs/s   ({b.accepted:,} accepted in {b.elapsed:.2f} s)",
        f"  out         {out_rate:>9,.0f} msgs/s   (first message sent to last delivered:"
        f" {o.out_seconds:.2f} s)",
        (f"  latency     p50 {lat.p50:.1f} ms   p99 {lat.p99:.1f} ms   (end of DATA to 250, from blast,"
         f" {b.timed:,} timed)" if b.timed else "  latency     n/a   (no end of DATA was answered)"),
        f"  queue time  p50 {1000 * percentile(qt, 0.5):.0f} ms   p99 {1000 * percentile(qt, 0.99):.0f} ms"
        f"   (arrival to delivery, {len(qt):,} recipients in the delivery log)",
        f"  server CPU  {o.server_cpu:.2f} s   ({1e6 * o.server_cpu / max(1, o.delivered):,.0f} us"
        " per message received and relayed)",
    ]
    if o.kept:
        lines.append(f"  files       {o.workdir}: volley.toml, volley.log, delivery.jsonl,"
                     " queue/, zone.json, sink.log")
    if o.note:
        lines.append(f"  stopped     {o.note}")
    verdict = "all messages delivered" if o.ok else "NOT all messages were delivered"
    lines.append(f"{'PASS' if o.ok else 'FAIL'}: {o.delivered:,} of {o.messages:,} delivered: {verdict}")
    return "\n".join(lines)
