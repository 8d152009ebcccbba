"""One cell of bench/run.py's table (run.py has the theory of operation): start the
system, warm it up, then the measured runs, each timed from the first message sent
to the last one the sink counts, with the server's CPU and memory sampled around it.

`CellMeasuring` is the part of run.py's `Bench` that does this; the attributes and
peers it declares are the bench's own (`Bench.__init__`, `Bench.sink`, `Bench.server`,
`Bench.generate`, `Bench.messages`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster  # noqa: E402
import shaping  # noqa: E402
from e2e import probe_ms  # noqa: E402  (bench/ is not a package)
from peers import load, report  # noqa: E402
from peers.procs import sample  # noqa: E402
from relay_peers import descendants_cpu, worker_split  # noqa: E402
from run_rows import Row, System  # noqa: E402


class CellMeasuring:
    args: argparse.Namespace

    def sink(self, latency: bool) -> Any:
        raise NotImplementedError

    def server(self, row: Row, system: System, sink: Any) -> Any:
        raise NotImplementedError

    def generate(self, row: Row, system: System, address: str, n: int, rate: float = 0.0) -> load.LoadResult:
        raise NotImplementedError

    def messages(self, row: Row) -> int:
        raise NotImplementedError

    def cell(self, row: Row, system: System) -> dict[str, Any]:
        a = self.args
        if row.kind == "shaping":
            return shaping.cell(self, row, system)  # its own sinks, DNS zone and load
        if row.kind == "cluster":
            return cluster.cell(self, row, system)  # its own nodes, Redis, sink and DNS
        n = self.messages(row)
        runs = 1 if row.latency_sink else a.runs
        sink = self.sink(row.latency_sink) if row.kind in ("relay", "newsletter") else None
        server = self.server(row, system, sink)
        results: list[dict[str, Any]] = []
        error = ""
        try:
            address = server.start()
            # Warm-up: caches, pools, processes. Spread over many domains it sends one
            # message to each (up to n), so the runs find their DNS answers cached (the
            # state of a relay that saw these domains within the TTL), at a rate the
            # Python lab DNS server keeps up with: overloaded, it drops queries, and the
            # lookups that time out defer their messages for a minute.
            many = row.domains > 50
            w = max(a.warmup, min(row.domains, n)) if many else a.warmup
            server.details["warmup_msgs_per_s"] = self.warm_up(row, system, server, address, sink, w,
                                                               a.dns_warm_rate if many else 0.0)
            for i in range(runs):
                r = self.one_run(row, system, server, address, sink, n)
                results.append(r)
                print(f"  {row.id:<14} {system.id:<18} run {i + 1}/{runs}: {r['msgs_per_s']:,.0f} msgs/s,"
                      f" CPU {r['cpu_s_per_1k']:.3f} s/1k, RSS {r['rss_mib']:.0f} MiB (anon {r['anon_mib']:.0f})",
                      file=sys.stderr, flush=True)
        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
            error = f"{err}\n{server.diagnostics()}"
        finally:
            server.stop()
        if error and not results:
            raise RuntimeError(error)
        # Runs done before a failure still count, in a cell marked incomplete.
        return report.summarise(row, system, results, {**server.details, **({"error": error} if error else {})})

    def warm_up(self, row: Row, system: System, server: Any, address: str, sink: Any, w: int,
                rate: float) -> float:
        """Sends `w` messages (and waits for their delivery); returns the rate."""
        if sink is not None:
            target = sink.settle()[0] + w
            sink.expect(target)
        res = self.generate(row, system, address, w, rate)
        if res.error:
            raise RuntimeError(f"warm-up: {res.error}")
        if sink is None:
            return res.msgs_per_s
        cap = 120 + w / 20
        try:
            t_done = sink.wait_reached(target, self.args.stall, cap)
        except RuntimeError as err:
            if not hasattr(server, "flush"):
                raise
            # The Python lab DNS, starved of CPU on a busy host, can miss the resolver's
            # timeout; those messages wait for their retry (a minute). Flush them once.
            print(f"  warm-up: {err}; flushing the queue", file=sys.stderr, flush=True)
            try:
                server.flush()
            except Exception as flush_err:  # ControlError: a server too busy to answer in 10 s
                # fails this cell, not the whole run (it ended a 20-minute run at load 27)
                raise RuntimeError(f"warm-up: {err}; flush: {flush_err}") from flush_err
            t_done = sink.wait_reached(target, self.args.stall, cap)
        server.drain(w, self.args.stall, cap)
        return w / (t_done - res.t0)

    def one_run(self, row: Row, system: System, server: Any, address: str, sink: Any, n: int) -> dict[str, Any]:
        a = self.args
        time.sleep(a.rest)
        probe = probe_ms()
        if sink is not None:
            target = sink.settle()[0] + n
            sink.expect(target)
            sink0 = sample(sink.proc.pid).cpu_s
        per0 = descendants_cpu(server.root_pid) if row.kind == "newsletter" else {}
        before = sample(server.root_pid)
        res = self.generate(row, system, address, n)
        if res.error:
            raise RuntimeError(res.error)
        r: dict[str, Any] = {"messages": n, "accepted": res.accepted, "probe_ms": probe,
                             "intake_msgs_per_s": res.msgs_per_s, "msgs_per_s": res.msgs_per_s,
                             "client_cpu_us_per_msg": 1e6 * res.cpu_s / n,
                             "reply_p50_ms": res.p50_ms, "reply_p99_ms": res.p99_ms}
        if sink is not None:
            cap = 120 + n / 20
            t_done = sink.wait_reached(target, a.stall, cap)
            delays = server.drain(n, a.stall, cap)
            r["msgs_per_s"] = n / (t_done - res.t0)
            r["sink_cpu_us_per_msg"] = 1e6 * (sample(sink.proc.pid).cpu_s - sink0) / n
            r["delivery_p50_ms"] = None if not delays else 1000 * report.pct(delays, 0.50)
            r["delivery_p99_ms"] = None if not delays else 1000 * report.pct(delays, 0.99)
            r["delivery_samples"] = len(delays)
        after = sample(server.root_pid, pss=True)
        cpu = after.cpu_s - before.cpu_s
        if per0:  # one request lands on one worker: how the work spread
            r["worker_cpu_split_pct"] = worker_split(per0, descendants_cpu(server.root_pid), a.workers)
        r.update({"server_cpu_s": cpu, "cpu_s_per_1k": 1000 * cpu / n, "rss_mib": after.rss_kib / 1024,
                  "pss_mib": after.pss_kib / 1024, "anon_mib": after.anon_kib / 1024,
                  "anon_before_mib": before.anon_kib / 1024,  # RssAnon flat? (the prefill row)
                  "file_mib": after.file_kib / 1024, "shmem_mib": after.shmem_kib / 1024,
                  "process_memory": [m.as_dict() for m in after.memory],
                  "max_process_rss_mib": max((p[3] for p in after.processes), default=0) / 1024,
                  "processes": len(after.processes)})
        return r
