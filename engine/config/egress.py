"""The `[[egress]]`, `[[egress_rules]]` and `[[warmup]]` entries: which source address
and EHLO name outbound connections use, who picks the pool, and the IP warm-up
schedules (engine/delivery/egress.py and warmup.py apply them).

Kept apart from tree.py, which imports them into `Config`. One entry's problems raise
ValueError("key: problem") from `__post_init__` (the loader adds "egress[2]."); what
spans entries or sections (a pool nobody fills, a warm-up of an unknown source) is
`check_egress`, called by `Config`.

A warm-up schedule is a list of lines, each "day N: M/h" (from day N on, at most M
messages an hour to each provider), "day N-K: M/h" (days N to K; after K, when it is the
last line, the source counts as warmed) or "day N: unlimited". The first line is day 1;
a "day N" line holds until the next line's day, a "day N-K" line is followed by day K+1.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import re
from collections.abc import Sequence

import msgspec


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


DEFAULT_POOL = "default"
OTHER_PROVIDERS = "*"  # in warmup.providers: mail that no [[shaping]] entry matches
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PATTERN = re.compile(r"[A-Za-z0-9._*-]{1,64}")
_LINE = re.compile(r"\s*day\s+(\d+)\s*(?:-\s*(\d+)\s*)?:\s*(?:(\d+)\s*/\s*(?:h|hour)|(unlimited))\s*",
                   re.I)


class Step(msgspec.Struct, frozen=True):
    """One schedule line: days `first`..`last` (0 = open-ended) at `per_hour` (0 = no cap)."""

    first: int
    last: int
    per_hour: int


def parse_schedule(lines: Sequence[str]) -> tuple[Step, ...]:
    """The steps of a warm-up schedule, in order.

    Raises ValueError naming the line and what is wrong with it.
    """
    steps: list[Step] = []
    expected = 1
    for n, text in enumerate(lines, 1):
        m = _LINE.fullmatch(text)
        if m is None:
            raise ValueError(f'line {n} "{text}": expected "day N: M/h", "day N-K: M/h" '
                             f'or "day N: unlimited"')
        first, last = int(m.group(1)), int(m.group(2) or 0)
        per_hour = int(m.group(3) or 0)
        open_before = bool(steps) and steps[-1].last == 0
        if (first < expected) if open_before else (first != expected):
            raise ValueError(f'line {n} "{text}": expected day {expected}'
                             + (" or later" if open_before else "")
                             + " (the first line is day 1; a line starts after the one before)")
        if m.group(2) is not None and last < first:
            raise ValueError(f'line {n} "{text}": day {last} comes before day {first}')
        if m.group(3) is not None and per_hour < 1:
            raise ValueError(f'line {n} "{text}": at least 1 message an hour '
                             f'(leave the source out of the pool to send none)')
        if steps and steps[-1].last == 0:
            # The previous line was open-ended ("day N: ..."): it ends where this begins.
            prev = steps[-1]
            steps[-1] = Step(prev.first, first - 1, prev.per_hour)
        steps.append(Step(first, last, per_hour))
        expected = (last or first) + 1
    if not steps:
        raise ValueError("give at least one line, such as \"day 1: 50/h\"")
    return tuple(steps)


def allowance(steps: Sequence[Step], day: int) -> int | None:
    """Messages an hour allowed on `day` (1 = the first day): None = no cap (warmed, or
    an "unlimited" line), 0 = not yet (a start in the future)."""
    if day < 1:
        return 0
    for step in steps:
        if step.first <= day and (step.last == 0 or day <= step.last):
            return step.per_hour or None
    return None  # past the last line's range: warmed


class EgressConfig(_Frozen, frozen=True):
    name: str  # shown by the tools; [[warmup]] names it
    source_address: str  # an address of this host that outbound connections bind to
    ehlo_name: str = ""  # "" = delivery.helo_name (or server.hostname)
    pool: str = DEFAULT_POOL
    weight: int = 1  # share of the pool's new jobs (weighted round robin)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f'name: expected letters, digits, "_", "." or "-", got "{self.name}"')
        try:
            ipaddress.ip_address(self.source_address)
        except ValueError:
            raise ValueError(
                f'source_address: expected an IPv4 or IPv6 address, got "{self.source_address}"') from None
        if self.ehlo_name and not _HOSTNAME.fullmatch(self.ehlo_name):
            raise ValueError(f'ehlo_name: expected a host name such as "mta1.example.com", '
                             f'got "{self.ehlo_name}"')
        if not _NAME.fullmatch(self.pool):
            raise ValueError(f'pool: expected letters, digits, "_", "." or "-", got "{self.pool}"')
        if self.weight < 1:
            raise ValueError(f"weight: must be at least 1, got {self.weight}")


class EgressRuleConfig(_Frozen, frozen=True):
    pool: str
    # Patterns ("acme", "spring*", "*"); a rule matches a message when every one given
    # matches. The first matching rule, in file order, names the pool.
    tenant: str = ""
    campaign: str = ""

    def __post_init__(self) -> None:
        if not self.tenant and not self.campaign:
            raise ValueError("tenant: give tenant, campaign or both")
        for key in ("tenant", "campaign"):
            value = getattr(self, key)
            if value and not _PATTERN.fullmatch(value):
                raise ValueError(f'{key}: expected a name or a pattern with "*", got "{value}"')

    def matches(self, tenant: str, campaign: str) -> bool:
        return ((not self.tenant or fnmatch.fnmatchcase(tenant, self.tenant))
                and (not self.campaign or fnmatch.fnmatchcase(campaign, self.campaign)))


class WarmupConfig(_Frozen, frozen=True):
    source: str | list[str]  # [[egress]] name(s), each with its own day counter
    schedule: list[str]
    # "YYYY-MM-DD" (UTC) is day 1; "" = the day the source first sends (kept in the queue).
    start: str = ""
    # [[shaping]] names the schedule holds for ("*": mail that no entry matches);
    # empty = every provider. Each provider has its own hourly allowance.
    providers: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("source: name at least one [[egress]] entry")
        try:
            parse_schedule(self.schedule)
        except ValueError as err:
            raise ValueError(f"schedule: {err}") from None
        if self.start:
            try:
                datetime.date.fromisoformat(self.start)
            except ValueError:
                raise ValueError(f'start: expected a date such as "2025-01-31", got "{self.start}"') from None

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def steps(self) -> tuple[Step, ...]:
        return parse_schedule(self.schedule)

    @property
    def start_date(self) -> datetime.date | None:
        return datetime.date.fromisoformat(self.start) if self.start else None


def check_egress(egress: Sequence[EgressConfig], rules: Sequence[EgressRuleConfig],
                 warmup: Sequence[WarmupConfig], route_pools: Sequence[str],
                 providers: Sequence[str]) -> None:
    """Across entries and sections. `route_pools`: each [[routes]] entry's egress_pool
    ("" = none); `providers`: the [[shaping]] entries' names.

    Raises ValueError("section[i].key: problem").
    """
    names: dict[str, int] = {}
    pools: dict[str, set[str]] = {}
    for i, entry in enumerate(egress):
        if entry.name in names:
            raise ValueError(f'egress[{i}].name: "{entry.name}" is also egress[{names[entry.name]}]\'s name')
        names[entry.name] = i
        addresses = pools.setdefault(entry.pool, set())
        if entry.source_address in addresses:
            raise ValueError(f'egress[{i}].source_address: {entry.source_address} is already in '
                             f'pool "{entry.pool}"')
        addresses.add(entry.source_address)

    def known(pool: str, where: str) -> None:
        if pool and pool != DEFAULT_POOL and pool not in pools:
            raise ValueError(f'{where}: no [[egress]] entry is in pool "{pool}"')

    for i, pool in enumerate(route_pools):
        known(pool, f"routes[{i}].egress_pool")
    for i, rule in enumerate(rules):
        known(rule.pool, f"egress_rules[{i}].pool")
    scheduled: dict[str, int] = {}
    for i, plan in enumerate(warmup):
        for name in plan.sources:
            if name not in names:
                raise ValueError(f'warmup[{i}].source: no [[egress]] entry is named "{name}"')
            address = egress[names[name]].source_address
            if address in scheduled:
                raise ValueError(f"warmup[{i}].source: {address} ({name}) already has a schedule "
                                 f"in warmup[{scheduled[address]}]")
            scheduled[address] = i
        for provider in plan.providers:
            if provider != OTHER_PROVIDERS and provider not in providers:
                raise ValueError(f'warmup[{i}].providers: no [[shaping]] entry is named "{provider}" '
                                 f'("*" stands for mail no entry matches)')
