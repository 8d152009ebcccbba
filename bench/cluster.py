"""The cluster row of bench/run.py: three `volley serve` nodes on this machine relay
1 KB messages to one shaped provider, once alone (no [cluster]) and once sharing the
provider's limits through a local redis-server, so the cost of coordination is a
number: msgs/s and CPU per message for both, Redis's own CPU, and the Redis round
trips per message.

    .venv/bin/python bench/cluster.py              # 3 x 2,000 messages, 3 runs of each (~3 min)
    .venv/bin/python bench/cluster.py --quick      # 3 x 500, 1 run
    .venv/bin/python bench/run.py --only cluster   # the same, as a row group of `make bench`

One run of one variant, everything fresh:
* the loopback DNS server (in this process): d0..d9.example have MX hosts under
  .provider.test, all resolving to one sink at 127.0.0.2 (in this process, counting
  only; its peak of connections open at once is the check that the cap held);
* three nodes on 127.0.0.20-22 (1 worker each: 3 workers on 2 cores), a [[shaping]]
  entry for the provider with a rate of 100000/s (high: the grants run but do not
  limit) and the same 90 connections fleet-wide in both variants: "alone", each node
  configured with max_connections 30 (the static split an operator would write
  without a cluster); "redis", max_connections 90 shared by leases (30 a node when
  all three are busy; the nodes would open more than 90 together if let);
  "redis": [cluster] on a redis-server started for the run (no persistence), the
  defaults (heartbeat 1 s, lease_ttl 10 s);
* `volley blast` to each node at once (-c 10, 10 domains), timed from the start of the
  load until the sink has every message.
Figures: msgs/s (all nodes), CPU s per 1,000 messages of the three nodes' process
trees, redis-server's CPU per message, the EVALSHA calls Redis counted
(INFO commandstats) and their microseconds per message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import REPO  # noqa: E402  (bench/ is not a package)
from peers.procs import sample  # noqa: E402

from engine.lab.dns import DnsServerThread  # noqa: E402
from engine.lab.loop_thread import LoopThread  # noqa: E402
from engine.lab.sink.protocol import start_sinks  # noqa: E402

RESULTS = REPO / "bench" / "results" / "cluster.json"
NODES = 3
MESSAGES = 2000  # per node
SINK = "127.0.0.2"
DOMAINS = 10
VARIANTS = ("alone", "redis")
# The provider's connections, fleet-wide, the same in both variants: alone, each node
# is configured with a third (max_connections 30); with Redis the fleet shares 90.
CAP = 90


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def zone() -> dict[str, Any]:
    z: dict[str, Any] = {}
    for k in range(DOMAINS):
        z[f"d{k}.example"] = {"MX": [(10, f"mx{k % 3}.provider.test")]}
    for k in range(3):
        z[f"mx{k}.provider.test"] = {"A": [SINK]}
    return z


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing (Debian package redis-server; make system-deps)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.ping()
                break
            except (redis.RedisError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def evalsha(self) -> tuple[int, int]:
        """(calls, microseconds) of EVALSHA since the last reset, as Redis counted them."""
        stats = self.client.info("commandstats").get("cmdstat_evalsha") or {}
        return int(stats.get("calls", 0)), int(stats.get("usec", 0))

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Node:
    """`volley serve` on 127.0.0.(20+i), ready when it logs "ready"."""

    def __init__(self, i: int, root: Path, dns_port: int, sink_port: int, redis_url: str,
                 ready_timeout: float) -> None:
        self.dir = root / f"node{i}"
        self.dir.mkdir()
        self.socket = str(self.dir / "volley.sock")
        cfg: dict[str, Any] = {
            "server": {"hostname": f"node{i}.volley.test", "workers": 1, "shutdown_timeout": "5s"},
            "listeners": [{"address": f"127.0.0.{20 + i}:0"}],
            "queue": {"path": str(self.dir / "queue"), "max_size": "1GiB"},
            "control": {"socket": self.socket},
            "log": {"delivery": str(self.dir / "delivery.jsonl")},
            "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"},
            "delivery": {"enabled": True, "port": sink_port},
            "shaping": [{"name": "provider", "mx_suffix": ".provider.test",
                         "max_connections": CAP if redis_url else CAP // NODES, "rate": "100000/s"}],
        }
        if redis_url:
            cfg["cluster"] = {"redis": redis_url, "node_name": f"node{i}", "key_prefix": "bench:"}
        import tomli_w

        (self.dir / "volley.toml").write_text(tomli_w.dumps(cfg))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "-c", str(self.dir / "volley.toml")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
        self.address = ""
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(ready_timeout):
            self.stop()
            raise RuntimeError(f"node{i} not ready in {ready_timeout:.0f}s")

    def _read(self, ready: threading.Event) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("event") == "ready":
                self.address = event["listeners"][0]
                ready.set()

    def cluster(self) -> dict[str, Any]:
        from engine.control.client import request
        from engine.control.protocol import Status

        return dict(request(self.socket, Status(), 30.0).get("cluster") or {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


def blast(address: str, n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "blast", "--to", address, "-n", str(n), "-c", "10",
         "--domains", str(DOMAINS), "--timeout", "30", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))


def one_run(variant: str, n: int, ready_timeout: float, patience: float) -> dict[str, Any]:
    """Fresh DNS, sink, (Redis) and nodes; n messages to each node; all delivered."""
    r: dict[str, Any] = {"variant": variant, "messages": NODES * n, "load_before": os.getloadavg()[0]}
    loop = LoopThread()
    sink = loop.call(start_sinks([(SINK, 0)], record=False, keep_segments=False))
    dns_thread = DnsServerThread(zone(), origin=".")
    dns = dns_thread.__enter__()
    nodes: list[Node] = []
    redis_server = None
    try:
        with tempfile.TemporaryDirectory(prefix="volley-cluster-bench-") as tmp:
            if variant == "redis":
                redis_server = RedisServer(Path(tmp))
            for i in range(NODES):
                nodes.append(Node(i, Path(tmp), dns.port, sink.port,
                                  redis_server.url if redis_server else "", ready_timeout))
            before = [sample(node.proc.pid).cpu_s for node in nodes]
            redis_before = sample(redis_server.proc.pid).cpu_s if redis_server else 0.0
            if redis_server:
                redis_server.client.config_resetstat()
                rounds0 = sum(node.cluster().get("rounds", 0) for node in nodes)
            t0 = time.monotonic()
            loads = [blast(node.address, n) for node in nodes]
            target, seen, since = NODES * n, -1, time.monotonic()
            while sink.accepted < target:
                now = time.monotonic()
                if sink.accepted != seen:
                    seen, since = sink.accepted, now
                if now - since > patience:
                    raise RuntimeError(f"sink has {sink.accepted}/{target}: no progress for {patience:.0f}s")
                time.sleep(0.01)
            elapsed = sink.last - t0
            for p in loads:
                p.wait(60)
            after = [sample(node.proc.pid).cpu_s for node in nodes]
            total = NODES * n
            cpu = sum(after) - sum(before)
            r.update(elapsed_s=elapsed, msgs_per_s=total / elapsed, cpu_s_per_1k=1000 * cpu / total,
                     cpu_us_per_msg=1e6 * cpu / total, sink_peak_connections=sink.max_live,
                     complete=sink.accepted == total)
            if redis_server:
                calls, usec = redis_server.evalsha()
                rounds = sum(node.cluster().get("rounds", 0) for node in nodes) - rounds0
                r.update(redis_cpu_us_per_msg=1e6 * (sample(redis_server.proc.pid).cpu_s - redis_before) / total,
                         evalsha_calls=calls, evalsha_us_per_msg=usec / total,
                         msgs_per_evalsha=total / calls if calls else None, round_trips=rounds,
                         states=[node.cluster().get("state") for node in nodes])
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        r["error"] = str(err)
    finally:
        for node in nodes:
            node.stop()
        if redis_server:
            redis_server.stop()
        dns_thread.__exit__(None, None, None)
        loop.call(sink.close())
        loop.close()
    r["load_after"] = os.getloadavg()[0]
    return r


def stats(values: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def summarise(row_id: str, row_label: str, variant: str, label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if "error" not in r]
    cell: dict[str, Any] = {
        "row": row_id, "row_label": row_label, "kind": "cluster", "size": 1024,
        "system": f"volley-{variant}", "system_label": label, "runs": runs,
        "complete": bool(runs) and len(done) == len(runs) and all(r["complete"] for r in done)}
    if error := next((r["error"] for r in runs if "error" in r), None):
        cell["error"] = error
    for key in ("msgs_per_s", "cpu_s_per_1k", "redis_cpu_us_per_msg", "evalsha_us_per_msg", "msgs_per_evalsha"):
        cell[key] = stats([r[key] for r in done if r.get(key) is not None])
    return cell


LABELS = {"alone": "3 nodes, no [cluster]", "redis": "3 nodes, limits via Redis"}


def cell(bench: Any, row: Any, system: Any) -> dict[str, Any]:
    """run.py's cell: system "volley-alone" or "volley-redis"."""
    variant = system.id.removeprefix("volley-")
    a = bench.args
    n = getattr(a, "cluster_messages", 0) or MESSAGES // (4 if a.quick else 1)
    runs = []
    for i in range(a.runs):
        r = one_run(variant, n, a.ready_timeout, a.stall)
        runs.append(r)
        if "error" in r:
            break
        print(f"  {row.id:<14} {system.id:<18} run {i + 1}/{a.runs}: {line(r)}", file=sys.stderr, flush=True)
    return summarise(row.id, row.label, variant, LABELS[variant], runs)


def unavailable() -> dict[str, str]:
    """Why the row cannot run here ({} when it can): the "redis" cell needs redis-server."""
    if shutil.which("redis-server") is None:
        return {"volley-redis": "cluster row: redis-server is missing (Debian package redis-server)"}
    return {}


def line(r: dict[str, Any]) -> str:
    out = (f"{r['msgs_per_s']:,.0f} msgs/s, CPU {r['cpu_s_per_1k']:.3f} s/1k, peak {r['sink_peak_connections']}"
           f" connections (load {r['load_before']:.1f})")
    if "evalsha_calls" in r:
        out += (f", Redis {r['evalsha_calls']} EVALSHA ({r['msgs_per_evalsha'] or 0:,.0f} msgs each,"
                f" {r['evalsha_us_per_msg']:.3f} us/msg), redis CPU {r['redis_cpu_us_per_msg']:.2f} us/msg")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=0, help=f"per node (default {MESSAGES:,}; --quick a quarter)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    n = a.messages or MESSAGES // (4 if a.quick else 1)
    runs = 1 if a.quick and a.runs == 3 else a.runs
    by: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for i in range(runs):
        for variant in VARIANTS:  # interleaved: a slow minute of the box hits both
            r = one_run(variant, n, 120.0, 60.0)
            by[variant].append(r)
            print(f"{variant:<6} run {i + 1}/{runs}: " + (r.get("error") or line(r)), file=sys.stderr, flush=True)
    cells = [summarise("cluster", "cluster relay 1KB", v, LABELS[v], by[v]) for v in VARIANTS]
    for c in cells:
        m, cpu = c["msgs_per_s"], c["cpu_s_per_1k"]
        if m and cpu:
            print(f"{c['system_label']:<28} {m['median']:>8,.0f} msgs/s ({m['min']:,.0f}..{m['max']:,.0f})"
                  f"  CPU {cpu['median']:.3f} s/1k")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps({"loadavg": os.getloadavg(), "per_node": n, "cells": cells}, indent=2) + "\n")
    return 0 if all(c["complete"] for c in cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
