"""End-to-end receive benchmark: `volley serve` under `engine.lab.blast`, per durability and size.

    .venv/bin/python bench/e2e.py                 # fsync, batch, memory at 1 KB, 3 runs each
    .venv/bin/python bench/e2e.py --quick         # smoke check: fewer messages, 1 run
    .venv/bin/python bench/e2e.py --sizes 1024,10240,102400 --durability fsync

Each run starts the server in a fresh temporary directory, waits for its "ready" log
line, warms up, then runs the load generator in a separate process so its CPU is
counted apart from the server's. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from engine.lab.demo import report as demo_report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "e2e.json"  # latest.json is bench/run.py's
TICK = os.sysconf("SC_CLK_TCK")
# One definition of a process tree's CPU time, shared with `volley demo`.
tree_cpu_seconds = demo_report.tree_cpu_seconds
STOP_GRACE = 15.0  # seconds SIGTERM may take before the process group is killed


# --- CPU accounting from /proc --------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)"; comm may hold spaces or parens, so split at the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def machine_busy_seconds() -> float:
    """All CPUs' non-idle time (user nice system irq softirq steal) from /proc/stat."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def probe_ms() -> float:
    """A fixed pure-Python loop: its time tracks the host's (drifting) CPU speed."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(300_000):
        acc += i * i % 7
    return 1000 * (time.perf_counter() - t0)


# --- the server under test ------------------------------------------------------------

def bench_config(tmp: Path, durability: str, workers: int) -> dict[str, Any]:
    """The settings every benchmark server shares: everything under `tmp`, a free port,
    loopback relaying only. Receiving only by default: the queue grows and nothing is
    relayed, so no DNS query or outbound connection ever leaves loopback
    (bench/relay.py turns delivery on against its own loopback DNS and sink)."""
    return {
        "server": {"workers": workers, "shutdown_timeout": "5s"},
        "listeners": [{"address": "127.0.0.1:0"}],
        "queue": {"path": str(tmp / "queue"), "max_size": "8GiB", "durability": durability},
        "relay": {"networks": ["127.0.0.0/8"]},
        "control": {"socket": str(tmp / "volley.sock")},
        "log": {"delivery": str(tmp / "delivery.jsonl")},
        "delivery": {"enabled": False},
        "dns": {"nameservers": ["127.0.0.1:9"]},
    }


def relay_config(tmp: Path, durability: str, workers: int, dns_port: int, sink_port: int,
                 dns_timeout: str = "2s") -> dict[str, Any]:
    """`bench_config` with delivery on: the loopback DNS server on `dns_port` is the only
    nameserver (its MX records point at a loopback sink), delivery goes to `sink_port`."""
    config = bench_config(tmp, durability, workers)
    config["server"]["hostname"] = "relay.volley.test"
    config["delivery"] = {"enabled": True, "port": sink_port, "poll_interval": "50ms"}
    config["dns"] = {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": dns_timeout}
    return config


def write_config(tmp: Path, durability: str, workers: int,
                 config: dict[str, Any] | None = None) -> Path:
    path = tmp / "volley.toml"
    path.write_text(tomli_w.dumps(config or bench_config(tmp, durability, workers)))
    return path


class Server:
    """`volley serve -c FILE` in its own session (process group), stderr drained by a thread."""

    def __init__(self, command: list[str], config: Path, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [*command, "-c", str(config)], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        self.ready = threading.Event()
        self.listeners: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.log_lines = 0
        # Drain stderr continuously: a full pipe would block the server's logging.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log_lines += 1
            self.tail.append(line)
            if not self.ready.is_set() and line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "ready":
                    self.listeners = list(event.get("listeners", []))
                    self.ready.set()

    def wait_ready(self, timeout: float) -> str:
        """The first listener's "host:port" once the server says ready; raises otherwise."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode} before ready:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log()}")
        if not self.listeners:
            raise RuntimeError(f"ready line without listeners:\n{self.log()}")
        return self.listeners[0]

    def log(self) -> str:
        return "\n".join(f"  | {line}" for line in self.tail)

    def stop(self) -> int | None:
        """Stop the process group (see `stop_group`); the supervisor's exit status."""
        code = stop_group(self.proc, STOP_GRACE)
        self._reader.join(2)
        return code


def server_command(override: str) -> list[str] | None:
    """The command that starts the server: `override` split, or this venv's
    `volley serve`; None (after saying why) when neither exists."""
    if override:
        return shlex.split(override)
    volley = Path(sys.executable).parent / "volley"
    if not volley.exists():
        print(f"{volley} not found (is the package installed?); or pass --server-cmd",
              file=sys.stderr)
        return None
    return [str(volley), "serve"]


def stop_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> int | None:
    """SIGTERM, wait up to `grace` s, then SIGKILL whatever is left of the process group
    (children orphaned by a crashed leader stay in its group). Returns the leader's
    exit status, or None if it had to be killed."""
    code: int | None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(grace)
        except subprocess.TimeoutExpired:
            code = None
    else:
        code = proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(5)
    return code


# --- one measured run -----------------------------------------------------------------

def _env() -> dict[str, str]:
    # The repo first on the path, so `-m engine.lab.blast` (and a stand-in server) import
    # this checkout whatever the working directory.
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def run_child(cmd: list[str], cap: float, name: str = "") -> tuple[int, bytes, bytes, float, float, float]:
    """(rc, stdout, stderr, t_launch monotonic, wall s, rusage CPU s) of a child run in its
    own session; killed with its process group, and RuntimeError, after `cap` seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_launch = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name or os.path.basename(cmd[0])} still running after {cap:.0f}s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    wall = time.monotonic() - t_launch
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only this child was reaped meanwhile
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, out, err, t_launch, wall, cpu


def blast(address: str, messages: int, size: int, concurrency: int) -> tuple[dict[str, Any], float, float]:
    """Run `python -m engine.lab.blast` in its own process; (report, wall s, rusage CPU s)."""
    cmd = [sys.executable, "-m", "engine.lab.blast", "--to", address, "-n", str(messages),
           "-c", str(concurrency), "--size", str(size), "--timeout", "30", "--json"]
    env = _env()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # A floor of 100 msgs/s: anything slower is broken, and the run must still end.
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60 + messages / 100)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"blast failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout), wall, cpu


def one_run(cmd: list[str], durability: str, size: int, args: argparse.Namespace,
            messages: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"volley-bench-{durability}-") as tmpdir:
        tmp = Path(tmpdir)
        server = Server(cmd, write_config(tmp, durability, args.workers), tmp)
        try:
            address = server.wait_ready(args.ready_timeout)
            warm, _, _ = blast(address, args.warmup, size, args.concurrency)
            if warm["accepted"] != args.warmup:
                raise RuntimeError(f"warm-up accepted {warm['accepted']}/{args.warmup}: "
                                   f"refused {warm['refused']} errors {warm['errors']}")
            time.sleep(args.rest)  # let the warm-up's commits and logging settle
            probe = probe_ms()
            cpu0, busy0 = tree_cpu_seconds(server.proc.pid), machine_busy_seconds()
            report, wall, client_rusage = blast(address, messages, size, args.concurrency)
            cpu1, busy1 = tree_cpu_seconds(server.proc.pid), machine_busy_seconds()
        finally:
            exit_code = server.stop()
    n = max(1, report["accepted"])
    lat = report["latency_ms"]
    return {
        "durability": durability, "size": size, "messages": messages,
        "accepted": report["accepted"], "refused": report["refused"],
        "failed": report["failed"], "unsent": report["unsent"], "errors": report["errors"],
        "elapsed_s": report["elapsed"], "process_wall_s": wall,
        "msgs_per_s": report["msgs_per_s"],
        "server_cpu_s": cpu1 - cpu0, "server_cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / n,
        "client_cpu_s": report["cpu_s"], "client_cpu_us_per_msg": 1e6 * report["cpu_s"] / n,
        "client_rusage_cpu_s": client_rusage,
        "busy_cpu_s": busy1 - busy0, "busy_cpu_us_per_msg": 1e6 * (busy1 - busy0) / n,
        "latency_p50_ms": lat["p50"], "latency_p99_ms": lat["p99"], "latency_max_ms": lat["max"],
        "probe_ms": probe, "server_exit": exit_code, "server_log_lines": server.log_lines,
    }


# --- driver -----------------------------------------------------------------------------

def default_messages(size: int, quick: bool) -> int:
    n = 30_000 if size <= 2048 else 15_000 if size <= 20_480 else 3_000
    return max(500, n // 10) if quick else n


def summarise(durability: str, size: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float]:
        values = [r[key] for r in runs]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    keys = ("msgs_per_s", "server_cpu_us_per_msg", "client_cpu_us_per_msg",
            "busy_cpu_us_per_msg", "latency_p50_ms", "latency_p99_ms", "probe_ms")
    complete = all(r["accepted"] == r["messages"] and r["server_exit"] == 0 for r in runs)
    return {"durability": durability, "size": size, "runs": runs, "complete": complete,
            **{k: stat(k) for k in keys}}


def print_table(cells: list[dict[str, Any]]) -> None:
    head = (f"{'durability':<10} {'size':>7} {'msgs/s median (min..max)':>28} {'vs fsync':>8}"
            f" {'server us/msg':>13} {'client us/msg':>13} {'busy us/msg':>11}"
            f" {'p50 ms':>7} {'p99 ms':>7}  note")
    print(head)
    print("-" * len(head))
    base = {c["size"]: c["msgs_per_s"]["median"] for c in cells if c["durability"] == "fsync"}
    for c in cells:
        m = c["msgs_per_s"]
        rate = f"{m['median']:,.0f} ({m['min']:,.0f}..{m['max']:,.0f})"
        ratio = f"x{m['median'] / base[c['size']]:.2f}" if base.get(c["size"]) else "-"
        note = "" if c["complete"] else "INCOMPLETE (see e2e.json)"
        print(f"{c['durability']:<10} {c['size']:>7} {rate:>28} {ratio:>8}"
              f" {c['server_cpu_us_per_msg']['median']:>13.0f}"
              f" {c['client_cpu_us_per_msg']['median']:>13.0f}"
              f" {c['busy_cpu_us_per_msg']['median']:>11.0f}"
              f" {c['latency_p50_ms']['median']:>7.2f} {c['latency_p99_ms']['median']:>7.2f}  {note}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--durability", default="fsync,batch,memory", help="comma list (default %(default)s)")
    p.add_argument("--sizes", default="1024", help="comma list of message bytes (default %(default)s)")
    p.add_argument("--messages", type=int, default=0, help="per run (default: 30k at 1 KB, fewer for bigger)")
    p.add_argument("--runs", type=int, default=0, help="measured runs per cell (default 3, --quick 1)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up messages (default 1000, --quick 200)")
    p.add_argument("--concurrency", type=int, default=50, help="pipelining sessions (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="server.workers (default %(default)s)")
    p.add_argument("--rest", type=float, default=1.0, help="seconds between warm-up and run")
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--server-cmd", default="", help='default: "<venv>/bin/volley serve"')
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="smoke check: fewer messages, 1 run")
    a = p.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.warmup = a.warmup or (200 if a.quick else 1000)
    if a.quick and a.rest == 1.0:
        a.rest = 0.2
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = server_command(args.server_cmd)
    if cmd is None:
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    levels = [d.strip() for d in args.durability.split(",") if d.strip()]
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    cells: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for size in sizes:
        messages = args.messages or default_messages(size, args.quick)
        for level in levels:
            runs = []
            for i in range(args.runs):
                try:
                    r = one_run(cmd, level, size, args, messages)
                except (RuntimeError, subprocess.SubprocessError, OSError) as err:
                    print(f"  {level} {size} B run {i + 1}: FAILED: {err}", file=sys.stderr)
                    failures.append({"durability": level, "size": size, "error": str(err)})
                    break  # the next cell may still work (e.g. another durability)
                runs.append(r)
                print(f"  {level:<6} {size:>6} B run {i + 1}/{args.runs}: {r['msgs_per_s']:,.0f} msgs/s,"
                      f" server {r['server_cpu_us_per_msg']:.0f} us/msg,"
                      f" client {r['client_cpu_us_per_msg']:.0f} us/msg,"
                      f" accepted {r['accepted']}/{messages}", file=sys.stderr, flush=True)
            if runs:
                cells.append(summarise(level, size, runs))
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
