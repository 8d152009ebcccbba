"""Values and tables as `volley ctl` prints them: durations, moments, sizes, counts,
and plain-text tables whose widths come from their content.

A missing or null value prints as "-" everywhere (DASH), so a reply that lacks an
optional field still renders. Times on the wire are epoch seconds: they are shown
relative ("3m05s ago", "in 12m") where the distance matters, as local ISO time where
the moment does.
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


def rate(value: float | None) -> str:
    """Messages per second, shown per minute when that reads better (0.5/s → 30/m)."""
    if value is None:
        return DASH
    if value >= 1:
        return f"{number(float(value))}/s"
    return f"{number(value * 60.0)}/m"
