"""Human output of `volley ctl warmup` (engine/control/warmup_view.py), from the plain
reply object, as render.py does for the other commands."""

from __future__ import annotations

from engine.control.formats import DASH, Row, number


def _cap(value: object) -> str:
    return "no cap" if value is None else number(value)


def render_warmup(reply: Row, now: float) -> str:
    sources: list[Row] = reply.get("sources") or []
    if not sources:
        return "no [[egress]] entries: mail leaves from delivery.source_address\n"
    lines = [f"hour: {reply.get('hour') or DASH} (UTC)"]
    for s in sources:
        head = (f"{s.get('name') or DASH}  {s.get('address') or DASH}  pool {s.get('pool') or DASH}"
                f"  ehlo {s.get('ehlo_name') or DASH}")
        lines.append("")
        lines.append(head)
        if not s.get("scheduled"):
            lines.append("  no warm-up schedule: no cap")
            continue
        start, source = s.get("start") or "", s.get("start_from") or ""
        since = f"since {start} ({source})" if start else f"({source or 'not sent yet'})"
        lines.append(f"  day {s.get('day') if s.get('day') is not None else DASH} {since}")
        lines.append("  schedule: " + "; ".join(s.get("schedule") or []))
        rows: list[Row] = s.get("providers") or []
        width = max([len("PROVIDER")] + [len(str(p.get("provider") or "")) for p in rows])
        lines.append(f"  {'PROVIDER':<{width}}  {'ALLOWANCE/H':>11}  {'USED':>8}  {'HEADROOM':>8}")
        for p in rows:
            lines.append(f"  {str(p.get('provider') or DASH):<{width}}  {_cap(p.get('allowance')):>11}"
                         f"  {number(p.get('used')):>8}  {_cap(p.get('headroom')):>8}")
    return "\n".join(lines) + "\n"
