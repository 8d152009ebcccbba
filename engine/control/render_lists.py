"""Human output of `volley ctl suppress ...` and `volley ctl campaigns`, from the plain
reply objects (read with `.get`, a missing field prints "-"), as render.py does for the
queue commands."""

from __future__ import annotations

from typing import Any

from engine.control.formats import DASH, Column, Row, clip, local_time, number, table


def render_suppress_list(reply: Row, now: float) -> str:
    entries: list[Row] = reply.get("entries") or []
    out = table(entries, [
        Column("VALUE", "value"), Column("KIND", "kind"), Column("REASON", "reason"),
        Column("SOURCE", lambda e: clip(e.get("source"), 50)),
        Column("TENANT", lambda e: (e.get("tenant") or "(all)") if "tenant" in e else DASH),
        Column("CREATED", lambda e: local_time(e.get("created"))),
    ]) if entries else "no entries\n"
    total = reply.get("total")
    if total is not None:
        out += f"{number(total)} {'entry' if total == 1 else 'entries'} on the list (every tenant)\n"
    if reply.get("next"):
        more = f"--after {_quote(reply['next'])}"
        if reply.get("next_tenant"):
            more += f" --after-tenant {_quote(reply['next_tenant'])}"
        out += f"more: volley ctl suppress list {more}\n"
    return out


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def render_suppress_add(reply: Row, now: float) -> str:
    out = (f"added {number(reply.get('added'))}, already present {number(reply.get('present'))}"
           f", bad {number(len(reply.get('bad') or []))}\n")
    for b in reply.get("bad") or []:
        out += f"  not added: {b.get('value')!r}: {b.get('error')}\n"
    return out


def render_suppress_remove(reply: Row, now: float) -> str:
    return "removed\n" if reply.get("removed") else "not on the list; nothing removed\n"


def bounced(c: Row) -> str:
    """"12 (mailbox 10, policy 2)": the count and its classes, biggest first."""
    classes: dict[str, Any] = c.get("bounced_by_class") or {}
    parts = sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))
    detail = ", ".join(f"{k} {number(v)}" for k, v in parts if v)
    return f"{number(c.get('bounced'))}" + (f" ({detail})" if detail else "")


def render_campaigns(reply: Row, now: float) -> str:
    rows: list[Row] = reply.get("campaigns") or []
    if not rows:
        return "no campaigns\n"
    return table(rows, [
        Column("TENANT", lambda c: c.get("tenant") or DASH),
        Column("CAMPAIGN", lambda c: c.get("campaign") or DASH),
        Column("INJECTED", "injected", ">"), Column("DELIVERED", "delivered", ">"),
        Column("DEFERRED", "deferred", ">"), Column("BOUNCED", bounced, ">"),
        Column("SUPPRESSED", "suppressed", ">"), Column("COMPLAINED", "complained", ">"),
        Column("LAST ACTIVE", lambda c: local_time(c.get("last_at")) if c.get("last_at") else DASH),
    ])
