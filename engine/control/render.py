"""Human output of `volley ctl`, one function per command, from the reply objects.

The client reads a reply as the plain JSON object it is, not as the server's Structs
(engine/control/replies.py): every field is read with `.get` and a missing or null one
prints as "-" (engine/control/formats.py), so the server may add, drop or rename
optional fields without breaking an older client.

The answers of the commands that change something (flush, suspend, drain ...) are in
render_changes.py; the suppression list and campaigns in render_lists.py, warm-up in
render_warmup.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.control import render_lists, render_warmup
from engine.control.formats import (
    DASH,
    Column,
    Row,
    age,
    clip,
    count,
    human_size,
    local_time,
    moment,
    names,
    number,
    plural,
    rate,
    relative,
    sender,
    short_duration,
    table,
)
from engine.control.render_changes import render_simple
from engine.observe.rates import WINDOWS

# --- per command -------------------------------------------------------------------------


def render_status(reply: Row, now: float) -> str:
    q = reply.get("queue") or {}
    out = [
        f"volley {reply.get('version', DASH)} on {reply.get('hostname', DASH)}, "
        f"pid {reply.get('pid', DASH)}, up {short_duration(reply.get('uptime'))}"
        f"{', DRAINING' if reply.get('draining') else ''}\n",
        f"listeners  {_listeners(reply)}\n",
        f"queue      {plural(q.get('messages'), 'message')}, {plural(q.get('units'), 'delivery unit')}, "
        f"{human_size(q.get('bytes'))}: {number(q.get('ready'))} ready, "
        f"{number(q.get('deferred'))} deferred, {number(q.get('suspended'))} suspended\n",
        "\n",
        table(reply.get("workers") or [], [
            Column("WORKER", "slot"), Column("PID", "pid"),
            Column("AGE", lambda w: short_duration(w.get("age")), ">"),
            Column("RESTARTS", "restarts"), Column("SESSIONS IN", "sessions_in"),
            Column("SESSIONS OUT", "sessions_out"), Column("IN FLIGHT", "inflight", ">"),
            Column("OUT LIMIT", lambda w: w.get("out_limit") or "-", ">"),
            Column("WAITING", lambda w: w.get("out_waiting") or 0, ">"),
        ]),
    ]
    rates = reply.get("rates") or {}
    if rates:
        # Messages per second over the last 1, 5 and 15 minutes (engine/observe/rates.py).
        out += ["\n", table([{"window": k, **(v or {})} for k, v in rates.items()], [
            Column("PER SECOND", _window),
            *(Column(name.upper(), _per_second(name), ">")
              for name in ("received", "delivered", "deferred", "bounced")),
        ])]
    out += _section("suspended", reply.get("suspensions"), [
        Column("DOMAIN", "domain"), Column("BY", "by"),
        Column("SINCE", lambda s: relative(s.get("since"), now)),
        Column("UNTIL", lambda s: _until(s.get("until"), now)), Column("REASON", "reason"),
    ])
    out += _section("throttled", reply.get("throttles"), [
        Column("DOMAIN", "domain"), Column("MAX CONNECTIONS", "max_connections"),
        Column("RATE", lambda t: rate(t.get("rate")), ">"),
    ])
    out += _section("backing off", reply.get("backoffs"), [
        Column("SITE", "site"), Column("DOMAINS", lambda b: names(b.get("domains"))),
        Column("UNTIL", lambda b: relative(b.get("until"), now)),
        Column("REPLY", lambda b: clip(b.get("reply"))),
    ])
    if "reactions" in reply:  # a server before [[reactions]] has no such section
        out += _section("reactions", reply.get("reactions"), _reaction_columns(now))
    if reply.get("cluster"):
        out += _cluster(reply["cluster"])
    return "".join(out)


def _cluster(c: Row) -> list[str]:
    """[cluster]: the link, then this node's share of each provider limit ("leased"
    from Redis, or "local": cap ÷ live nodes while degraded) beside every node's."""
    state = str(c.get("state", DASH)).upper() if c.get("state") != "healthy" else "healthy"
    out = ["\n", f"cluster    node {c.get('node', DASH)}, {state}, {plural(c.get('live_nodes'), 'live node')}"
                 f" (redis {c.get('redis', DASH)})\n"]
    return out + _section("shares", c.get("limits"), [
        Column("LIMIT", "key"), Column("CAP", lambda r: r.get("cap") or DASH, ">"),
        Column("SHARE", lambda r: r.get("share") if r.get("cap") else DASH, ">"),
        Column("OPEN", "open", ">"), Column("MODE", "mode"),
        Column("RATE", lambda r: rate(r.get("rate")) if r.get("rate") else DASH, ">"),
        Column("CREDIT", lambda r: r.get("credit") if r.get("rate") else DASH, ">"),
        Column("NODES", lambda r: " ".join(f"{n}={k}" for n, k in sorted((r.get("by_node") or {}).items()))
               or DASH),
    ])


def _listeners(reply: Row) -> str:
    shown = ", ".join(reply.get("listeners") or [])
    if reply.get("draining"):  # closed by the drain: nothing accepts mail any more
        return "closed (draining): not accepting mail" + (f"; still listed: {shown}" if shown else "")
    return shown or DASH


def _reaction_columns(now: float) -> list[Column]:
    return [
        Column("PROVIDER", "provider"), Column("ACTION", "action"),
        Column("SINCE", lambda r: relative(r.get("since"), now)),
        Column("UNTIL", lambda r: relative(r.get("until"), now)),
        Column("RATE", lambda r: DASH if r.get("action") == "suspend" else f"x{r.get('factor', 1):.2f}", ">"),
        Column("REPLY", lambda r: clip(r.get("reply"))),
    ]


def _window(row: Row) -> str:
    """The window's label; when it covers less than its length (a server younger than
    the window: every such row is the same average since start), how much it covers."""
    label = str(row.get("window"))
    covered = row.get("seconds")
    length = dict(WINDOWS).get(label)
    if isinstance(covered, (int, float)) and length is not None and covered < length:
        return f"{label} ({covered:.0f} s of data)"
    return label


def _per_second(name: str) -> Callable[[Row], str]:
    def get(row: Row) -> str:
        v = row.get(name)
        if not isinstance(v, (int, float)):
            return DASH
        if v == 0:
            return "0"
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"

    return get


def _section(title: str, rows: list[Row] | None, columns: Sequence[Column]) -> list[str]:
    if not rows:
        return [f"\n{title}: none\n"]
    return [f"\n{title}:\n", table(rows, columns, indent="  ")]


def _until(ts: float | None, now: float) -> str:
    return "until resumed" if ts is None else relative(ts, now)


def render_queue(reply: Row, now: float) -> str:
    """qshape's layout: one row per domain (or sender), one column per age bucket in
    minutes. `--by age` rows are the buckets themselves: totals only."""
    rows: list[Row] = reply.get("rows") or []
    columns = [Column(str(reply.get("by") or "key").upper(), "key", "<"), Column("T", "total")]
    if any("ages" in r for r in rows):
        buckets: list[str] = list(reply.get("buckets") or [])
        columns += [Column(b, _bucket(i), ">") for i, b in enumerate(buckets)]
        columns += [
            Column("OLDEST", lambda r: age(r.get("oldest"), now), ">"),
            Column("STATE", "state"),
            Column("NEXT", lambda r: relative(r.get("next_attempt"), now)),
        ]
        if any(r.get("reason") or r.get("until") or r.get("by_who") for r in rows):
            columns.append(Column("NOTE", _note))
    else:
        columns += [Column("READY", "ready"), Column("DEFERRED", "deferred")]
    return (table(rows, columns) if rows else "queue is empty\n") + _queue_totals(reply)


def _queue_totals(reply: Row) -> str:
    t = reply.get("totals") or {}
    shown, total = len(reply.get("rows") or []), reply.get("rows_total")
    more = f" (showing {shown} of {total} rows)" if isinstance(total, int) and total > shown else ""
    where = f" in {number(t['domains'])} domains" if t.get("domains") is not None else ""
    return (f"{number(t.get('units'))} delivery units{where}: "
            f"{number(t.get('ready'))} ready, {number(t.get('deferred'))} deferred, "
            f"{number(t.get('suspended'))} suspended{more}\n")


def _bucket(i: int) -> Callable[[Row], object]:
    def get(row: Row) -> object:
        ages = row.get("ages") or []
        return ages[i] if i < len(ages) else None

    return get


def _note(row: Row) -> str:
    parts = []
    if row.get("until"):
        parts.append(f"until {local_time(row['until'])}")
    if row.get("by_who"):
        parts.append(f"by {row['by_who']}")
    if row.get("reason"):
        parts.append(clip(row["reason"], 40))
    return ", ".join(parts)


def render_list(reply: Row, now: float) -> str:
    messages: list[Row] = reply.get("messages") or []
    out = table(messages, [
        Column("ID", "id"),
        Column("AGE", lambda m: age(m.get("received_at"), now), ">"),
        Column("SIZE", lambda m: human_size(m.get("size")), ">"),
        Column("SENDER", lambda m: sender(m.get("sender"))),
        Column("PENDING", lambda m: f"{number(count(m.get('pending')))}/"
                                  f"{number(count(m.get('recipients')))}", ">"),
        Column("DOMAINS", lambda m: names(m.get("domains"), 2)),
        Column("STATE", "state"), Column("TRIES", "attempts"),
        Column("NEXT", lambda m: relative(m.get("next_attempt"), now)),
        Column("LAST REPLY", lambda m: clip(m.get("last_reply"), 50)),
    ]) if messages else "no messages match\n"
    if reply.get("next"):
        out += f"more: volley ctl list --after {reply['next']}\n"
    return out


def render_show(reply: Row, now: float) -> str:
    m = reply.get("message") or {}
    client = " ".join(str(v) for v in (m.get("client_ip"), m.get("helo") and f"helo {m['helo']}") if v)
    fields = [
        ("id", m.get("id")), ("sender", sender(m.get("sender"))),
        ("received", moment(m.get("received_at"), now)), ("size", human_size(m.get("size"))),
        ("body", m.get("body_type")), ("smtputf8", _yes_no(m.get("smtputf8"))),
        ("ret", m.get("ret")), ("envid", m.get("envid")), ("client", client),
        ("auth user", m.get("auth_user")),
    ]
    width = max(len(k) for k, _ in fields) + 1
    out = [f"{(k + ':').ljust(width)} {DASH if v in (None, '') else v}\n" for k, v in fields]
    out += ["\n", table(m.get("recipients") or [], [
        Column("RECIPIENT", "address"), Column("STATE", "state"), Column("TRIES", "attempts"),
        Column("NEXT", lambda r: relative(r.get("next_attempt"), now)),
        Column("NOTIFY", lambda r: names(r.get("notify"), 4)), Column("ORCPT", "orcpt"),
        Column("LAST REPLY", lambda r: clip(r.get("last_reply"))),
    ])]
    headers = m.get("headers") or []
    if headers:
        out.append("\n")
        out += [f"{name}: {value}\n" for name, value in headers]
    return "".join(out)


def _yes_no(value: object) -> str:
    return DASH if value is None else ("yes" if value else "no")


# "not cached" is not "no MX": a domain never looked up (or expired) shows as such.
_MX_KINDS = {"route": "route", "error": "error", "not_cached": "not cached (never looked up or expired)",
             "none": "not cached"}


def render_mx(reply: Row, now: float) -> str:
    if "flushed" in reply:
        return f"flushed {number(reply.get('flushed'))} cached MX entries\n"
    rows: list[dict[str, Any]] = []
    for e in reply.get("entries") or []:
        hosts = e.get("hosts") or [{}]
        for i, h in enumerate(hosts):
            rows.append({
                "domain": e.get("domain") if i == 0 else "",
                "kind": _MX_KINDS.get(e.get("kind"), e.get("kind")) if i == 0 else "",
                "ttl": short_duration(e.get("ttl")) if i == 0 and e.get("ttl") is not None else "",
                "pref": h.get("preference"), "host": h.get("name"),
                "addresses": names(h.get("addresses"), 4),
                "reply": clip(e.get("reply"), 50) if i == 0 and e.get("reply") else "",
            })
    if not rows:
        return "no cached MX entries\n"
    return table(rows, [
        Column("DOMAIN", "domain"), Column("KIND", "kind"), Column("TTL", "ttl", ">"),
        Column("PREF", "pref"), Column("HOST", "host"), Column("ADDRESSES", "addresses"),
        Column("REPLY", "reply"),
    ])


def render_shaping(reply: Row, now: float) -> str:
    """`ctl shaping DOMAIN`: the entry and why, the effective settings (marked where the
    entry sets them), then the provider's live figures."""
    rule = reply.get("rule")
    hosts = reply.get("mx_hosts") or []
    lines = [f"domain:    {reply.get('domain') or DASH}",
             f"rule:      {rule or '(none)'}",
             f"why:       {reply.get('why') or DASH}"]
    if hosts:
        lines.append(f"mx hosts:  {names(hosts, 4)} ({reply.get('mx_source') or DASH})")
    given = set(reply.get("set_by_rule") or [])
    settings = reply.get("settings") or {}
    if isinstance(settings, dict) and settings:
        lines.append("settings:")
        for key, value in settings.items():
            by = "max_connections" if key == "max_connections_server_wide" else key
            mark = "  (shaping)" if by in given else ""
            shown = "no limit" if value is None else value
            lines.append(f"  {key:<30} {shown}{mark}")
    live = reply.get("live")
    if isinstance(live, dict):
        workers = live.get("by_worker") or {}
        split = ", ".join(f"worker {k}: {v}" for k, v in sorted(workers.items())) if isinstance(
            workers, dict) else ""
        lines.append(f"live:      {number(live.get('connections'))} connections server-wide"
                     + (f" ({split})" if split else ""))
        wait = live.get("next_message_in")
        if settings.get("rate") if isinstance(settings, dict) else None:
            lines.append("           rate: " + (f"at the limit, next message in {wait:.3f}s"
                                                 if isinstance(wait, (int, float)) and wait > 0
                                                 else "room now"))
    elif rule:
        lines.append("live:      no figures yet (nothing sent to this provider since the start)")
    return "\n".join(lines) + "\n"


_RENDERERS: dict[str, Callable[[Row, float], str]] = {
    "status": render_status, "queue": render_queue, "list": render_list,
    "show": render_show, "mx": render_mx, "shaping": render_shaping,
    "warmup": render_warmup.render_warmup,
    "metrics": lambda reply, now: str(reply.get("text") or ""),
    "suppress_add": render_lists.render_suppress_add,
    "suppress_remove": render_lists.render_suppress_remove,
    "suppress_list": render_lists.render_suppress_list,
    "campaigns": render_lists.render_campaigns,
}


def render(cmd: str, reply: Row, now: float | None = None) -> str:
    """The human text for a successful reply to `cmd`."""
    now = time.time() if now is None else now
    fn = _RENDERERS.get(cmd)
    return fn(reply, now) if fn else render_simple(cmd, reply, now)
