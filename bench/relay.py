"""End-to-end relay benchmark: blast → `volley serve` → MX from a loopback DNS → a sink.

    .venv/bin/python bench/relay.py                  # 20,000 x 1 KB, 50 domains and 1 domain, 3 runs each
    .venv/bin/python bench/relay.py --quick          # smoke check: 3,000 messages, 1 run
    .venv/bin/python bench/relay.py --domains 50 --durability fsync,memory --sizes 1024,10240

Three peer processes run beside the relay, all on 127.0.0.0/8: a DNS server
(`python -m engine.lab.dns --zone FILE`) serving d0.example … d{N-1}.example,
each with an MX whose address is 127.0.0.2; a counting sink on 127.0.0.2
(`python -m engine.lab.sink`, stores nothing); and the load generator
(`engine.lab.blast`), one process per run. Volley's `dns.nameservers` points at the
loopback DNS server and `delivery.port` at the sink, so nothing leaves loopback.

msgs/s delivered = N / (load generator starts sending → the sink has received N).
Between runs the relay's queue drains (its delivery log has a line for every message).
See bench/README.md, "End-to-end relay", for what each figure means.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import (  # noqa: E402  (bench/ is not a package; e2e.py holds the shared helpers)
    REPO,
    Server,
    git_commit,
    machine_busy_seconds,
    probe_ms,
    relay_config,
    run_child,
    server_command,
    tree_cpu_seconds,
)
from e2e import write_config as e2e_write_config  # noqa: E402
from relay_peers import (  # noqa: E402
    LIFETIME,
    SINK_HOST,
    DeliveryLog,
    Peer,
    Sink,
    descendants_cpu,
    worker_split,
)

RESULTS = REPO / "bench" / "results" / "relay.json"

# Runs `engine.lab.blast`'s command line, printing time.monotonic() just before the run starts
# (after the imports), so the delivered rate does not include interpreter start-up.
# CLOCK_MONOTONIC is one clock for every process on Linux: the sink stamps with it too.
BLAST_WRAPPER = (
    "import sys, time, uvloop\n"
    "from engine.lab.blast import cli as blast\n"
    "sys.stderr.write(f'T0 {time.monotonic()!r}\\n'); sys.stderr.flush()\n"
    "raise SystemExit(blast.main(sys.argv[1:]))\n"
)


def write_zone(path: Path, domains: int, mx: str) -> None:
    """d{i}.example MX 10 → an MX host whose A record is 127.0.0.2 (blast's domains)."""
    zone: dict[str, Any] = {}
    for i in range(domains):
        host = f"mx.d{i}.example" if mx == "per-domain" else "mx.sinkhost.test"
        zone[f"d{i}.example"] = {"MX": [[10, host]]}
        zone[host] = {"A": [SINK_HOST]}
    path.write_text(json.dumps(zone, indent=1))


# --- the relay under test -------------------------------------------------------------

def write_config(tmp: Path, args: argparse.Namespace, durability: str, dns_port: int,
                 sink_port: int) -> Path:
    # Only the loopback DNS server: every MX resolves to SINK_HOST.
    config = relay_config(tmp, durability, args.workers, dns_port, sink_port)
    if args.max_connections:
        config["delivery"]["max_connections_per_domain"] = args.max_connections
    return e2e_write_config(tmp, durability, args.workers, config)


def blast(address: str, messages: int, size: int, concurrency: int, domains: int,
          cap: float) -> tuple[dict[str, Any], float, float, float]:
    """The load generator in its own process: (report, T0 monotonic, wall s, rusage CPU s)."""
    cmd = [sys.executable, "-c", BLAST_WRAPPER, "--to", address, "-n", str(messages),
           "-c", str(concurrency), "--size", str(size), "--domains", str(domains),
           "--timeout", "30", "--json"]
    rc, out, err, t_launch, wall, cpu = run_child(cmd, cap, "blast")
    text = err.decode("utf-8", "replace")
    t0 = next((float(line[3:]) for line in text.splitlines() if line.startswith("T0 ")), t_launch)
    if rc not in (0, 1) or not out.strip():
        raise RuntimeError(f"blast failed ({rc}): {text.strip()[-2000:]}")
    return json.loads(out), t0, wall, cpu


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)  # nearest rank, as engine.lab.blast does
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def queue_left(path: Path) -> int | None:
    """Messages left in the LMDB queue once the relay has stopped (None: unreadable)."""
    try:
        import lmdb

        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8, subdir=True)
        try:
            db = env.open_db(b"msg", create=False)
            with env.begin() as txn:
                return int(txn.stat(db)["entries"])
        finally:
            env.close()
    except Exception:  # noqa: BLE001  (a diagnostic only)
        return None


# --- one row: a relay, a warm-up, then the measured runs ------------------------------

def one_row(cmd: list[str], args: argparse.Namespace, durability: str, size: int, domains: int,
            dns: Peer, dns_port: int, sink: Sink, messages: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    row_info: dict[str, Any] = {}
    cap = 120 + messages / 20  # seconds; anything slower than 20 msgs/s is broken
    with tempfile.TemporaryDirectory(prefix=f"volley-relay-{durability}-") as tmpdir:
        tmp = Path(tmpdir)
        config = write_config(tmp, args, durability, dns_port, sink.port)
        server = Server(["timeout", "-k", "10", str(LIFETIME), *cmd], config, tmp)
        dlog = DeliveryLog(tmp / "delivery.jsonl")
        delivered_total = 0
        try:
            address = server.wait_ready(args.ready_timeout)
            # Warm-up: DNS cache, connection pools, code paths; wait until it has drained.
            base, wconns0 = sink.settle()
            sink.expect(base + args.warmup)
            warm, _, _, _ = blast(address, args.warmup, size, args.concurrency, domains, cap)
            if warm["accepted"] != args.warmup:
                raise RuntimeError(f"warm-up accepted {warm['accepted']}/{args.warmup}: "
                                   f"refused {warm['refused']} errors {warm['errors']}")
            sink.wait_reached(base + args.warmup, args.stall, cap)
            delivered_total += args.warmup
            dlog.wait_delivered(delivered_total, args.stall, cap)
            # Connections a cold relay opened for the warm-up (pools empty, slow start).
            row_info["warmup_connections"] = sink.settle()[1] - wconns0
            for i in range(args.runs):
                time.sleep(args.rest)
                base, conns0 = sink.settle()
                target = base + messages
                sink.expect(target)
                probe = probe_ms()
                per0 = descendants_cpu(server.proc.pid)
                cpu0, busy0 = tree_cpu_seconds(server.proc.pid), machine_busy_seconds()
                sink_cpu0, dns_cpu0 = tree_cpu_seconds(sink.proc.pid), tree_cpu_seconds(dns.proc.pid)
                sink.peak_live = 0
                report, t0, wall, client_rusage = blast(address, messages, size, args.concurrency,
                                                        domains, cap)
                if report["accepted"] != messages:
                    raise RuntimeError(f"run {i + 1}: accepted {report['accepted']}/{messages}: "
                                       f"refused {report['refused']} errors {report['errors']}")
                t_done = sink.wait_reached(target, args.stall, cap)
                delivered_total += messages
                lines = dlog.wait_delivered(delivered_total, args.stall, cap)
                cpu1, busy1 = tree_cpu_seconds(server.proc.pid), machine_busy_seconds()
                per1 = descendants_cpu(server.proc.pid)
                sink_cpu1, dns_cpu1 = tree_cpu_seconds(sink.proc.pid), tree_cpu_seconds(dns.proc.pid)
                t_drained = time.monotonic()
                _, conns1 = sink.settle()
                delivered = [r for r in lines if r.get("outcome") == "delivered"]
                qt = [float(r["queue_time"]) for r in delivered if r.get("queue_time") is not None]
                lat = [float(r["latency"]) for r in delivered if r.get("latency") is not None]
                n = messages
                elapsed = t_done - t0
                r = {
                    "durability": durability, "size": size, "domains": domains, "messages": n,
                    "accepted": report["accepted"], "refused": report["refused"],
                    "failed": report["failed"], "errors": report["errors"],
                    "delivered_lines": len(delivered),
                    "other_lines": {k: v for k, v in collections.Counter(
                        r.get("outcome") for r in lines).items() if k != "delivered"},
                    "delivered_s": elapsed, "msgs_per_s": n / elapsed,
                    "intake_s": report["elapsed"], "intake_msgs_per_s": report["msgs_per_s"],
                    "drain_after_intake_s": elapsed - report["elapsed"],
                    "blast_wall_s": wall, "measure_window_s": t_drained - t0,
                    "server_cpu_s": cpu1 - cpu0, "server_cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / n,
                    "worker_cpu_split_pct": worker_split(per0, per1, args.workers),
                    "client_cpu_us_per_msg": 1e6 * report["cpu_s"] / n,
                    "client_rusage_cpu_s": client_rusage,
                    "sink_cpu_us_per_msg": 1e6 * (sink_cpu1 - sink_cpu0) / n,
                    "dns_cpu_s": dns_cpu1 - dns_cpu0,
                    "busy_cpu_us_per_msg": 1e6 * (busy1 - busy0) / n,
                    "connections": conns1 - conns0,
                    "connections_per_1k": 1000 * (conns1 - conns0) / n,
                    "sink_peak_live_connections": sink.peak_live,
                    "queue_time_p50_ms": 1000 * pct(qt, 0.50), "queue_time_p99_ms": 1000 * pct(qt, 0.99),
                    "queue_time_max_ms": 1000 * max(qt, default=float("nan")),
                    "delivery_latency_p50_ms": 1000 * pct(lat, 0.50),
                    "delivery_latency_p99_ms": 1000 * pct(lat, 0.99),
                    "intake_latency_p50_ms": report["latency_ms"]["p50"],
                    "intake_latency_p99_ms": report["latency_ms"]["p99"],
                    "probe_ms": probe,
                }
                runs.append(r)
                print(f"  {durability:<6} {size:>6} B {domains:>3} dom run {i + 1}/{args.runs}:"
                      f" {r['msgs_per_s']:,.0f} msgs/s delivered (intake {r['intake_msgs_per_s']:,.0f}),"
                      f" server {r['server_cpu_us_per_msg']:.0f} us/msg"
                      f" (workers {'/'.join(f'{p:.0f}' for p in r['worker_cpu_split_pct'])}%),"
                      f" conns/1k {r['connections_per_1k']:.1f},"
                      f" queue p50/p99 {r['queue_time_p50_ms']:.0f}/{r['queue_time_p99_ms']:.0f} ms",
                      file=sys.stderr, flush=True)
        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
            diag = (f"{err}\n  delivery log outcomes {dict(dlog.outcomes)}; last lines:\n"
                    + "\n".join(f"  > {line}" for line in dlog.tail)
                    + f"\n  sink {sink.last}\n  volley log tail:\n{server.log()}")
            raise RuntimeError(diag) from None
        finally:
            row_info["server_exit"] = server.stop()
            row_info["server_log_lines"] = server.log_lines
            row_info["queue_left"] = queue_left(tmp / "queue")
            row_info["delivery_outcomes"] = dict(dlog.outcomes)
    return runs, row_info


# --- driver -----------------------------------------------------------------------------

def summarise(durability: str, size: int, domains: int, runs: list[dict[str, Any]],
              info: dict[str, Any]) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float]:
        values = [r[key] for r in runs]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    keys = ("msgs_per_s", "intake_msgs_per_s", "server_cpu_us_per_msg", "client_cpu_us_per_msg",
            "sink_cpu_us_per_msg", "busy_cpu_us_per_msg", "connections_per_1k",
            "queue_time_p50_ms", "queue_time_p99_ms", "delivery_latency_p50_ms",
            "delivery_latency_p99_ms", "drain_after_intake_s", "probe_ms")
    complete = (all(r["delivered_lines"] == r["messages"] and not r["other_lines"] for r in runs)
                and info.get("queue_left") == 0 and info.get("server_exit") == 0)
    return {"durability": durability, "size": size, "domains": domains, "runs": runs,
            "complete": complete, **info, **{k: stat(k) for k in keys}}


def print_table(cells: list[dict[str, Any]]) -> None:
    head = (f"{'durability':<10} {'size':>6} {'dom':>4} {'delivered msgs/s (min..max)':>28}"
            f" {'intake msgs/s':>13} {'server us/msg':>13} {'conns/1k':>8}"
            f" {'queue p50 ms':>12} {'queue p99 ms':>12} {'complete':>8}")
    print(head)
    print("-" * len(head))
    for c in cells:
        m = c["msgs_per_s"]
        rate = f"{m['median']:,.0f} ({m['min']:,.0f}..{m['max']:,.0f})"
        print(f"{c['durability']:<10} {c['size']:>6} {c['domains']:>4} {rate:>28}"
              f" {c['intake_msgs_per_s']['median']:>13,.0f}"
              f" {c['server_cpu_us_per_msg']['median']:>13.0f}"
              f" {c['connections_per_1k']['median']:>8.1f}"
              f" {c['queue_time_p50_ms']['median']:>12.0f} {c['queue_time_p99_ms']['median']:>12.0f}"
              f" {'yes' if c['complete'] else 'NO':>8}")
    print()
    print(f"{'durability':<10} {'size':>6} {'dom':>4} {'client us/msg':>13} {'sink us/msg':>11}"
          f" {'busy us/msg':>11} {'worker CPU split %':>18} {'drain after intake s':>20}")
    for c in cells:
        split = "/".join(f"{p:.0f}" for p in c["runs"][len(c["runs"]) // 2]["worker_cpu_split_pct"])
        print(f"{c['durability']:<10} {c['size']:>6} {c['domains']:>4}"
              f" {c['client_cpu_us_per_msg']['median']:>13.0f} {c['sink_cpu_us_per_msg']['median']:>11.0f}"
              f" {c['busy_cpu_us_per_msg']['median']:>11.0f} {split:>18}"
              f" {c['drain_after_intake_s']['median']:>20.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--durability", default="fsync", help="comma list of fsync,batch,memory (default %(default)s)")
    p.add_argument("--sizes", default="1024", help="comma list of message bytes (default %(default)s)")
    p.add_argument("--domains", default="50,1",
                   help="comma list; one row each (default %(default)s: spread, then one hot domain)")
    p.add_argument("--messages", type=int, default=0, help="per run (default 20,000, --quick 3,000)")
    p.add_argument("--runs", type=int, default=0, help="measured runs per row (default 3, --quick 1)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up messages (default 1000, --quick 300)")
    p.add_argument("--concurrency", type=int, default=50, help="blast sessions (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="server.workers (default %(default)s)")
    p.add_argument("--mx", choices=("per-domain", "shared"), default="per-domain",
                   help="per-domain: d{i}.example MX mx.d{i}.example (one site per domain);"
                        " shared: every domain's MX is mx.sinkhost.test (one site)")
    p.add_argument("--max-connections", type=int, default=0,
                   help="delivery.max_connections_per_domain (default: volley's)")
    p.add_argument("--rest", type=float, default=1.0, help="seconds between runs")
    p.add_argument("--stall", type=float, default=30.0,
                   help="fail a run when delivery makes no progress for this many seconds")
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--server-cmd", default="", help='default: "<venv>/bin/volley serve"')
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="smoke check: fewer messages, 1 run")
    p.add_argument("--chunking", action="store_true",
                   help="the sink advertises CHUNKING, so Volley pipelines BDAT (RFC 3030)")
    a = p.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.warmup = a.warmup or (300 if a.quick else 1000)
    a.messages = a.messages or (3_000 if a.quick else 20_000)
    if a.quick and a.rest == 1.0:
        a.rest = 0.3
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = server_command(args.server_cmd)
    if cmd is None:
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    levels = [d.strip() for d in args.durability.split(",") if d.strip()]
    domain_counts = [int(d) for d in args.domains.split(",") if d.strip()]
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    cells: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    dns = sink = None
    with tempfile.TemporaryDirectory(prefix="volley-relay-peers-") as peers_dir:
        zone = Path(peers_dir) / "zone.json"
        write_zone(zone, max(domain_counts), args.mx)
        try:
            dns = Peer("dns", ["-m", "engine.lab.dns", "--zone", str(zone), "--origin", ".",
                               "--lifetime", str(LIFETIME - 60)])
            dns_port = int(dns.wait_event("ready", 30)["port"])
            sink = Sink(chunking=args.chunking)
            for size in sizes:
                for level in levels:
                    for domains in domain_counts:
                        try:
                            runs, info = one_row(cmd, args, level, size, domains, dns, dns_port,
                                                 sink, args.messages)
                        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
                            print(f"  {level} {size} B {domains} domains: FAILED: {err}", file=sys.stderr)
                            failures.append({"durability": level, "size": size, "domains": domains,
                                             "error": str(err)})
                            continue
                        if runs:
                            cells.append(summarise(level, size, domains, runs, info))
        finally:
            for peer in (sink, dns):
                if peer is not None:
                    peer.stop()
    print()
    print_table(cells)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "started": started, "commit": git_commit(), "server_cmd": cmd,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release(), "loadavg": os.getloadavg()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cells": cells, "failures": failures,
    }, indent=2) + "\n")
    print(f"\nwritten {args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output}")
    return 0 if cells and not failures and all(c["complete"] for c in cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
