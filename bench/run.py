"""Side-by-side end-to-end benchmark: Volley against Postfix and aiosmtpd+LMDB, one table.

    .venv/bin/python bench/run.py                        # every row (~15 min on 2 cores)
    .venv/bin/python bench/run.py --quick                # 1 run, fewer messages, no latency/scale rows
    .venv/bin/python bench/run.py --only receive-1k,relay-1k --systems volley-fsync,postfix,aiosmtpd
    .venv/bin/python bench/run.py --only newsletter      # HTTP campaign vs SMTP, DKIM on/off (bench/newsletter.py)
    .venv/bin/python bench/run.py --only shaping         # 5 shaped providers, a priority message (bench/shaping.py)
    .venv/bin/python bench/run.py --only cluster         # 3 nodes, with and without Redis (bench/cluster.py)

Peers come from `make bench-peers` (Postfix, with its smtp-source and smtp-sink, and
aiosmtpd); a missing peer's rows are skipped with a note. Every system is driven by
the same load generator and delivers to the same sink: smtp-source and smtp-sink when
installed, else engine.lab.blast (lock-step) and the Python sink. All traffic stays on
127.0.0.0/8: servers listen on 127.0.0.1, the sink on 127.0.0.2, Volley's only DNS
server (a loopback zone) on 127.0.0.1. Results: the table on stdout and
bench/results/latest.json. See bench/README.md, "Side by side with real peers".
"""
# (The docstring above is --help.) The rows and systems are in run_rows.py, one cell's
# warm-up and measured runs in run_cell.py; this module holds the shared peers, the
# options, the loop over the cells and the report.

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charts  # noqa: E402
import cluster  # noqa: E402
import dests  # noqa: E402
import newsletter  # noqa: E402
import shaping  # noqa: E402
import shaping_report  # noqa: E402
from e2e import REPO  # noqa: E402  (bench/ is not a package)
from peers import load, postfix, report, sinks, systems  # noqa: E402
from relay import write_zone  # noqa: E402
from relay_peers import LIFETIME, Peer  # noqa: E402
from run_cell import CellMeasuring  # noqa: E402
from run_rows import GROUPS, LATENCY, MESSAGES, Row, System, plan  # noqa: E402

RESULTS = REPO / "bench" / "results" / "latest.json"


class Bench(CellMeasuring):
    """The peers shared by all cells (sinks, DNS) and the measuring loop (run_cell.py)."""

    def __init__(self, args: argparse.Namespace, volley_cmd: list[str]) -> None:
        self.args = args
        self.volley_cmd = volley_cmd
        self.notes: list[str] = []
        self.source = args.load == "smtp-source" or (args.load == "auto" and Path(load.SMTP_SOURCE).exists())
        self.load_label = ("smtp-source (Postfix, C, lock-step, -d: one connection per session)" if self.source
                           else "engine.lab.blast --no-pipelining (lock-step)")
        self.load_label += f", {args.sessions} sessions"
        self._sink: Any = None
        self._latency_sink: Any = None
        self.dns: Peer | None = None
        self.dns_port = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="volley-run-peers-")

    # --- shared peers, started on first use -------------------------------------------
    def sink(self, latency: bool) -> Any:
        if latency:
            if self._latency_sink is None:
                # No STARTTLS: Postfix is configured without TLS, so Volley must not use it either.
                self._latency_sink = sinks.PySink(("--latency", LATENCY))
            return self._latency_sink
        if self._sink is None:
            use_c = self.args.sink == "smtp-sink" or (self.args.sink == "auto" and Path(sinks.SMTP_SINK).exists())
            self._sink = sinks.CSink() if use_c else sinks.PySink()
        return self._sink

    def dns_for_volley(self, domains: int) -> int:
        if self.dns is None:
            zone = Path(self._tmp.name) / "zone.json"
            write_zone(zone, domains, "per-domain")
            self.dns = Peer("dns", ["-m", "engine.lab.dns", "--zone", str(zone), "--origin", ".",
                                    "--lifetime", str(LIFETIME - 60)])
            self.dns_port = int(self.dns.wait_event("ready", 60)["port"])
        return self.dns_port

    def labels(self) -> dict[str, Any]:
        """Which load generator and sinks this invocation used."""
        return {"load_generator": self.load_label,
                "sink": self._sink.label if self._sink is not None else "(no relay rows)",
                "latency_sink": self._latency_sink.label if self._latency_sink is not None else None}

    def close(self) -> None:
        for peer in (self._sink, self._latency_sink, self.dns):
            if peer is not None:
                peer.stop()
        self._tmp.cleanup()

    # --- one cell ---------------------------------------------------------------------
    def server(self, row: Row, system: System, sink: Any) -> Any:
        a = self.args
        if row.kind == "newsletter":
            return newsletter.server(self, system, sink)
        if system.kind == "volley":
            relay = (self.dns_for_volley(a.zone_domains), sink.port) if row.kind == "relay" else None
            # A big queue takes longer to open: two minutes, and half a minute more per million.
            ready = a.ready_timeout + (120 + 30 * row.prefill // 1_000_000 if row.prefill else 0)
            return systems.Volley(system.durability, a.workers, self.volley_cmd, relay, ready,
                                  prefill=(row.prefill, a.prefill_domains))
        if system.kind == "postfix":
            return systems.Postfix(f"{sinks.SINK_HOST}:{sink.port}" if row.kind == "relay" else None)
        return systems.Aiosmtpd(a.ready_timeout)

    def generate(self, row: Row, system: System, address: str, n: int, rate: float = 0.0) -> load.LoadResult:
        cap = 120 + n / 20  # seconds: anything slower than 20 msgs/s is broken
        if row.kind == "dests":
            return dests.generate(self, row, system, address, n, rate)
        if row.kind == "newsletter":
            return newsletter.generate(self, system, address, n)
        if system.own_load:
            return load.blast(address, n, self.args.sessions, row.size, row.domains, True, cap, rate)
        if self.source:
            return load.smtp_source(address, n, self.args.sessions, row.size, "d0.example", cap)
        return load.blast(address, n, self.args.sessions, row.size, 1, False, cap)

    def messages(self, row: Row) -> int:
        if row.kind == "newsletter":
            return self.args.newsletter_messages
        if self.args.messages:
            return self.args.messages
        if row.id.startswith("scale-"):
            return self.args.scale_messages
        return MESSAGES[row.size] // (5 if self.args.quick else 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma list of row ids or groups ({', '.join(GROUPS)});"
                   " ids: receive-1k/10k/100k, relay-1k/..., latency-1k/..., scale-base/queued/domains,"
                   " newsletter, shaping, slow-dests, down-dest, hot-domain")
    p.add_argument("--systems", default="", help="comma list: volley-fsync, volley-batch, volley-memory,"
                   " volley-pipelining, volley-scale, postfix, aiosmtpd, or volley (all of Volley);"
                   f" newsletter cells: {', '.join(m.id for m in newsletter.MODES)}; volley-shaping")
    p.add_argument("--runs", type=int, default=0, help="measured runs per cell (default 3, --quick 1;"
                   " latency rows always 1)")
    p.add_argument("--messages", type=int, default=0, help="per run (default 4,000 at 1 KB, 2,500 at"
                   " 10 KB, 800 at 100 KB, --quick a fifth; scale rows --scale-messages)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up messages per cell (default 500, --quick 100)")
    p.add_argument("--sessions", type=int, default=50, help="concurrent sessions of the load generator")
    p.add_argument("--workers", type=int, default=2, help="Volley's server.workers")
    p.add_argument("--load", choices=("auto", "smtp-source", "blast"), default="auto",
                   help="the common load generator (auto: smtp-source when installed)")
    p.add_argument("--sink", choices=("auto", "smtp-sink", "python"), default="auto",
                   help="the common sink (auto: smtp-sink when installed)")
    p.add_argument("--sink-latency", action=argparse.BooleanOptionalAction, default=True,
                   help=f"run the latency rows (relay through `volley sink --latency {LATENCY}`)")
    p.add_argument("--scale-messages", type=int, default=10_000, help="per run in the scale rows")
    p.add_argument("--newsletter-messages", type=int, default=0,
                   help=f"recipients of the campaign request = SMTP messages per run in the newsletter row"
                   f" (default {newsletter.MESSAGES:,}, --quick a fifth)")
    p.add_argument("--shaping-messages", type=int, default=0,
                   help=f"the shaping row's newsletter (default {shaping.MESSAGES:,}, --quick a fifth)")
    p.add_argument("--shaping-runs", type=int, default=1, help="runs of the shaping row (each ~2-3 min)")
    p.add_argument("--shaping-warm", type=int, default=20,
                   help="the slowest provider's deliveries before the priority message is sent")
    p.add_argument("--shaping-patience", type=float, default=120.0,
                   help="seconds to wait for the priority message before calling it undelivered")
    p.add_argument("--prefill", type=int, default=1_000_000, help="messages queued before scale-queued")
    p.add_argument("--prefill-domains", type=int, default=10_000)
    p.add_argument("--dns-warm-rate", type=float, default=150.0,
                   help="msgs/s cap of the warm-up that fills the DNS cache in the 10k-domain row")
    p.add_argument("--rest", type=float, default=0.5, help="seconds before each run")
    p.add_argument("--stall", type=float, default=30.0, help="fail a run when delivery stops this long")
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="1 run, a fifth of the messages, no latency/scale rows")
    a = p.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    a.warmup = a.warmup or (100 if a.quick else 500)
    a.newsletter_messages = a.newsletter_messages or newsletter.MESSAGES // (5 if a.quick else 1)
    a.shaping_messages = a.shaping_messages or shaping.MESSAGES // (5 if a.quick else 1)
    return a


def skip_reasons(args: argparse.Namespace) -> dict[str, str]:
    """System kinds or row groups that cannot run here, with why."""
    out = {}
    if why := postfix.unavailable():
        out["postfix"] = why
    if importlib.util.find_spec("aiosmtpd") is None:
        out["aiosmtpd"] = "aiosmtpd is not installed in this venv (make bench-peers)"
    out.update(newsletter.unavailable())
    out.update(shaping.unavailable())
    out.update(cluster.unavailable())
    if not args.sink_latency:
        out["latency"] = "--no-sink-latency"
    elif not sinks.volley_sink_supports("--latency", "--targets-from-stdin", "--json", "--no-starttls"):
        out["latency"] = "`volley sink` has no --latency (or --targets-from-stdin, --json, --no-starttls) yet"
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_all(bench: Bench, todo: list[tuple[Row, list[System]]],
            skipped: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Every cell in order: (cells, failures and skips, interrupted)."""
    cells: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    try:
        for row, members in todo:
            if row.kind == "dests":
                got, failed = dests.run_row(bench, row, members, skipped)
                cells += got
                failures += failed
                continue
            for system in members:
                why = skipped.get(system.kind) or skipped.get(row.id.split("-")[0]) or skipped.get(system.id)
                if why:
                    failures.append({"row": row.id, "system": system.id, "skipped": why})
                    continue
                try:
                    cells.append(cell := bench.cell(row, system))
                except RuntimeError as err:
                    cell = {"runs": [], "error": str(err)}
                if "error" in cell:
                    print(f"  {row.id} {system.id}: FAILED after {len(cell['runs'])} runs: {cell['error']}",
                          file=sys.stderr)
                    failures.append({"row": row.id, "system": system.id, "error": cell["error"][-4000:]})
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return cells, failures, True
    return cells, failures, False


def finish(args: argparse.Namespace, facts: dict[str, Any], meta: dict[str, Any], cells: list[dict[str, Any]],
           failures: list[dict[str, Any]], interrupted: bool) -> int:
    """The table, the targets and latest.json; the exit status."""
    report.add_ratios(cells)
    newsletter.add_ratios(cells)
    dests.add_ratios(cells)
    print()
    others = [c for c in cells if c.get("kind") != "shaping"]
    if others or not cells:
        report.print_table(others, meta)
    newsletter.print_table(cells, meta.get("newsletter") or {})
    shaping_report.print_table(cells)
    dests.print_notes(cells)
    for why in sorted({f.get("skipped", "") for f in failures} - {""}):
        print(f"skipped: {why}")
    goals = report.targets(cells) + (newsletter.targets(cells) if "newsletter" in meta else []) + \
        shaping_report.targets(cells) + dests.targets(cells)
    report.print_targets(goals)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": facts, **meta, "interrupted": interrupted,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cells": cells, "failures": failures, "targets": goals,
    }, indent=2) + "\n")
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    print(f"\nwritten {shown} ({facts['elapsed_s'] / 60:.1f} min; load average {facts['loadavg'][0]:.1f}"
          f" at the start, {facts['loadavg_end'][0]:.1f} at the end)")
    print(charts.draw_safely(args.output, charts.stem_for(args.output)))  # says why when it cannot
    ok = cells and not interrupted and all(c["complete"] for c in cells) and \
        not any("error" in f for f in failures)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    volley = Path(sys.executable).parent / "volley"
    if not volley.exists():
        print(f"{volley} not found (make install)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every finally block stops its processes.
    signal.signal(signal.SIGTERM, _interrupt)
    todo = plan(args)
    args.zone_domains = max([50, *(row.domains for row, _ in todo if row.kind != "dests")])
    skipped = skip_reasons(args)
    facts = report.machine_facts()
    started = time.monotonic()
    bench = Bench(args, [str(volley), "serve"])
    try:
        cells, failures, interrupted = run_all(bench, todo, skipped)
    finally:
        meta = bench.labels()
        bench.close()
    if any(row.kind == "newsletter" for row, _ in todo) and not interrupted:
        meta["newsletter"] = newsletter.facts()  # signing speed, timed with the servers gone
    facts.update(elapsed_s=round(time.monotonic() - started), loadavg_end=os.getloadavg())
    return finish(args, facts, meta, cells, failures, interrupted)


if __name__ == "__main__":
    raise SystemExit(main())
