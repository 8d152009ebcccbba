"""The `[[shaping]]` entries: limits per receiving provider (engine/delivery/shaping.py
matches them, engine/delivery/shared_limits.py holds their caps across workers).

Kept apart from tree.py, which imports them into `Config`. Each entry names what it
matches, `domain` (a pattern) or `mx_suffix` (the tail of the domain's most-preferred
MX host names), and any of the settings; an unset setting keeps the delivery or route
default. `rate` and `connect_rate` are written "300/min", "20000/h", "5/s"
(`parse_rate`); the loader turns a ValueError("key: problem") into
"shaping[2].key: problem".
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from engine.config.units import Duration


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_SUFFIX = re.compile(rf"\.?{_LABEL}(?:\.{_LABEL})*")
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}


def parse_rate(text: str) -> float:
    """ "300/min" → 5.0 (events per second).

    Raises ValueError naming the syntax for anything else, or a rate of 0.
    """
    m = _RATE.fullmatch(text)
    if m is None:
        raise ValueError(f'expected a rate such as "300/min", "20000/h" or "5/s", got "{text}"')
    per_second = float(m.group(1)) / _PER[m.group(2).lower()]
    if per_second <= 0:
        raise ValueError(f'must be more than 0, got "{text}" (leave the key out for no limit)')
    return per_second


class ShapingConfig(_Frozen, frozen=True):
    # Shown by the tools and keys the server-wide figures; "" = derived from the match
    # ("example.com", "*.example.com", "mx:.mx.google.com").
    name: str = ""
    # Exactly one of the two:
    domain: str = ""  # "example.com" (exact) or "*.example.com" (any subdomain)
    mx_suffix: str = ""  # ".mx.google.com": the domain's most-preferred MX hosts end so
    # Unset (None) = the [delivery] / [[routes]] default.
    max_connections: int | None = None  # server-wide, all workers together
    max_messages_per_connection: int | None = None
    max_recipients_per_message: int | None = None  # RCPTs per transaction
    rate: str | None = None  # messages, server-wide, smooth (GCRA, burst ≤ 1 s's worth)
    connect_rate: str | None = None  # new connections, server-wide, likewise
    idle_timeout: Duration | None = None
    tls: Literal["opportunistic", "required", "none"] | None = None

    def __post_init__(self) -> None:
        if bool(self.domain) == bool(self.mx_suffix):
            raise ValueError("domain: give exactly one of domain or mx_suffix")
        if self.domain and not _DOMAIN.fullmatch(self.domain):
            raise ValueError(
                f'domain: expected "example.com" or "*.example.com", got "{self.domain}"')
        if self.mx_suffix and not _SUFFIX.fullmatch(self.mx_suffix):
            raise ValueError(
                f'mx_suffix: expected a host name suffix such as ".mx.google.com", got "{self.mx_suffix}"')
        for key in ("max_connections", "max_messages_per_connection", "max_recipients_per_message"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be at least 1, got {value}")
        for key in ("rate", "connect_rate"):
            text = getattr(self, key)
            if text is not None:
                try:
                    parse_rate(text)
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout: must be more than 0")

    @property
    def label(self) -> str:
        """The entry's name: `name`, or one derived from what it matches."""
        if self.name:
            return self.name
        return self.domain.lower() if self.domain else f"mx:{self.mx_suffix.lower()}"

    @property
    def per_second(self) -> float:
        """`rate` in messages per second; 0 when unset."""
        return parse_rate(self.rate) if self.rate else 0.0

    @property
    def connects_per_second(self) -> float:
        """`connect_rate` in connections per second; 0 when unset."""
        return parse_rate(self.connect_rate) if self.connect_rate else 0.0


def check_shaping(entries: list[ShapingConfig]) -> None:
    """Across entries: names and matches are unique (a domain must find one rule).

    Raises ValueError("shaping[i].key: problem").
    """
    names: dict[str, int] = {}
    matches: dict[str, int] = {}
    for i, entry in enumerate(entries):
        label = entry.label
        if label in names:
            raise ValueError(f'shaping[{i}].name: "{label}" is also shaping[{names[label]}]\'s name')
        names[label] = i
        key = entry.domain.lower() or "mx:" + entry.mx_suffix.lower().lstrip(".")
        if key in matches:
            what = "domain" if entry.domain else "mx_suffix"
            raise ValueError(f"shaping[{i}].{what}: the same match as shaping[{matches[key]}]")
        matches[key] = i
