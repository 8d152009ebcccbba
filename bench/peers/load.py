"""Load generators for bench/run.py, each run as its own process so its CPU is its own.

* `smtp_source`: Postfix's C `smtp-source` (HELO, lock-step: no pipelining; `-d` keeps
  each session's connection for all its messages). It reports nothing but its exit
  status, which is non-zero at the first refused message, so rc 0 = all accepted;
  the time from end of DATA to 250 is not known.
* `blast`: `python -m engine.lab.blast` (`volley blast`), through relay.py's wrapper that
  prints time.monotonic() after the imports; `pipelining=False` makes it lock-step
  like smtp-source (the fallback when smtp-source is not installed).

Message size is the whole message: smtp-source's `-l` is the body, and it adds
~147 bytes of headers (From, To, Date, Message-Id), so it gets `-l size-147`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from e2e import run_child
from relay import BLAST_WRAPPER

SMTP_SOURCE = "/usr/sbin/smtp-source"
SOURCE_HEADERS = 147  # bytes smtp-source adds before the -l body (measured, 3.7)
SENDER = "sender@peers.test"


@dataclass
class LoadResult:
    messages: int
    accepted: int
    t0: float  # time.monotonic() when sending started
    elapsed_s: float  # first connection -> last connection closed
    cpu_s: float  # the generator process's CPU (rusage)
    p50_ms: float | None = None  # end of DATA -> final reply, if the generator knows it
    p99_ms: float | None = None
    error: str = ""

    @property
    def msgs_per_s(self) -> float:
        return self.accepted / self.elapsed_s if self.elapsed_s > 0 else 0.0


def smtp_source(address: str, messages: int, sessions: int, size: int, domain: str,
                cap: float) -> LoadResult:
    cmd = [SMTP_SOURCE, "-m", str(messages), "-s", str(sessions), "-l", str(max(1, size - SOURCE_HEADERS)),
           "-r", "1", "-f", SENDER, "-t", f"rcpt@{domain}", "-M", "client.peers.test", "-d", address]
    rc, _, err, t0, wall, cpu = run_child(cmd, cap)
    text = err.decode("utf-8", "replace").strip()
    if rc != 0:
        return LoadResult(messages, 0, t0, wall, cpu, error=f"smtp-source exit {rc}: {text[-500:]}")
    return LoadResult(messages, messages, t0, wall, cpu)


def smtp_sources(address: str, messages: int, sessions: int, size: int, domains: int,
                 cap: float) -> LoadResult:
    """`domains` smtp-source processes at once, process k sending to rcpt@dk.example
    (smtp-source has one recipient domain per process): the sessions and messages split
    between them. One shell waits for all, so the CPU and exit status cover every one."""
    procs = []
    for k in range(domains):
        n = messages // domains + (1 if k < messages % domains else 0)
        s = max(1, sessions // domains + (1 if k < sessions % domains else 0))
        procs.append(" ".join([SMTP_SOURCE, "-m", str(n), "-s", str(s), "-l", str(max(1, size - SOURCE_HEADERS)),
                               "-r", "1", "-f", SENDER, "-t", f"rcpt@d{k}.example", "-M", "client.peers.test",
                               "-d", address]))
    pids = " ".join(f"$p{k}" for k in range(domains))
    script = "".join(f"{cmd} & p{k}=$!; " for k, cmd in enumerate(procs)) + \
        f"fail=0; for p in {pids}; do wait $p || fail=1; done; exit $fail"
    rc, _, err, t0, wall, cpu = run_child(["sh", "-c", script], cap, "smtp-source")
    text = err.decode("utf-8", "replace").strip()
    if rc != 0:
        return LoadResult(messages, 0, t0, wall, cpu, error=f"smtp-source exit {rc}: {text[-500:]}")
    return LoadResult(messages, messages, t0, wall, cpu)


def blast(address: str, messages: int, sessions: int, size: int, domains: int, pipelining: bool,
          cap: float, rate: float = 0.0) -> LoadResult:
    cmd = [sys.executable, "-c", BLAST_WRAPPER, "--to", address, "-n", str(messages), "-c", str(sessions),
           "--size", str(size), "--domains", str(domains), "--timeout", "30", "--json",
           *([] if pipelining else ["--no-pipelining"]), *(["--rate", str(rate)] if rate else [])]
    rc, out, err, t_launch, _, cpu = run_child(cmd, cap)
    text = err.decode("utf-8", "replace")
    t0 = next((float(line[3:]) for line in text.splitlines() if line.startswith("T0 ")), t_launch)
    if rc not in (0, 1) or not out.strip():
        return LoadResult(messages, 0, t0, 0.0, cpu, error=f"blast exit {rc}: {text.strip()[-500:]}")
    report: dict[str, Any] = json.loads(out)
    lat = report.get("latency_ms") or {}
    # The report's own CPU figure leaves out interpreter start-up; rusage is the fallback.
    result = LoadResult(messages, int(report.get("accepted", 0)), t0, float(report.get("elapsed", 0.0)),
                        float(report.get("cpu_s", cpu)), lat.get("p50"), lat.get("p99"))
    if result.accepted != messages:
        result.error = (f"blast: accepted {result.accepted}/{messages}, refused {report.get('refused')},"
                        f" errors {report.get('errors')}")
    return result
