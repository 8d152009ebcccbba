"""Control socket at scale, end to end: `volley ctl` commands against a running server
holding a big queue, and a purge of that queue while mail comes in and goes out.

    .venv/bin/python bench/control_live.py                          # 1,000,000 queued, 10,000 domains
    .venv/bin/python bench/control_live.py --messages 100000 --domains 1000 --json

`python -m engine serve` (2 workers, fsync) on a queue prefilled before it starts
(deferred by a 451, due in 1-1.5 h), a loopback DNS (in this process) as its only
nameserver: the prefilled domains' MX is a 451-to-RCPT sink on 127.0.0.2 (in this
process), d0.example's (engine.lab.blast's domain) a counting sink process on 127.0.0.3.
Times status, list, list --domain, show and queue through the control socket (median
of --runs), then runs engine.lab.blast for --duration seconds as a baseline and again
while `delete --all` purges the queue, sampling status every 0.5 s. All traffic stays
on 127.0.0.0/8. See bench/README.md, "Control socket at scale", "Through a running server".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from control_scale import BODY, put_all, target_mark, timed  # noqa: E402  (bench/ is not a package)
from e2e import REPO, TICK, Server, _stat_fields, git_commit, machine_busy_seconds, probe_ms, relay_config, run_child  # noqa: E402  # noqa: E402
from e2e import write_config as e2e_write_config  # noqa: E402
from relay import BLAST_WRAPPER  # noqa: E402
from relay_peers import LIFETIME, Peer  # noqa: E402

sys.path.insert(0, str(REPO))
from engine.control import protocol, queue_view  # noqa: E402
from engine.control.client import request  # noqa: E402
from engine.lab.dns import DnsServerThread  # noqa: E402
from engine.lab.loop_thread import LoopThread  # noqa: E402
from engine.lab.sink.protocol import Sink, start_sink  # noqa: E402
from engine.queue.ids import IdAllocator  # noqa: E402
from engine.queue.records import MessageRecord, Recipient  # noqa: E402
from engine.queue.store import QueueStore  # noqa: E402

WORKERS = 2  # the due index's shard count must equal the server's worker count
MAP_SIZE = 8 << 30  # bench_config's queue.max_size ("8GiB")
FAIL_HOST, LIVE_HOST = "127.0.0.2", "127.0.0.3"
LIVE_DOMAIN = "d0.example"  # where engine.lab.blast --domains 1 sends
TARGETS = {"list first page": 0.050, "queue summary": 1.0}
SAMPLE_EVERY = 0.5  # seconds between status samples


def prefill_domain(i: int) -> str:
    return f"p{i:05d}.prefill.test"


def deferred_records(ids: IdAllocator, messages: int, domains: int, now: float,
                     per_domain: list[int], seed: int = 1) -> Iterator[MessageRecord]:
    """One-recipient messages deferred by a 451, their next attempt 1-1.5 h ahead: the
    server holds them without trying them during the run. Counts land in `per_domain`."""
    rng = random.Random(seed)
    for j in range(messages):
        d = min(domains - 1, int(domains * rng.random() ** 2))
        per_domain[d] += 1
        rcpt = Recipient(f"user{j}@{prefill_domain(d)}", attempts=rng.randint(1, 6),
                         next_attempt=now + 3600 + rng.uniform(0, 1800),
                         last_reply="451 4.7.1 try again later")
        yield MessageRecord(ids.next(), f"list{j % 1000}@sender{j % 50}.example", [rcpt],
                            now - rng.expovariate(1 / 7200.0), len(BODY))


def fill(path: Path, messages: int, domains: int, now: float) -> tuple[float, list[int]]:
    """Queue the messages, 20,000 per write transaction; (seconds, messages per domain)."""
    per_domain = [0] * domains
    store = QueueStore(str(path), map_size=MAP_SIZE, durability="batch", shards=WORKERS)
    started = time.perf_counter()
    try:
        put_all(store, deferred_records(IdAllocator(store.next_boot()), messages, domains, now, per_domain))
    finally:
        store.close()
    return time.perf_counter() - started, per_domain


def direct_summary(path: Path, runs: int) -> dict[str, Any]:
    """The queue summary computed in this process, no server running: what the socket,
    the supervisor and the day's CPU speed add to it is the difference."""
    store = QueueStore(str(path), map_size=MAP_SIZE, durability="batch", shards=WORKERS)
    try:
        median, times, _ = timed(lambda: queue_view.summary(store, now=time.time(), suspended={}), runs)
    finally:
        store.close()
    return {"seconds": median, "min": min(times), "max": max(times), "runs": times}


def zone(domains: int) -> dict[str, Any]:
    z: dict[str, Any] = {prefill_domain(i): {"MX": [[10, "mx.failing.test"]]} for i in range(domains)}
    z["mx.failing.test"] = {"A": [FAIL_HOST]}
    z[LIVE_DOMAIN] = {"MX": [[10, "mx.live.test"]]}
    z["mx.live.test"] = {"A": [LIVE_HOST]}
    return z


@contextmanager
def failing_sink(port: int) -> Iterator[Sink]:
    """A sink on FAIL_HOST:port answering 451 to every RCPT, on its own loop and thread."""
    script = lambda verb, arg: "451 4.7.1 try again later" if verb == "RCPT" else None  # noqa: E731
    loop = LoopThread()
    try:
        sink = loop.call(start_sink(FAIL_HOST, port, script=script, keep_segments=False), 10)
        try:
            yield sink
        finally:
            loop.call(sink.close(), 10)
    finally:
        loop.close()


class LiveSink(Peer):
    """The accepting sink process on LIVE_HOST; counts what Volley delivered to it."""

    def __init__(self) -> None:
        super().__init__("live-sink", ["-m", "engine.lab.sink", "--json", "--no-starttls", "--listen", f"{LIVE_HOST}:0",
                                       "--interval", "0.2", "--lifetime", str(LIFETIME - 60)])
        self.port = int(self.wait_event("ready", 30)["listeners"][0].rpartition(":")[2])

    def count(self) -> int:
        with self.cond:
            return int(self.last.get("messages", 0))

    def wait_count(self, target: int, cap: float) -> int:
        deadline = time.monotonic() + cap
        while (n := self.count()) < target and time.monotonic() < deadline:
            time.sleep(0.1)
        return n


# --- the control socket ----------------------------------------------------------------

def ctl(sock: str, req: protocol.Request, timeout: float | None = 120.0) -> tuple[float, dict[str, Any]]:
    """(client-side wall seconds, reply) of one request on a fresh connection, as `volley ctl`."""
    t0 = time.perf_counter()
    reply = request(sock, req, timeout)
    took = time.perf_counter() - t0
    if not reply.get("ok"):
        raise RuntimeError(f"{type(req).__name__}: {reply.get('error')}")
    return took, reply


def measure_reads(sock: str, runs: int, small_domain: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def record(name: str, req: protocol.Request, detail: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        times, reply = [], {}
        for _ in range(runs):
            took, reply = ctl(sock, req)
            times.append(took)
        out[name] = {"seconds": statistics.median(times), "min": min(times), "max": max(times),
                     "runs": times, "detail": detail(reply)}
        return reply

    record("status", protocol.Status(),
           lambda r: f"{r['queue']['messages']:,} messages, {r['queue'].get('units', 0):,} units")
    page = record("list first page", protocol.List(limit=50),
                  lambda r: f"{len(r['messages'])} rows, {r['scanned']} scanned")
    record("list --domain", protocol.List(domain=small_domain, limit=50),
           lambda r: f"{small_domain}: {len(r['messages'])} rows, {r['scanned']:,} scanned, "
                     f"{'more' if r['next'] else 'end'}")
    some_id = page["messages"][0]["id"]
    record("show", protocol.Show(id=some_id), lambda r: f"{some_id}")
    record("queue summary", protocol.Queue(by="domain", limit=100),
           lambda r: f"{r['rows_total']:,} domains, {r['totals']['units']:,} units, top {len(r['rows'])}")
    return out


class StatusSampler:
    """A status request every SAMPLE_EVERY seconds on its own thread; latencies kept."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                took, _ = ctl(self.sock, protocol.Status(), timeout=30.0)
                self.latencies.append(took)
            except Exception as err:  # noqa: BLE001  (a figure of the run, not a crash)
                took = 0.0
                self.errors.append(repr(err))
            self._stop.wait(max(0.0, SAMPLE_EVERY - took))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(35)
        lat = sorted(self.latencies)
        return {"samples": len(lat), "p50": statistics.median(lat) if lat else None,
                "max": lat[-1] if lat else None, "errors": self.errors[:5]}


# --- reception and delivery, with and without a purge ----------------------------------

def cpu_snapshot(root: int) -> dict[str, float]:
    """CPU seconds (utime+stime+cutime+cstime) of the supervisor (the only child of the
    `timeout` wrapper `root`) and of its children (the workers), and the machine's busy
    seconds, now."""
    procs = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (f := _stat_fields(int(entry.name))) is not None:
            procs[int(entry.name)] = (int(f[1]), sum(int(f[i]) for i in (11, 12, 13, 14)) / TICK)
    sup = [pid for pid, (ppid, _) in procs.items() if ppid == root]
    sup_cpu = sum(procs[p][1] for p in sup)
    workers = sum(cpu for ppid, cpu in procs.values() if ppid in sup)
    return {"supervisor": sup_cpu, "workers": workers, "machine": machine_busy_seconds(),
            "t": time.monotonic()}


def cpu_use(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores used in the window: supervisor, workers (both), whole machine."""
    wall = after["t"] - before["t"]
    return {k: round((after[k] - before[k]) / wall, 2) for k in ("supervisor", "workers", "machine")}


def blast(address: str, args: argparse.Namespace, cap: float) -> tuple[dict[str, Any], float]:
    """engine.lab.blast for --duration seconds: (its report, time.monotonic() when its clock started)."""
    # -n far beyond what --duration lets it send: the duration ends the run.
    cmd = [sys.executable, "-c", BLAST_WRAPPER, "--to", address, "-n", "100000000",
           "-c", str(args.concurrency), "--size", str(args.size), "--domains", "1",
           "--duration", str(args.duration), "--timeout", "30", "--json"]
    rc, out, err, t_launch, _, _ = run_child(cmd, cap, "blast")
    text = err.decode("utf-8", "replace")
    if rc not in (0, 1) or not out.strip():
        raise RuntimeError(f"blast failed ({rc}): {text.strip()[-2000:]}")
    t0 = next((float(line[3:]) for line in text.splitlines() if line.startswith("T0 ")), t_launch)
    return json.loads(out), t0


def load_phase(sock: str, address: str, args: argparse.Namespace, sink: LiveSink, root: int,
               purge: bool) -> dict[str, Any]:
    """One blast run; with `purge`, `delete --all` is sent first and runs meanwhile."""
    done: dict[str, Any] = {}

    def run_purge() -> None:
        t0 = time.monotonic()
        try:
            done["reply"] = ctl(sock, protocol.Delete(all=True), timeout=None)[1]
        except Exception as err:  # noqa: BLE001  (reported, not raised from a thread)
            done["error"] = repr(err)
        done["t0"], done["t1"] = t0, time.monotonic()

    sampler = StatusSampler(sock)
    purger = threading.Thread(target=run_purge, name="purge", daemon=True)
    if purge:
        purger.start()
        time.sleep(0.2)  # the purge's first chunk is under way when mail starts coming in
    sink0, cpu0 = sink.count(), cpu_snapshot(root)
    report, t0 = blast(address, args, args.duration + 120)
    cores = cpu_use(cpu0, cpu_snapshot(root))
    t1 = t0 + report["elapsed"]
    delivered = sink.count() - sink0
    if purge:
        purger.join(args.purge_cap)
        if purger.is_alive():
            raise RuntimeError(f"delete --all still running after {args.purge_cap:.0f} s")
    status = sampler.stop()
    # The live mail of this phase is delivered before the next one starts.
    drained = sink.wait_count(sink0 + report["accepted"], 120) - sink0
    out = {"accepted": report["accepted"], "refused": report["refused"], "failed": report["failed"],
           "errors": report["errors"], "elapsed": report["elapsed"], "msgs_per_s": report["msgs_per_s"],
           "latency_ms": report["latency_ms"], "delivered_in_window": delivered,
           "delivered_msgs_per_s": delivered / report["elapsed"], "delivered_after_drain": drained,
           "status": status, "cores": cores}
    if purge:
        if "error" in done:
            raise RuntimeError(f"delete --all failed: {done['error']}")
        reply = done["reply"]
        overlap = max(0.0, min(t1, done["t1"]) - max(t0, done["t0"]))
        out["purge"] = {"seconds": done["t1"] - done["t0"], "server_seconds": reply["seconds"],
                        "deleted": reply["done"], "matched": reply["matched"], "chunks": reply["chunks"],
                        "blast_window_covered": overlap / report["elapsed"]}
    return out


# --- driver ------------------------------------------------------------------------------

def write_config(tmp: Path, dns_port: int, sink_port: int) -> Path:
    return e2e_write_config(tmp, "fsync", WORKERS, relay_config(tmp, "fsync", WORKERS, dns_port, sink_port))


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"messages": args.messages, "domains": args.domains,
                              "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "commit": git_commit(), "python": platform.python_version(),
                              "cpus": os.cpu_count(), "targets": TARGETS, "probe_ms": round(probe_ms(), 1),
                              "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="volley-ctl-live-") as tmpdir:
        tmp = Path(tmpdir)
        fill_s, per_domain = fill(tmp / "queue", args.messages, args.domains, time.time())
        report["fill_seconds"] = round(fill_s, 1)
        small = min((n, i) for i, n in enumerate(per_domain) if n)
        report["small_domain"] = {"domain": prefill_domain(small[1]), "messages": small[0]}
        report["queue summary, direct"] = direct_summary(tmp / "queue", args.runs)
        sink = LiveSink()
        try:
            with failing_sink(sink.port), DnsServerThread(zone(args.domains), origin=".") as dns:
                server = Server(["timeout", "-k", "10", str(LIFETIME), sys.executable, "-m", "engine",
                                 "serve"], write_config(tmp, dns.port, sink.port), tmp)
                try:
                    t0 = time.monotonic()
                    address = server.wait_ready(args.ready_timeout)
                    report["ready_seconds"] = round(time.monotonic() - t0, 2)
                    sock = str(tmp / "volley.sock")
                    report["reads"] = measure_reads(sock, args.runs, report["small_domain"]["domain"])
                    root = server.proc.pid
                    report["baseline"] = load_phase(sock, address, args, sink, root, purge=False)
                    report["during_purge"] = load_phase(sock, address, args, sink, root, purge=True)
                    report["left_after_purge"] = ctl(sock, protocol.Status())[1]["queue"]["messages"]
                except (RuntimeError, OSError) as err:
                    raise RuntimeError(f"{err}\n  volley log tail:\n{server.log()}") from None
                finally:
                    report["server_exit"] = server.stop()
        finally:
            sink.stop()
    return report


def print_table(r: dict[str, Any]) -> None:
    print(f"{r['messages']:,} queued messages over {r['domains']:,} domains (filled in "
          f"{r['fill_seconds']} s); server ready {r['ready_seconds']} s after start;"
          f" CPU probe {r['probe_ms']} ms (bench/e2e.py probe_ms)\n")
    print(f"{'command':18} {'median s':>9} {'min..max':>15}  {'target':>9}  detail")
    for name, x in r["reads"].items():
        mark = target_mark(name, x["seconds"], TARGETS)
        print(f"{name:18} {x['seconds']:9.3f} {x['min']:6.3f}..{x['max']:<7.3f}  {mark:>9}  {x['detail']}")
    x = r["queue summary, direct"]
    print(f"{'(summary, direct)':18} {x['seconds']:9.3f} {x['min']:6.3f}..{x['max']:<7.3f}  {'':>9}"
          f"  queue_view.summary in this process before the server started")
    b, d = r["baseline"], r["during_purge"]
    print(f"\n{'phase':13} {'accepted/s':>10} {'delivered/s':>11} {'intake p50/p99 ms':>17}"
          f" {'status p50/max ms':>17} {'cores sup/workers/all':>21}")
    for name, x in (("baseline", b), ("during purge", d)):
        s, lat, c = x["status"], x["latency_ms"], x["cores"]
        print(f"{name:13} {x['msgs_per_s']:10,.0f} {x['delivered_msgs_per_s']:11,.0f}"
              f" {lat['p50']:8.1f}/{lat['p99']:<8.1f}"
              f" {1000 * (s['p50'] or 0):8.1f}/{1000 * (s['max'] or 0):<8.1f}"
              f" {c['supervisor']:9.2f}/{c['workers']:.2f}/{c['machine']:.2f}")
    p = d["purge"]
    change = 100 * (d["msgs_per_s"] / b["msgs_per_s"] - 1) if b["msgs_per_s"] else float("nan")
    print(f"\ndelete --all: {p['deleted']:,} messages in {p['chunks']:,} chunks, {p['seconds']:.1f} s"
          f" (server {p['server_seconds']:.1f} s), covering {100 * p['blast_window_covered']:.0f}% of"
          f" the blast window; intake during the purge {change:+.0f}% vs baseline;"
          f" {r['left_after_purge']:,} messages left; server exit {r['server_exit']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="prefilled (default %(default)s)")
    p.add_argument("--domains", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=5, help="runs of each read (median)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of blast per phase")
    p.add_argument("--concurrency", type=int, default=20, help="blast sessions")
    p.add_argument("--size", type=int, default=1024, help="message bytes")
    p.add_argument("--purge-cap", type=float, default=600.0, help="seconds delete --all may take")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_table(report)
    reads = report["reads"]
    missed = [k for k, limit in TARGETS.items() if reads[k]["seconds"] >= limit]
    complete = report["during_purge"]["purge"]["deleted"] >= args.messages and report["server_exit"] == 0
    return 0 if complete and not missed else 1


if __name__ == "__main__":
    raise SystemExit(main())
