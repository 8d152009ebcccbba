"""bench/run.py's rows with a topology of their own (issue 15): many slow destinations, and
a destination that is down.

* "slow-dests": 1,000 destination domains d0.example .. d999.example spread over 100
  sink addresses 127.0.0.2 .. 127.0.0.101 (domain i on address i mod 100, so ten domains
  share an address and per-destination caps apply per address, as they do to MX hosts
  on the internet). One Python sink process listens on all 100 addresses (one port) and
  delays every end-of-data reply by 20 ms. Volley finds each domain through the lab DNS
  (MX -> its address); Postfix through a transport map (domain -> smtp:[address]:port).
  Both on their default concurrency settings. Beside them Volley with the same sink
  without latency: "slow" is then a share of Volley's own zero-latency figure.
* "down-dest": Volley receiving while every destination refuses connections (the DNS
  sends d0..d9.example to 127.0.0.2..11 on a port nobody listens on), beside the same
  Volley receiving only (delivery off, the receive rows' setup).
* "hot-domain": Volley relaying to one domain (the relay-1k load: smtp-source, 50
  sessions) beside relaying to 50 domains (50 smtp-source processes of one session, each
  its own domain; domain i on address i mod 100 as above, so a cap per address does not
  fold the 50 into one destination), the Python sink without latency for both. The
  split shown is the DELIVERY split: each worker's share of the bytes its connections
  carried to the sink, counted by the kernel (bench/peers/sockbytes.py), beside the CPU
  split, which mixes in the intake (every worker also receives).

The systems of a row run side by side, their runs interleaved (A1 B1 C1 A2 ...), so a
ratio compares runs minutes apart on the same machine load, not cells a quarter of an
hour apart. Load: engine.lab.blast lock-step (it spreads recipients over the domains;
smtp-source sends to one domain per process) for slow-dests, for every system; for
down-dest and hot-domain the receive and relay rows' generator, smtp-source, one process
per domain (blast lock-step over the same domains when smtp-source is missing).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers import load, report, sinks, sockbytes, systems
from peers.procs import free_port
from relay_peers import LIFETIME, Peer, descendants_cpu, worker_split

ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 102))
DOMAINS = 1000  # slow-dests
DOWN_DOMAINS = 10  # down-dest: one smtp-source process per domain
HOT_DOMAINS = 50  # hot-domain's spread cell (scale-base's 50 domains)
LATENCY = "20ms"
DOWN_MESSAGES = 10_000  # per down-dest run (--quick a fifth): long enough to see marking work
FLUSHES = 3
REPEAT = 4  # messages per domain in the warm-up's second pass
RETRY = "5s, 5s, 10s, 1m"  # slow-dests' delivery.retry (see _QuickRetry)
DNS_WARM_RATE = 50.0  # msgs/s of slow-dests' warm-up: one MX and one A lookup each (20 s for 1,000)
SATURATED = 0.9  # a sink using this much of one core is the bottleneck (it is one process)


def address(i: int) -> str:
    return ADDRESSES[i % len(ADDRESSES)]


def zone(domains: int) -> dict[str, Any]:
    """d{i}.example MX 10 mx{i mod 100}.sinks.test, whose A record is address(i): the ten
    domains of an address share its MX host, as a provider's domains do, so the host's
    A/AAAA lookups are made once per address, not per domain (a third of the queries the
    Python lab DNS must answer during a warm-up)."""
    out: dict[str, Any] = {}
    for i in range(domains):
        host = f"mx{i % len(ADDRESSES)}.sinks.test"
        out[f"d{i}.example"] = {"MX": [[10, host]]}
        out[host] = {"A": [address(i)]}
    return out


def transport(domains: int, port: int) -> dict[str, str]:
    """Postfix's transport map of the same topology: domain -> [address]:port."""
    return {f"d{i}.example": f"[{address(i)}]:{port}" for i in range(domains)}


@dataclass
class Member:
    """One system of a row, started: its server, sink (None: receive only) and address."""

    system: Any
    server: Any
    sink: Any
    address: str = ""
    error: str = ""


def domains(row: Any, system: Any) -> int:
    """The recipient domains of a cell: hot-domain's two cells differ in nothing else."""
    if row.id == "hot-domain":
        return 1 if system.id == "volley-1dom" else HOT_DOMAINS
    return int(row.domains)


def generate(bench: Any, row: Any, system: Any, address_: str, n: int, rate: float) -> load.LoadResult:
    """The row's load generator (bench/run.py's Bench.generate hands these rows here)."""
    cap = 120 + n / 20
    k = domains(row, system)
    if row.id != "slow-dests" and bench.source:
        return load.smtp_sources(address_, n, bench.args.sessions, row.size, k, cap)
    return load.blast(address_, n, bench.args.sessions, row.size, k, False, cap, rate)


def load_label(bench: Any, row: Any, system: Any) -> str:
    k = domains(row, system)
    if row.id != "slow-dests" and bench.source:
        what = "smtp-source" if k == 1 else f"smtp-source x{k} processes (one domain each)"
        return f"{what}, {bench.args.sessions} sessions"
    return f"engine.lab.blast --no-pipelining, {k} domains, {bench.args.sessions} sessions"


class _QuickRetry(systems.Volley):
    """slow-dests' Volley: default settings but `delivery.retry` (RETRY): a lookup that the
    starved lab DNS answered too late is retried after seconds, not a minute, so a run
    pays for it in its figure instead of stalling (concurrency stays at its defaults)."""

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().config()
        config["delivery"]["retry"] = RETRY
        return config


def _start(bench: Any, row: Any, system: Any, dns_port: int) -> Member:
    a = bench.args
    cmd = bench.volley_cmd
    if row.id == "down-dest":
        if system.id == "volley-receive":
            return Member(system, systems.Volley("fsync", a.workers, cmd, None, a.ready_timeout), None)
        dead = free_port(ADDRESSES[0])  # nobody listens there: every connection is refused
        return Member(system, systems.Volley("fsync", a.workers, cmd, (dns_port, dead), a.ready_timeout), None)
    extra = ("--latency", LATENCY) if row.id == "slow-dests" and system.id != "volley-nolat" else ()
    sink = sinks.PySink(extra, ADDRESSES)
    try:
        if system.kind == "postfix":
            server: Any = systems.Postfix(f"{ADDRESSES[0]}:{sink.port}", transport(DOMAINS, sink.port))
        else:
            kind = _QuickRetry if row.id == "slow-dests" else systems.Volley
            server = kind("fsync", a.workers, cmd, (dns_port, sink.port), a.ready_timeout)
    except (RuntimeError, OSError, subprocess.SubprocessError):
        sink.stop()
        raise
    return Member(system, server, sink)


def messages(bench: Any, row: Any) -> int:
    if bench.args.messages:
        return int(bench.args.messages)
    if row.id == "down-dest":
        return DOWN_MESSAGES // (5 if bench.args.quick else 1)
    return int(bench.messages(row))


def _warm(bench: Any, row: Any, m: Member) -> None:
    many = domains(row, m.system) > 50 and m.system.kind == "volley"  # one message per domain fills the DNS cache
    if not many:
        m.server.details["warmup_msgs_per_s"] = bench.warm_up(row, m.system, m.server, m.address, m.sink,
                                                              bench.args.warmup, 0.0)
        return
    # Pass 1: one message per domain at most DNS_WARM_RATE. Pass 2: REPEAT more per domain,
    # faster: a domain's messages are delivered by every worker (owner_of(domain, message
    # id)), each with its own DNS cache, and pass 1 warmed one worker's per domain; after
    # pass 2 a worker misses a given domain with odds ~1 in 2**(REPEAT+1). Without it the
    # first measured run's lookups (hundreds at once) timed out on the lab DNS and stalled.
    n = domains(row, m.system)
    rate = min(bench.args.dns_warm_rate, DNS_WARM_RATE)
    first = _warm_pass(bench, row, m, n, rate)
    _warm_pass(bench, row, m, REPEAT * n, REPEAT * rate * 2)
    m.server.details["warmup_msgs_per_s"] = first


def _warm_pass(bench: Any, row: Any, m: Member, w: int, rate: float) -> float:
    """Sends w messages at `rate` and waits for their delivery: at load average ~20 the
    Python lab DNS answered some lookups too late (a minute's deferral each), so a stall
    flushes the queue and waits again, up to FLUSHES times. Returns msgs/s."""
    a = bench.args
    target = m.sink.settle()[0] + w
    m.sink.expect(target)
    res = bench.generate(row, m.system, m.address, w, rate)
    if res.error:
        raise RuntimeError(f"warm-up: {res.error}")
    cap = 120 + w / 20
    for attempt in range(FLUSHES + 1):
        try:
            t_done = m.sink.wait_reached(target, a.stall, cap)
            break
        except RuntimeError as err:
            if attempt == FLUSHES:
                raise
            print(f"  warm-up: {err}; flushing the queue ({attempt + 1}/{FLUSHES})", file=sys.stderr, flush=True)
            try:
                m.server.flush()
            except Exception as flush_err:  # ControlError: too busy to answer
                raise RuntimeError(f"warm-up: {err}; flush: {flush_err}") from flush_err
    m.server.drain(w, a.stall, cap)
    return float(w / (t_done - res.t0))


def _favour(pid: int) -> None:
    """Run a peer's process tree at nice -10 (root only; silently not otherwise): the lab DNS
    is a fixture, not a contestant, and at load average ~20 its fair share of the CPU
    answered the warm-up's lookups after the resolver had given up."""
    for child in descendants_cpu(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, child, -10)
        except OSError:
            return


def _run(bench: Any, row: Any, m: Member, n: int, i: int) -> dict[str, Any]:
    before = dict(m.server.dlog.outcomes) if row.id == "down-dest" and m.sink is None and \
        hasattr(m.server, "dlog") else None
    split = row.id == "hot-domain"
    if split:
        cpu0 = descendants_cpu(m.server.root_pid)
        carried = sockbytes.SocketBytes(m.sink.port).start()
    r: dict[str, Any] = bench.one_run(row, m.system, m.server, m.address, m.sink, n)
    if split:
        _split(r, bench.args.workers, carried.stop(), cpu0, descendants_cpu(m.server.root_pid), n)
    if m.sink is not None and r.get("sink_cpu_us_per_msg") is not None:
        # The sink's CPU over the run as a share of one core (it is one process): near 1, it
        # is what limits the row.
        r["sink_core_share"] = r["sink_cpu_us_per_msg"] * r["msgs_per_s"] / 1e6
    if before is not None:
        m.server.dlog.read()
        after = m.server.dlog.outcomes
        r["log_lines"] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    share = f", sink {100 * r['sink_core_share']:.0f}% of a core" if "sink_core_share" in r else ""
    print(f"  {row.id:<14} {m.system.id:<18} run {i + 1}: {r['msgs_per_s']:,.0f} msgs/s,"
          f" CPU {1000 * r['cpu_s_per_1k']:.0f} us/msg{share}", file=sys.stderr, flush=True)
    return r


def _split(r: dict[str, Any], workers: int, carried: dict[int, int], cpu0: dict[int, tuple[str, float]],
           cpu1: dict[int, tuple[str, float]], n: int) -> None:
    """The delivery split: each worker's share (%) of the bytes its connections carried to
    the sink (largest first), beside the CPU split (intake and delivery together)."""
    mine = {pid: b for pid, b in carried.items() if pid in cpu1}  # the server's processes only
    total = sum(mine.values())
    shares = sorted((round(100 * b / total, 1) for b in mine.values()), reverse=True) if total else []
    r["worker_delivery_split_pct"] = (shares + [0.0] * workers)[:workers] if total else []  # 100/0: one worker
    # Bytes counted per message sent: about the message plus ~100 bytes of commands when
    # every connection was seen; much less means the sampling missed connections.
    r["delivery_bytes_per_msg"] = round(total / n) if n else 0
    r["worker_cpu_split_pct"] = worker_split(cpu0, cpu1, workers)


def run_row(bench: Any, row: Any, members: list[Any],
            skipped: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every system of the row side by side, runs interleaved: (cells, failures and skips)."""
    failures: list[dict[str, Any]] = []
    started: list[Member] = []
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="volley-dests-") as tmp:
        path = Path(tmp) / "zone.json"
        path.write_text(json.dumps(zone(DOMAINS)))
        # A day's TTL: the warm-up's answers stay cached through every run of the row.
        dns = Peer("dns", ["-m", "engine.lab.dns", "--zone", str(path), "--origin", ".", "--ttl", "86400",
                           "--lifetime", str(LIFETIME - 60)])
        try:
            try:
                dns_port = int(dns.wait_event("ready", 60)["port"])
                _favour(dns.proc.pid)
            except RuntimeError as err:  # the row cannot run; the others still can
                return [], [{"row": row.id, "system": s.id, "error": str(err)[-4000:]} for s in members]
            for system in members:
                why = skipped.get(system.kind) or skipped.get(system.id) or \
                    (skipped.get("latency") if row.id == "slow-dests" and system.id != "volley-nolat" else None)
                if why:
                    failures.append({"row": row.id, "system": system.id, "skipped": why})
                    continue
                try:
                    m = _start(bench, row, system, dns_port)
                    started.append(m)
                    m.address = m.server.start()
                    _warm(bench, row, m)
                except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                    if started and started[-1].system is system:
                        started[-1].error = str(err)  # stopped below, not measured
                    failures.append({"row": row.id, "system": system.id, "error": str(err)[-4000:]})
            n = messages(bench, row)
            for i in range(bench.args.runs):
                for m in started:
                    if m.error:
                        continue
                    try:
                        results.setdefault(m.system.id, []).append(_run(bench, row, m, n, i))
                    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                        m.error = f"{err}\n{m.server.diagnostics()}"
        finally:
            for m in started:
                _stop(m)
            dns.stop()
    cells = []
    for m in started:
        runs = results.get(m.system.id, [])
        if not runs:
            if not any(f["system"] == m.system.id for f in failures):
                failures.append({"row": row.id, "system": m.system.id, "error": m.error[-4000:]})
            continue
        details = {**m.server.details, "load_generator": load_label(bench, row, m.system),
                   **({"sink": m.sink.label} if m.sink is not None else {}),
                   **({"error": m.error} if m.error else {})}
        if row.id == "down-dest" and m.system.id != "volley-receive":
            # Every message stays queued (its destination is down): that is the row, not a loss.
            details["queued_at_end"] = details.pop("queue_left", None)
        cells.append(report.summarise(row, m.system, runs, details))
        if m.error:
            failures.append({"row": row.id, "system": m.system.id, "error": m.error[-4000:]})
    return cells, failures


def _stop(m: Member) -> None:
    try:
        if m.server is not None:
            m.server.stop()
    finally:
        if m.sink is not None:
            m.sink.stop()


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """slow-dests: Volley ÷ its own zero-latency cell; down-dest: ÷ receive only;
    hot-domain: one domain ÷ 50 domains."""
    by_key = {(c["row"], c["system"]): c for c in cells}
    pairs = ((("slow-dests", "volley-fsync"), ("slow-dests", "volley-nolat"), "zero_latency"),
             (("down-dest", "volley-down"), ("down-dest", "volley-receive"), "receive_only"),
             (("hot-domain", "volley-1dom"), ("hot-domain", "volley-50dom"), "fifty_domains"))
    for mine, base, name in pairs:
        a, b = report.median(by_key.get(mine)), report.median(by_key.get(base))
        if a and b:
            by_key[mine].setdefault("ratios", {})[name] = a / b


def targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(c["row"], c["system"]): c for c in cells}

    def ratio(row: str, system: str, name: str) -> float | None:
        value = by_key.get((row, system), {}).get("ratios", {}).get(name)
        return None if value is None else float(value)

    goals = [("slow dests (1k domains, 100 IPs, sink +20 ms) >= 5x Postfix",
              ratio("slow-dests", "volley-fsync", "postfix"), 5.0),
             ("slow dests >= 60% of Volley's zero-latency figure",
              ratio("slow-dests", "volley-fsync", "zero_latency"), 0.6),
             ("receive while every destination refuses >= 85% of receive-only",
              ratio("down-dest", "volley-down", "receive_only"), 0.85),
             ("one hot domain >= the 50-domain relay (msgs/s)", ratio("hot-domain", "volley-1dom", "fifty_domains"),
              1.0)]
    out = [{"target": name, "value": value, "goal": goal, "met": None if value is None else value >= goal}
           for name, value, goal in goals]
    # The busier worker's share of the hot domain's deliveries (median over runs): <= 60%.
    shares = [r["worker_delivery_split_pct"][0] / 100 for r in by_key.get(("hot-domain", "volley-1dom"), {})
              .get("runs", []) if r.get("worker_delivery_split_pct")]
    busiest = statistics.median(shares) if shares else None
    out.append({"target": "one hot domain: busier worker's delivery share <= 60%", "value": busiest,
                "goal": 0.6, "met": None if busiest is None else busiest <= 0.6})
    return out


def print_notes(cells: list[dict[str, Any]]) -> None:
    """What the table has no column for: the sink's CPU, the log lines a down
    destination cost, the load generator of these rows."""
    mine = [c for c in cells if c["row"] in ("slow-dests", "down-dest", "hot-domain")]
    if not mine:
        return
    print()
    for c in mine:
        bits = [c.get("load_generator", "")]
        gen = report.median(c, "client_cpu_us_per_msg")
        rate = report.median(c)
        if gen is not None and rate:
            # lock-step blast is Python: near a full core, the generator limits the cell
            bits.append(f"generator CPU {gen * rate / 1e4:.0f}% of one core")
        share = report.median(c, "sink_core_share")
        if share is not None:
            bits.append(f"sink CPU {100 * share:.0f}% of one core" + (" (SATURATED: the sink limits this cell)"
                                                                      if share >= SATURATED else ""))
        lines = [r.get("log_lines") for r in c["runs"] if r.get("log_lines") is not None]
        if any(lines):
            per = sum(sum(x.values()) for x in lines) / sum(r["messages"] for r in c["runs"])
            bits.append(f"delivery log lines per message {per:.2f} ({lines[-1]} in the last run)")
        splits = [(r["worker_delivery_split_pct"], r["worker_cpu_split_pct"], r["delivery_bytes_per_msg"])
                  for r in c["runs"] if "worker_delivery_split_pct" in r]
        if splits:
            bits.append("delivery split per worker " + ", ".join("/".join(f"{x:.0f}" for x in d) for d, _, _ in splits)
                        + " % (CPU split " + ", ".join("/".join(f"{x:.0f}" for x in u) for _, u, _ in splits)
                        + f"); {splits[-1][2]} bytes to the sink per message")
        for name, value in (c.get("ratios") or {}).items():
            if name in ("zero_latency", "receive_only", "fifty_domains"):
                bits.append(f"{100 * value:.0f}% of {name.replace('_', ' ')}")
        print(f"{c['row']:<12} {c['system']:<16} " + "; ".join(b for b in bits if b))
