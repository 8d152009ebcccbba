"""The shaping row's figures (bench/shaping.py): per provider, from what its sink saw;
the cell summary, the targets and the table.

Definitions (bench/README.md, "Shaping row"):
* peak sessions: the most sessions open at the provider's sink at once, each counted
  from its banner to its QUIT (or the lost connection), over all its addresses;
* achieved rate: (messages - 1) ÷ (last arrival - first arrival), the provider's
  mean rate over its whole delivery;
* most in 1 s (10 s): the most arrivals in any 1 s (10 s) window, against the rate
  times the window plus the burst the engine allows (shared_limits.burst_of: 1, or a
  tenth of a second's worth above 10/s), the GCRA's promise for such a window. The
  sink sees arrivals, not the engine's hand-overs: a few ms of jitter between the two
  can put a message or two more into a 1 s window than left in it, so the judged
  figure allows JITTER (20 ms) of the rate on top; the table shows the strict one;
* per-second series: arrivals and the most open sessions in each second since the
  newsletter request was sent (in the JSON, for plots).
"""

from __future__ import annotations

import statistics
from typing import Any

RATE_TARGET = 0.9  # achieved >= 90% of the allowed rate
PRIORITY_TARGET = 5.0  # seconds: "within seconds"
JITTER = 0.02  # seconds of hand-over → arrival jitter allowed in the judged 1 s window


def most_in_window(times: list[float], window: float) -> int:
    """The most of the sorted `times` that fall in any window (t - window, t]."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def per_second(times: list[float], t0: float) -> list[int]:
    out: list[int] = []
    for t in times:
        s = max(0, int(t - t0))
        out.extend([0] * (s + 1 - len(out)))
        out[s] += 1
    return out


def live_per_second(events: list[list[float]], t0: float, seconds: int) -> list[int]:
    """The most sessions open in each second (events: [t, open after the change])."""
    out = [0] * seconds
    live, i = 0, 0
    for s in range(seconds):
        top = live
        while i < len(events) and events[i][0] - t0 < s + 1:
            live = int(events[i][1])
            top = max(top, live)
            i += 1
        out[s] = top
    return out


def analyse(p: Any, d: dict[str, Any], t0: float) -> dict[str, Any]:
    """One provider's figures from its sink's dump; t0: when the newsletter was sent."""
    from engine.delivery.shared_limits import burst_of

    arrivals = sorted(d["arrivals"])
    n = len(arrivals)
    out: dict[str, Any] = {"messages": n, "cap": p.cap, "peak_sessions": d["peak"],
                           "socket_peak": d["socket_peak"], "sessions_opened": d["opened"],
                           "rate": p.rate, "per_second_allowed": p.per_second or None}
    if not n:
        return {**out, "first_s": None, "last_s": 0.0, "achieved_per_s": None}
    span = arrivals[-1] - arrivals[0]
    out.update(first_s=arrivals[0] - t0, last_s=arrivals[-1] - t0, span_s=span,
               achieved_per_s=(n - 1) / span if n > 1 and span > 0 else None,
               peak_1s=most_in_window(arrivals, 1.0), peak_10s=most_in_window(arrivals, 10.0))
    if p.cap is not None:
        out["over_cap"] = d["peak"] > p.cap
    if p.rate:
        rate = p.per_second
        out.update(burst=burst_of(rate), allowed_1s=rate + burst_of(rate), allowed_10s=10 * rate + burst_of(rate),
                   of_rate=None if out["achieved_per_s"] is None else out["achieved_per_s"] / rate)
        out["allowed_1s_jitter"] = rate * (1 + JITTER) + burst_of(rate)
        out["over_rate_strict"] = out["peak_1s"] > out["allowed_1s"]
        out["over_rate"] = out["peak_1s"] > out["allowed_1s_jitter"]
    series = per_second(arrivals, t0)
    out["arrivals_per_second"] = series
    out["sessions_per_second"] = live_per_second(d["sessions"], t0, len(series))
    return out


def one_line(r: dict[str, Any]) -> str:
    parts = []
    for name, v in r["providers"].items():
        cap = "-" if v["cap"] is None else v["cap"]
        rate = f"{v['achieved_per_s']:.1f}/s" if v.get("achieved_per_s") else "n/a"
        parts.append(f"{name} {v['peak_sessions']}/{cap} conn {rate}")
    pr = r.get("priority", {})
    shown = f"{pr['seconds']:.2f}s" if pr.get("delivered") else "NOT delivered"
    return f"{'; '.join(parts)}; priority {shown}; {r['elapsed_s']:.0f}s"


def summarise(row: Any, system: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if "error" not in r]
    cell: dict[str, Any] = {"row": row.id, "row_label": row.label, "kind": row.kind, "size": row.size,
                            "system": system.id, "system_label": system.label, "runs": runs,
                            "complete": bool(runs) and len(done) == len(runs) and all(r["complete"] for r in done)}
    if error := next((r["error"] for r in runs if "error" in r), None):
        cell["error"] = error
    rates = [r["msgs_per_s"] for r in done]
    cell["msgs_per_s"] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)} if rates else None
    return cell


def _worst(cells: list[dict[str, Any]]) -> dict[str, float | None]:
    """Over every run and provider: the worst of each judged figure."""
    peaks, rates, windows, priority = [], [], [], []
    for c in cells:
        for r in c["runs"]:
            if "providers" not in r:
                continue
            for v in r["providers"].values():
                if v["cap"]:
                    peaks.append(v["peak_sessions"] / v["cap"])
                if v.get("of_rate") is not None:
                    rates.append(v["of_rate"])
                    windows.append(v["peak_1s"] / v["allowed_1s_jitter"])
            pr = r.get("priority", {})
            priority.append(pr["seconds"] if pr.get("delivered") else float("inf"))
    return {"peak": max(peaks, default=None), "rate": min(rates, default=None),
            "window": max(windows, default=None), "priority": max(priority, default=None)}


def targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mine = [c for c in cells if c.get("kind") == "shaping"]
    if not mine:
        return []
    w = _worst(mine)
    rows = [("shaping: peak sessions / max_connections (worst)", w["peak"], 1.0, "<="),
            ("shaping: achieved rate / allowed rate (worst)", w["rate"], RATE_TARGET, ">="),
            ("shaping: most in 1 s / (rate + burst, 20 ms jitter) (worst)", w["window"], 1.0, "<="),
            ("shaping: priority-9 message delivered, seconds", w["priority"], PRIORITY_TARGET, "<=")]
    out = []
    for name, value, goal, how in rows:
        met = None if value is None else (value <= goal if how == "<=" else value >= goal)
        out.append({"target": name, "value": value, "goal": goal, "met": met})
    return out


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_run(r: dict[str, Any], i: int, runs: int) -> None:
    print(f"run {i + 1}/{runs}: {r['messages']:,} messages queued in {r['queue_s']:.1f} s (one request),"
          f" all delivered in {r['elapsed_s']:.0f} s ({r['msgs_per_s']:,.0f} msgs/s),"
          f" server {r['server_cpu_us_per_msg']:.0f} us/msg")
    head = (f"{'provider':<8} {'rule (why)':<14} {'messages':>8} {'cap':>4} {'peak':>5} {'opened':>6}"
            f" {'rate':>9} {'achieved/s':>10} {'% rate':>7} {'most in 1s':>10} {'allowed':>8}"
            f" {'in 10s':>7} {'allowed':>8}  note")
    print(head)
    print("-" * len(head))
    for name, v in r["providers"].items():
        rule = r.get("rules", {}).get(name, {})
        why = "mx_suffix" if str(rule.get("why", "")).startswith("mx_suffix") else (rule.get("why") or "?")[:10]
        note = []
        if v.get("over_cap"):
            note.append("OVER CAP")
        if v.get("over_rate"):
            note.append("OVER RATE")
        elif v.get("over_rate_strict"):
            note.append(f"+{v['peak_1s'] - v['allowed_1s']:.0f} in 1 s (within {1000 * JITTER:.0f} ms jitter)")
        if v.get("of_rate") is not None and v["of_rate"] < RATE_TARGET:
            note.append("UNDER 90%")
        allowed = f"{v['allowed_1s']:.0f}" if v.get("allowed_1s") else "-"
        allowed10 = f"{v['allowed_10s']:.0f}" if v.get("allowed_10s") else "-"
        print(f"{name:<8} {(rule.get('rule') or '-') + ' (' + why + ')':<14} {v['messages']:>8,}"
              f" {v['cap'] if v['cap'] else '-':>4} {v['peak_sessions']:>5} {v['sessions_opened']:>6}"
              f" {v['rate'] or '-':>9} {_f(v.get('achieved_per_s'), ',.1f'):>10}"
              f" {_f(None if v.get('of_rate') is None else 100 * v['of_rate'], '.1f'):>7}"
              f" {v.get('peak_1s', 0):>10} {allowed:>8} {v.get('peak_10s', 0):>7} {allowed10:>8}  {', '.join(note)}")
    pr = r.get("priority", {})
    if pr.get("delivered"):
        print(f"priority 9 to {pr['recipient']}: at the sink {pr['seconds']:.2f} s after its request was sent"
              f" ({pr['after_answer_s']:.2f} s after the answer was read); {pr['newsletter_between']} newsletter"
              f" messages to that provider arrived in between")
    elif pr:
        print(f"priority 9 to {pr.get('recipient')}: NOT delivered within {pr.get('waited_s')} s")


def print_table(cells: list[dict[str, Any]]) -> None:
    for c in (c for c in cells if c.get("kind") == "shaping"):
        done = [r for r in c["runs"] if "providers" in r]
        print("\nshaping: one newsletter request to 5 providers ([[shaping]] by mx_suffix, caps server-wide),"
              " volley fsync, 2 workers; per provider as its sink saw it")
        for i, r in enumerate(done):
            print_run(r, i, len(c["runs"]))
        if "error" in c:
            print(f"INCOMPLETE: {c['error'].splitlines()[0][:300]}")
