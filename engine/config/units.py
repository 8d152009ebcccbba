"""The value syntaxes a configuration file may use, each parsed in one place.

Sizes ("10MiB"), durations ("90s", "5m"), "host:port" addresses, DNS nameservers and
the retry schedule ("1m, 5m, 15m") are read here, at the edge, so the rest of the
engine only ever sees ints, floats and tuples. Every parser raises ValueError with a
one-line message naming the problem; the loader prefixes the key's path.
"""

from __future__ import annotations

import ipaddress
import re


class Size(int):
    """A byte count; accepts 1048576, "1048576", "512KiB", "10MiB", "1GiB", "10MB"."""


class Duration(float):
    """Seconds; accepts 30, "250ms", "90s", "5m", "4h", "5d"."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: object) -> Size:
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as \"10MiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value}")
        return Size(value)
    if isinstance(value, str):
        m = _QUANTITY.fullmatch(value)
        factor = _SIZE_UNITS.get(m.group(2).lower()) if m else None
        if m and factor is not None:
            return Size(int(float(m.group(1)) * factor))
    raise ValueError(f"expected a size such as \"10MiB\", got {value!r}")


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as \"90s\", got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative duration, got {value}")
        return Duration(value)
    if isinstance(value, str):
        m = _QUANTITY.fullmatch(value)
        seconds = _DURATION_UNITS.get(m.group(2).lower()) if m else None
        if m and seconds is not None:
            return Duration(float(m.group(1)) * seconds)
    raise ValueError(f"expected a duration such as \"90s\" or \"5m\", got {value!r}")


# The units a size is written back in: each one parse_size reads to the same number.
_FORMAT_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024),
                 ("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000))


def format_size(n: int) -> str:
    """`n` bytes as the shortest exact text parse_size reads back to `n`: "1TB" stays
    "1TB" (not "976562500KiB"), "4GiB" stays "4GiB"; bytes when no unit divides it.
    A unit wins a tie with bare bytes, a binary unit one with a decimal unit (the
    engine's defaults are written in them)."""
    best = ""
    for unit, factor in _FORMAT_UNITS:
        text = f"{n // factor}{unit}"
        if n >= factor and n % factor == 0 and (not best or len(text) < len(best)):
            best = text
    return best if best and len(best) <= len(str(n)) else str(n)


def format_duration(s: float) -> str:
    if s == 0:
        return "0s"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= factor and s % factor == 0:
            return f"{int(s // factor)}{unit}"
    return f"{int(round(s * 1000))}ms"


# A bracketed IPv6 address may carry a zone ("[fe80::1%eth0]:53", RFC 4007 §11): a
# link-local address means nothing without one.
_HOST_PORT = re.compile(r"\[([0-9a-fA-F:.]+(?:%[\w.-]+)?)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})")


def split_host_port(text: str) -> tuple[str, int]:
    """"127.0.0.1:25" or "[::1]:25" → (host, port); ValueError names the problem.

    An IPv6 address needs its brackets: "::1:25" is refused, never guessed at.
    """
    m = _HOST_PORT.fullmatch(text)
    if not m:
        raise ValueError(f'expected "host:port", got "{text}"')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def parse_nameserver(text: str) -> tuple[str, int]:
    """"192.0.2.1", "192.0.2.1:5353", "2001:db8::1" or "[2001:db8::1]:5353" → (ip, port).

    A bare address means port 53; otherwise the text is read by `split_host_port`, and
    the host must be an IP address (a resolver needs no resolver to be found).
    Raises ValueError naming the problem.
    """
    text = text.strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return text, 53
    try:
        host, port = split_host_port(text)
    except ValueError:
        raise ValueError(f'expected "ip", "ip:port" or "[ipv6]:port", got "{text}"') from None
    if port == 0:
        raise ValueError(f'bad port in "{text}"')
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'expected an IP address, got "{host}" in "{text}"') from None
    return host, port


DEFAULT_SCHEDULE = "1m, 5m, 15m, 30m, 1h, 2h, 4h"


def parse_schedule(text: str) -> tuple[float, ...]:
    """Parse "1m, 5m, 15m, 30m, 1h, 2h, 4h" into seconds (60.0, 300.0, ...).

    Items are separated by commas; each is a duration string as `parse_duration` reads
    it ("250ms", "90s", "5m", "4h", "1d"; a unit is required). Every interval must be
    greater than zero (a zero wait would hammer the destination). The intervals need
    not be increasing, but usually are.

    Raises:
        ValueError: empty text, an empty item ("1m,,5m"), an unparsable or zero item;
            the message names the item and its position.
    """
    if not isinstance(text, str):
        raise ValueError(f"retry schedule must be a string such as {DEFAULT_SCHEDULE!r}, got {text!r}")
    items = text.split(",")
    if not text.strip():
        raise ValueError(f"retry schedule is empty; expected e.g. {DEFAULT_SCHEDULE!r}")
    out: list[float] = []
    for pos, raw in enumerate(items, start=1):
        item = raw.strip()
        if not item:
            raise ValueError(f"retry schedule {text!r}: item {pos} is empty")
        try:
            seconds = float(parse_duration(item))
        except ValueError:
            raise ValueError(
                f"retry schedule {text!r}: item {pos} {item!r} is not a duration such as \"90s\", \"5m\" or \"4h\""
            ) from None
        if seconds <= 0:
            raise ValueError(f"retry schedule {text!r}: item {pos} {item!r} must be greater than zero")
        out.append(seconds)
    return tuple(out)


class RetrySchedule:
    """`delivery.retry`: the waits after the 1st, 2nd, ... failed attempt, in seconds.

    Keeps the text the operator wrote, so `volley config check` prints it back as
    written and a worker decodes exactly what the supervisor read.
    """

    __slots__ = ("seconds", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.seconds = parse_schedule(text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetrySchedule) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"RetrySchedule({self.text!r})"
