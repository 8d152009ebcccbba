"""Which `[[shaping]]` entry applies to a destination, and what it does to the pool
settings. Pure: no I/O, no clock.

Precedence, most specific first:
1. a `domain` equal to the recipient domain;
2. the longest `domain = "*.suffix"` the domain ends with (subdomains only, as for
   [[routes]]);
3. the longest `mx_suffix` that every most-preferred MX host of the domain ends with
   (the hosts of the lowest preference: a backup MX elsewhere does not change who
   receives the mail). For a smarthost route the "MX hosts" are the smarthost.
No match: the delivery and route defaults, no server-wide cap.

`shaped` applies an entry: each setting it gives replaces the delivery / [[routes]]
value (where the mail goes, its port, AUTH and certificate checks stay the route's);
its name, server-wide connection cap and rates ride along in `PoolSettings.provider*`
for the shared table (shared_limits.py). A route with AUTH keeps TLS required.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from engine.config import ShapingConfig
from engine.delivery.job import PoolSettings
from engine.dns.mx import RouteHost


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def most_preferred(hosts: Sequence[RouteHost]) -> list[str]:
    """The names of the hosts of the lowest preference, in the order given."""
    if not hosts:
        return []
    best = min(h.preference for h in hosts)
    return [_norm(h.name) for h in hosts if h.preference == best]


def match(rules: Sequence[ShapingConfig], domain: str,
          mx_hosts: Sequence[str] | None) -> tuple[ShapingConfig | None, str]:
    """The entry that applies to `domain` and why (one line for `volley ctl shaping`).

    `mx_hosts`: the most-preferred MX host names (`most_preferred`); None when they
    are not known (then only `domain` entries can match).
    """
    domain = _norm(domain)
    wild: tuple[int, ShapingConfig] | None = None
    by_mx: tuple[int, ShapingConfig, str] | None = None
    hosts = [_norm(h) for h in mx_hosts or ()]
    for rule in rules:
        if rule.domain:
            pattern = _norm(rule.domain)
            if pattern == domain:
                return rule, f'domain "{rule.domain}" matches {domain} exactly'
            if (pattern.startswith("*.") and domain.endswith(pattern[1:])
                    and (wild is None or len(pattern) > wild[0])):
                wild = (len(pattern), rule)
        elif hosts:
            suffix = _norm(rule.mx_suffix)
            dotted = suffix if suffix.startswith(".") else "." + suffix
            bare = dotted[1:]
            if (all(h.endswith(dotted) or h == bare for h in hosts)
                    and (by_mx is None or len(dotted) > by_mx[0])):
                by_mx = (len(dotted), rule, hosts[0])
    if wild is not None:
        return wild[1], f'domain "{wild[1].domain}" matches {domain}'
    if by_mx is not None:
        _n, rule, host = by_mx
        return rule, f'mx_suffix "{rule.mx_suffix}" matches MX host {host}'
    if mx_hosts is None:
        return None, "no rule: delivery defaults (MX hosts not known, domain patterns only)"
    return None, "no rule: delivery defaults"


def shaped(settings: PoolSettings, rule: ShapingConfig | None) -> PoolSettings:
    """`settings` (from [delivery] and [[routes]]) with `rule`'s settings over them."""
    if rule is None:
        return settings
    tls = rule.tls or settings.tls
    if settings.auth_user:
        tls = "required"  # credentials never travel in the clear
    per_pool = rule.max_connections or settings.max_connections
    return msgspec.structs.replace(
        settings,
        max_connections=per_pool,
        max_messages_per_connection=(rule.max_messages_per_connection
                                     or settings.max_messages_per_connection),
        idle_timeout=(float(rule.idle_timeout) if rule.idle_timeout is not None
                      else settings.idle_timeout),
        tls=tls,
        max_recipients=rule.max_recipients_per_message or settings.max_recipients,
        provider=rule.label,
        provider_connections=rule.max_connections or 0,
        provider_rate=rule.per_second,
        provider_connect_rate=rule.connects_per_second,
    )
