"""bench/run.py's output: per-cell summaries, ratios, the table, the targets, machine facts."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from e2e import git_commit

from engine.lab.demo.report import percentile
from peers import postfix

PEERS = ("postfix", "aiosmtpd")
# Figures summarised as median/min/max over a cell's runs.
STATS = ("msgs_per_s", "intake_msgs_per_s", "cpu_s_per_1k", "rss_mib", "pss_mib", "anon_mib", "file_mib",
         "max_process_rss_mib",
         "client_cpu_us_per_msg", "sink_cpu_us_per_msg", "reply_p50_ms", "reply_p99_ms",
         "delivery_p50_ms", "delivery_p99_ms", "probe_ms", "sink_core_share")


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (as engine.lab.blast does), None for no values."""
    return percentile(sorted(values), q) if values else None


def summarise(row: Any, system: Any, runs: list[dict[str, Any]], details: dict[str, Any]) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float] | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    complete = bool(runs) and all(r["accepted"] == r["messages"] for r in runs) and \
        details.get("exit", 0) == 0 and details.get("queue_left") in (None, 0)
    return {"row": row.id, "row_label": row.label, "kind": row.kind, "size": row.size,
            "system": system.id, "system_label": system.label, "runs": runs, "complete": complete,
            **details, **{k: stat(k) for k in STATS}}


def median(cell: dict[str, Any] | None, key: str = "msgs_per_s") -> float | None:
    if cell is None or cell.get(key) is None:
        return None
    return cell[key]["median"]


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """Each Volley cell ÷ each peer in the same row; scale rows ÷ their baseline row."""
    by_key = {(c["row"], c["system"]): c for c in cells}
    base = by_key.get(("scale-base", "volley-scale"))
    for c in cells:
        c["ratios"] = {}
        if c["system"].startswith("volley") and c["system"] != "volley-nolat":  # its sink differs from the peer's
            for peer in PEERS:
                mine, theirs = median(c), median(by_key.get((c["row"], peer)))
                if mine and theirs:
                    c["ratios"][peer] = mine / theirs
        if c["row"].startswith("scale-") and c["row"] != "scale-base" and median(base) and median(c):
            c["ratios"]["base"] = median(c) / median(base)  # type: ignore[operator]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _pair(c: dict[str, Any], a: str, b: str) -> str:
    x, y = median(c, a), median(c, b)
    if x is None and y is None:
        return "n/a"
    return f"{_fmt(x, '.1f')}/{_fmt(y, '.1f')}"


def _memory(c: dict[str, Any]) -> str:
    return (f"{_fmt(median(c, 'rss_mib'), '.0f')} ({_fmt(median(c, 'pss_mib'), '.0f')})"
            f" {_fmt(median(c, 'anon_mib'), '.0f')}")


def print_table(cells: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"load generator: {meta['load_generator']}; sink: {meta['sink']}")
    if meta.get("latency_sink"):
        print(f"latency rows' sink: {meta['latency_sink']}")
    head = (f"{'row':<24} {'system':<28} {'msgs/s median (min..max)':>26} {'x postfix':>9} {'x aiosmtpd':>10}"
            f" {'CPU s/1k':>8} {'RSS (PSS) anon MiB':>18} {'250 p50/p99 ms':>15} {'deliv p50/p99 ms':>17}  note")
    print(head)
    print("-" * len(head))
    last_row = None
    for c in cells:
        if last_row is not None and c["row"] != last_row:
            print()
        last_row = c["row"]
        m = c["msgs_per_s"]
        rate = f"{m['median']:,.0f} ({m['min']:,.0f}..{m['max']:,.0f})" if m else "n/a"
        r = c.get("ratios", {})
        note = [] if c["complete"] else ["INCOMPLETE"]
        if "base" in r:
            note.append(f"{100 * r['base']:.0f}% of scale-base")
        if c.get("prefill_s"):
            note.append(f"prefill {c['prefill_s']:.0f}s")
        if c["row"].startswith("scale-") and c["runs"] and "anon_before_mib" in c["runs"][0]:
            note.append(f"anon {c['runs'][0]['anon_before_mib']:.0f}->{c['runs'][-1]['anon_mib']:.0f} MiB")
        print(f"{c['row_label']:<24} {c['system_label']:<28} {rate:>26}"
              f" {_fmt(r.get('postfix'), '.2f'):>9} {_fmt(r.get('aiosmtpd'), '.2f'):>10}"
              f" {_fmt(median(c, 'cpu_s_per_1k'), '.3f'):>8} {_memory(c):>18}"
              f" {_pair(c, 'reply_p50_ms', 'reply_p99_ms'):>15} {_pair(c, 'delivery_p50_ms', 'delivery_p99_ms'):>17}"
              f"  {', '.join(note)}")


def targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure (None when its rows did not run)."""
    by_key = {(c["row"], c["system"]): c for c in cells}

    def ratio(row: str, system: str, peer: str) -> float | None:
        return by_key.get((row, system), {}).get("ratios", {}).get(peer)

    relay_cpu = median(by_key.get(("relay-1k", "volley-fsync")), "cpu_s_per_1k")
    scaled = [by_key.get((r, "volley-scale"), {}).get("ratios", {}).get("base")
              for r in ("scale-queued", "scale-domains")]
    queued = by_key.get(("scale-queued", "volley-scale"), {})
    prefill = int(queued.get("prefill") or 0)
    many = f"{prefill / 1e6:g}M" if prefill >= 1e6 else f"{prefill:,}" if prefill else "1M"
    out = [
        ("relay e2e 1 KB fsync >= 5x Postfix (aim 8x)", ratio("relay-1k", "volley-fsync", "postfix"), 5.0, "x"),
        ("receive durable 1 KB, 50 sessions >= 7x aiosmtpd+LMDB",
         ratio("receive-1k", "volley-fsync", "aiosmtpd"), 7.0, "x"),
        ("CPU per relayed message <= 250 us (relay 1 KB fsync)",
         None if relay_cpu is None else 1000 * relay_cpu, 250.0, "us<="),
        ("relay 100 KB fsync >= 3x Postfix", ratio("relay-100k", "volley-fsync", "postfix"), 3.0, "x"),
        (f"{many} queued >= 80% of empty queue, 50 domains", scaled[0], 0.8, "x"),
        ("10k domains >= 80% of 50 domains", scaled[1], 0.8, "x"),
    ]
    if prefill >= 5_000_000:  # the opt-in check of issue 15: --prefill 5000000
        out += [(f"{many} queued >= 90% of empty queue, 50 domains", scaled[0], 0.9, "x"),
                (f"RssAnon with {many} queued <= 110% of the empty queue's (flat)",
                 _anon_ratio(queued, by_key.get(("scale-base", "volley-scale"))), 1.1, "us<=")]
    result = []
    for name, value, goal, how in out:
        met = None if value is None else (value <= goal if how == "us<=" else value >= goal)
        result.append({"target": name, "value": value, "goal": goal, "met": met})
    return result


def _anon_ratio(queued: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """The server's RssAnon (heap: what a queue kept in memory would grow) after the
    queued row's runs ÷ the empty queue's, medians; None if either is missing."""
    a, b = median(queued, "anon_mib"), median(base, "anon_mib")
    return a / b if a and b else None


def print_targets(rows: list[dict[str, Any]]) -> None:
    print("\ntargets:")
    for t in rows:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {t['target']:<58} {value:>14}  {verdict}")


def machine_facts() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        aiosmtpd = importlib.metadata.version("aiosmtpd")
    except importlib.metadata.PackageNotFoundError:
        aiosmtpd = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(), "nproc": os.cpu_count(), "cpu_model": model,
        "kernel": platform.release(), "python": platform.python_version(),
        "postfix": postfix.version() or None, "aiosmtpd": aiosmtpd, "loadavg": os.getloadavg(),
    }
