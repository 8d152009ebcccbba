"""Human output of `volley ctl`, one function per command, from the reply dicts.

Every field is read with `.get` and a missing or null one prints as "-", so the server
may add, drop or rename optional fields without breaking an older client. Times on the
wire are epoch seconds: they are shown relative ("3m05s ago", "in 12m") where the
distance matters, as local ISO time where the moment does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]
DASH = "-"
_EPOCH_FLOOR = 1e9  # a number above this is a moment (2001+), below it a span of seconds
_REPLY_WIDTH = 60


# --- values ----------------------------------------------------------------------------


def short_duration(seconds: float | None) -> str:
    """Two most significant units, the second zero-padded: 45s, 3m05s, 2h03m, 4d07h."""
    if seconds is None:
        return DASH
    s = int(round(abs(seconds)))
    if s < 60:
        return f"{s}s"
    for big, small, unit, sub in ((86400, 3600, "d", "h"), (3600, 60, "h", "m"), (60, 1, "m", "s")):
        if s >= big:
            rest = (s % big) // small
            return f"{s // big}{unit}{rest:02d}{sub}" if rest else f"{s // big}{unit}"
    raise AssertionError("unreachable")


def relative(ts: float | None, now: float) -> str:
    """"in 12m", "3m05s ago", or "now" within a second."""
    if ts is None:
        return DASH
    delta = ts - now
    if abs(delta) < 1:
        return "now"
    return f"in {short_duration(delta)}" if delta > 0 else f"{short_duration(delta)} ago"


def local_time(ts: float | None) -> str:
    if ts is None:
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def moment(ts: float | None, now: float) -> str:
    """Local time and its distance: "2024-05-01 12:00:00 (in 1h59m)"."""
    return DASH if ts is None else f"{local_time(ts)} ({relative(ts, now)})"


def age(value: float | None, now: float) -> str:
    """An age given either as a span of seconds or as the epoch moment it started."""
    if value is None:
        return DASH
    return short_duration(now - value if value > _EPOCH_FLOOR else value)


def human_size(n: int | None) -> str:
    if n is None:
        return DASH
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"


def number(value: object) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:.0f}" if value >= 100 or value.is_integer() else f"{value:.1f}"
    return str(value)


def plural(n: object, word: str) -> str:
    """"1 message", "3 messages", "- messages" when the count is missing."""
    return f"{number(n)} {word}" if n == 1 else f"{number(n)} {word}s"


def clip(text: object, width: int = _REPLY_WIDTH) -> str:
    if text is None or text == "":
        return DASH
    s = " ".join(str(text).split())  # multi-line SMTP replies on one line
    return s if len(s) <= width else s[: width - 1] + "…"


def names(items: object, most: int = 3) -> str:
    """A list shown as "a, b, c +4"; a scalar as itself."""
    if items is None:
        return DASH
    if not isinstance(items, list):
        return str(items)
    if not items:
        return DASH
    shown = ", ".join(str(i) for i in items[:most])
    return shown + (f" +{len(items) - most}" if len(items) > most else "")


def count(value: object) -> object:
    """A count sent as a number or as the list itself."""
    return len(value) if isinstance(value, list) else value


def sender(value: object) -> str:
    return DASH if value is None else (str(value) or "<>")  # RFC 5321 4.5.5 null sender


# --- the table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """`get` is a key or a function of the row; `align` "<" or ">", "" = numbers right."""

    title: str
    get: str | Callable[[Row], object]
    align: str = ""


def table(rows: Iterable[Row], columns: Sequence[Column], indent: str = "") -> str:
    """A plain-text table: a title line, then one line a row; widths from content."""
    raw = [[c.get(r) if callable(c.get) else r.get(c.get) for c in columns] for r in rows]
    cells = [[v if isinstance(v, str) else number(v) for v in row] for row in raw]
    right = [
        c.align == ">" or (not c.align and _numeric(row[i] for row in raw))
        for i, c in enumerate(columns)
    ]
    widths = [max([len(c.title), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = []
    for row in [[c.title for c in columns], *cells]:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return "\n".join(lines) + "\n"


def _numeric(values: Iterable[object]) -> bool:
    seen = [v for v in values if v is not None]
    return bool(seen) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen)


# --- per command -------------------------------------------------------------------------


def render_status(reply: Row, now: float) -> str:
    q = reply.get("queue") or {}
    out = [
        f"volley {reply.get('version', DASH)} on {reply.get('hostname', DASH)}, "
        f"pid {reply.get('pid', DASH)}, up {short_duration(reply.get('uptime'))}"
        f"{', DRAINING' if reply.get('draining') else ''}\n",
        f"listeners  {', '.join(reply.get('listeners') or []) or DASH}\n",
        f"queue      {plural(q.get('messages'), 'message')}, {plural(q.get('units'), 'delivery unit')}, "
        f"{human_size(q.get('bytes'))}: {number(q.get('ready'))} ready, "
        f"{number(q.get('deferred'))} deferred, {number(q.get('suspended'))} suspended\n",
        "\n",
        table(reply.get("workers") or [], [
            Column("WORKER", "slot"), Column("PID", "pid"),
            Column("AGE", lambda w: short_duration(w.get("age")), ">"),
            Column("RESTARTS", "restarts"), Column("SESSIONS IN", "sessions_in"),
            Column("SESSIONS OUT", "sessions_out"),
            Column("OUT LIMIT", lambda w: w.get("out_limit") or "-", ">"),
            Column("WAITING", lambda w: w.get("out_waiting") or 0, ">"),
        ]),
    ]
    rates = reply.get("rates") or {}
    if rates:
        # Messages per second over the last 1, 5 and 15 minutes (engine/observe/rates.py).
        out += ["\n", table([{"window": k, **(v or {})} for k, v in rates.items()], [
            Column("PER SECOND", "window"),
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
    return "".join(out)


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


def rate(value: float | None) -> str:
    """Messages per second, shown per minute when that reads better (0.5/s → 30/m)."""
    if value is None:
        return DASH
    if value >= 1:
        return f"{number(float(value))}/s"
    return f"{number(value * 60.0)}/m"


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


def render_simple(cmd: str, reply: Row, now: float) -> str:
    """The one-line answers of the commands that change something."""
    if cmd == "flush":
        return f"flushed {plural(reply.get('messages'), 'message')}\n"
    if cmd == "suspend":
        s = reply.get("suspension") or {}
        until = "until resumed" if s.get("until") is None else f"until {moment(s['until'], now)}"
        why = f": {s['reason']}" if s.get("reason") else ""
        return f"suspended {s.get('domain', DASH)} {until}{why}\n"
    if cmd == "resume":
        if not reply.get("resumed"):
            return "not suspended; nothing to resume\n"
        return f"resumed; {plural(reply.get('released'), 'message')} released\n"
    if cmd in ("bounce", "delete"):
        return _bulk(cmd, reply)
    if cmd == "throttle":
        t = reply.get("throttle")
        if not t:
            return "throttle cleared\n"
        return (f"throttle {t.get('domain', DASH)}: max connections "
                f"{number(t.get('max_connections'))}, rate {rate(t.get('rate'))}\n")
    if cmd == "reload":
        return "configuration reloaded\n"
    if cmd == "drain":
        return _drain(reply)
    if cmd == "shutdown":
        return "shutting down\n"
    raise KeyError(cmd)


def _bulk(cmd: str, reply: Row) -> str:
    verb = {"bounce": "bounced", "delete": "deleted"}[cmd]
    matched = reply.get("matched")
    if reply.get("dry_run"):
        return f"dry run: {plural(matched, 'message')} would be {verb}\n"
    took = reply.get("seconds")
    return f"{verb} {number(reply.get('done'))} of {plural(matched, 'matched message')}" + (
        f" in {took:.1f}s\n" if isinstance(took, (int, float)) else "\n")


def _drain(reply: Row) -> str:
    drained, left = reply.get("drained"), reply.get("remaining")
    took = short_duration(reply.get("seconds"))
    if isinstance(drained, bool):
        head = "queue drained" if drained else "queue not drained"
    else:
        head = f"drained {plural(drained, 'message')}"
    return f"{head} in {took}; {number(left)} remaining\n"


def render_mx(reply: Row, now: float) -> str:
    if "flushed" in reply:
        return f"flushed {number(reply.get('flushed'))} cached MX entries\n"
    rows: list[dict[str, Any]] = []
    for e in reply.get("entries") or []:
        hosts = e.get("hosts") or [{}]
        for i, h in enumerate(hosts):
            rows.append({
                "domain": e.get("domain") if i == 0 else "",
                "kind": e.get("kind") if i == 0 else "",
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


_RENDERERS: dict[str, Callable[[Row, float], str]] = {
    "status": render_status, "queue": render_queue, "list": render_list,
    "show": render_show, "mx": render_mx,
    "metrics": lambda reply, now: str(reply.get("text") or ""),
}


def render(cmd: str, reply: Row, now: float | None = None) -> str:
    """The human text for a successful reply to `cmd`."""
    now = time.time() if now is None else now
    fn = _RENDERERS.get(cmd)
    return fn(reply, now) if fn else render_simple(cmd, reply, now)
