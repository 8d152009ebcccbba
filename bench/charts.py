"""bench/run.py's results as one chart: msgs/s and CPU per message, every row and system.

    .venv/bin/python bench/charts.py                       # bench/results/latest.json -> bench.svg, bench.png
    .venv/bin/python bench/charts.py some.json --out /tmp/some   # /tmp/some.svg and /tmp/some.png

Two panels share one axis of rows: on the left each cell's median msgs/s (a thin line
from the slowest to the fastest run), on the right its server CPU per message in µs
(the server's whole process tree, not the load generator or the sink). Systems keep one
colour everywhere: Volley in blues, Postfix orange, aiosmtpd+LMDB green. A Volley bar
carries its ratios as text: "6.6× Postfix" (same row, same run of the benchmark), and the
ratios to its own reference where a row has one ("97% of scale-base", "81% of receive
only"). An incomplete cell (a run failed, or messages were left) is hatched. bench/run.py
draws it after writing latest.json; a failure to draw is reported, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"
STEM = HERE / "results" / "bench"  # bench.svg and bench.png beside latest.json

PEER_NAMES = {"postfix": "Postfix", "aiosmtpd": "aiosmtpd"}
# Ratios to a reference inside Volley's own cells, shown as a percentage.
OWN_REFS = {"base": "scale-base", "zero_latency": "zero latency", "receive_only": "receive only",
            "fifty_domains": "50 domains"}
COLOURS = {"postfix": "#e6862e", "aiosmtpd": "#4a9c4a"}
VOLLEY_BLUES = ("#1f4e8c", "#3a75c4", "#6d9fde", "#9dbfe9", "#284a75", "#5b8cc9", "#8fb3e0")


def colour(system: str, volley_ids: list[str]) -> str:
    if system in COLOURS:
        return COLOURS[system]
    return VOLLEY_BLUES[volley_ids.index(system) % len(VOLLEY_BLUES)] if system in volley_ids else "#888888"


def ratio_text(cell: dict[str, Any]) -> str:
    """'6.6× Postfix, 10.3× aiosmtpd' and '97% of scale-base' for a Volley cell."""
    out = []
    for key, value in (cell.get("ratios") or {}).items():
        if not isinstance(value, (int, float)):
            continue
        if key in PEER_NAMES:
            out.append(f"{value:.1f}× {PEER_NAMES[key]}")
        elif key in OWN_REFS:
            out.append(f"{100 * value:.0f}% of {OWN_REFS[key]}")
    return ", ".join(out)


def bars(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One bar per cell with a msgs/s median, in the order of the results (rows as run)."""
    out = []
    for c in cells:
        rate = c.get("msgs_per_s")
        if not isinstance(rate, dict) or rate.get("median") is None:
            continue  # e.g. a shaping cell: its figures are of another kind
        cpu = c.get("cpu_s_per_1k")
        out.append({"row": c.get("row", "?"), "label": f"{c.get('row_label', c.get('row', '?'))} · "
                    f"{c.get('system_label', c.get('system', '?'))}",
                    "system": c.get("system", "?"), "rate": float(rate["median"]),
                    "lo": float(rate.get("min", rate["median"])), "hi": float(rate.get("max", rate["median"])),
                    "cpu_us": None if not isinstance(cpu, dict) or cpu.get("median") is None
                    else 1000 * float(cpu["median"]),
                    "ratios": ratio_text(c), "complete": bool(c.get("complete", True))})
    return out


def title(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    load = m.get("loadavg") or [None]
    first = f"{load[0]:.1f}" if isinstance(load[0], (int, float)) else "?"
    return (f"Volley side by side · {m.get('date', '?')} · commit {m.get('commit', '?')} · "
            f"{m.get('nproc', '?')} CPU {m.get('cpu_model', '')} · load average {first} at the start\n"
            f"load: {data.get('load_generator', '?')} · sink: {data.get('sink', '?')} · medians of each cell's runs")


def draw(data: dict[str, Any], stem: Path) -> list[Path]:
    """Writes stem.svg and stem.png; returns their paths. Raises ValueError with nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable, checkable
    import matplotlib.pyplot as plt

    items = bars(data.get("cells") or [])
    if not items:
        raise ValueError("no cell with a msgs/s figure to draw")
    volley_ids = sorted({b["system"] for b in items if b["system"] not in COLOURS})
    # Rows as run, top to bottom; a gap between rows of the benchmark.
    ys, y, last = [], 0.0, None
    for b in items:
        if last is not None and b["row"] != last:
            y += 0.6
        ys.append(-y)
        last = b["row"]
        y += 1.0
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(15, 1.6 + 0.32 * (y + 1)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    rate_max = max(b["hi"] for b in items)
    for b, yy in zip(items, ys, strict=True):
        kw = {"color": colour(b["system"], volley_ids), "height": 0.8,
              "hatch": None if b["complete"] else "//", "edgecolor": "white" if b["complete"] else "black"}
        left.barh(yy, b["rate"], **kw)
        if b["hi"] > b["lo"]:
            left.plot([b["lo"], b["hi"]], [yy, yy], color="black", linewidth=0.8)
        text = f"{b['rate']:,.0f}" + (f"  {b['ratios']}" if b["ratios"] else "")
        left.text(max(b["rate"], b["hi"]) + rate_max * 0.01, yy, text, va="center", fontsize=7.5)
        if b["cpu_us"] is not None:
            right.barh(yy, b["cpu_us"], **kw)
            right.text(b["cpu_us"], yy, f" {b['cpu_us']:,.0f}", va="center", fontsize=7.5)
    left.set_yticks(ys, [b["label"] for b in items], fontsize=8)
    left.set_xlim(0, rate_max * 1.45)  # room for the ratio labels
    left.set_xlabel("messages per second (median; line: min..max of the runs)")
    right.set_xlabel("server CPU per message, µs (whole process tree; less is better)")
    cpu_max = max((b["cpu_us"] for b in items if b["cpu_us"] is not None), default=1.0)
    right.set_xlim(0, cpu_max * 1.15)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title(data), fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".svg"), stem.with_suffix(".png")]
    fig.savefig(paths[0], metadata={"Date": None})  # no timestamp: a redraw of the same data is the same file
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def stem_for(results: Path) -> Path:
    """Where the chart of `results` goes: bench/results/bench for latest.json, else beside it."""
    return STEM if results.resolve() == RESULTS.resolve() else results.with_suffix("")


def draw_safely(results: Path, stem: Path) -> str:
    """For bench/run.py: draws and says where, or says why not (never raises)."""
    try:
        paths = draw(json.loads(results.read_text()), stem)
    except ImportError as err:
        return f"chart not drawn: {err} (make bench installs matplotlib: pip install -e '.[bench]')"
    except Exception as err:  # noqa: BLE001  the measurement is done; a chart problem must not fail it
        return f"chart not drawn: {type(err).__name__}: {err}"
    return "chart: " + ", ".join(str(p) for p in paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=RESULTS, help="a bench/run.py JSON file")
    p.add_argument("--out", type=Path, default=None,
                   help="path without suffix (default: bench/results/bench for latest.json, else beside the JSON)")
    a = p.parse_args(argv)
    stem = a.out or stem_for(a.results)
    message = draw_safely(a.results, stem)
    print(message)
    return 0 if message.startswith("chart:") else 1


if __name__ == "__main__":
    sys.exit(main())
