"""Where a domain's mail goes and with which limits: [[routes]] matching, smarthost
routes, pool settings (and an operator's throttle on them), and MX-to-self detection.
Pure except `smarthost_route`, which resolves a smarthost's name."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import msgspec

from engine.config import Config, RouteConfig, split_host_port
from engine.delivery.holds import Holds, Throttle
from engine.delivery.job import PoolSettings
from engine.dns.mx import Route, RouteError, RouteHost, Status, address_key
from engine.dns.resolver import Resolver
from engine.smtp.replies import Reply


def match_route(routes: list[RouteConfig], domain: str) -> RouteConfig | None:
    """Exact domain first, then the longest "*.suffix", then "*"."""
    domain = domain.lower().rstrip(".")
    best: RouteConfig | None = None
    best_len = -1
    for route in routes:
        pattern = route.domain.lower().rstrip(".")
        if pattern == domain:
            return route
        if pattern.startswith("*.") and domain.endswith(pattern[1:]) and len(pattern) > best_len:
            best, best_len = route, len(pattern)
        elif pattern == "*" and best_len < 0:
            best, best_len = route, 0
    return best


def pool_settings(cfg: Config, route: RouteConfig | None) -> PoolSettings:
    d = cfg.delivery
    password = ""
    if route is not None and route.auth_password_file:
        password = Path(route.auth_password_file).read_text(encoding="utf-8").strip()
    port = d.port
    if route is not None and route.host:
        port = split_host_port(route.host)[1]
    return PoolSettings(
        max_connections=(route.max_connections if route and route.max_connections
                         else d.max_connections_per_domain),
        max_messages_per_connection=(
            route.max_messages_per_connection if route and route.max_messages_per_connection
            else d.max_messages_per_connection
        ),
        idle_timeout=float(d.idle_timeout),
        max_connection_age=float(d.max_connection_age),
        port=port,
        tls=(route.tls if route and route.tls else
             ("required" if route and route.auth_user else d.tls)),
        tls_verify=route.tls_verify if route and route.tls_verify is not None else d.tls_verify,
        auth_user=route.auth_user if route else "",
        auth_password=password,
        helo_name=d.helo_name or cfg.server.hostname,
        source_address=d.source_address,
        backoff=float(d.backoff),
        backoff_max=float(d.backoff_max),
        egress_pool=route.egress_pool if route is not None else "",
    )


def throttled(settings: PoolSettings, throttle: Throttle) -> PoolSettings:
    """`settings` with an operator's throttle applied: a pool of the domain's own (so
    the limit is that domain's alone, not its MX site's), at most `max_connections`
    sessions and `rate` messages per second."""
    return msgspec.structs.replace(
        settings,
        max_connections=throttle.max_connections or settings.max_connections,
        rate=throttle.rate or 0.0,
        only_domain=throttle.domain,
    )


def worker_share(holds: Holds, workers: int) -> Holds:
    """The hold table as one of `workers` workers applies it: each throttle's rate
    split evenly. Every worker delivers a share of a domain's mail (queue layout
    format 4) through a pool of its own, so each takes its part of the rate, as it
    takes its part of delivery.max_connections; the connection cap is shared exactly
    instead (site_slots.py). The operator's figure is what `volley ctl` shows."""
    if workers <= 1 or not any(t.rate for t in holds.throttles.values()):
        return holds
    return msgspec.structs.replace(holds, throttles={
        d: msgspec.structs.replace(t, rate=t.rate / workers) if t.rate else t
        for d, t in holds.throttles.items()})


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def smarthost_route(domain: str, route: RouteConfig, resolver: Resolver) -> Route | RouteError:
    """A Route with the smarthost as its only host (the MX lookup is bypassed)."""
    host, _port = split_host_port(route.host)
    if _is_ip(host):
        addresses: tuple[str, ...] = (host,)
    else:
        answer = await resolver.addresses(host)
        if answer.status is not Status.OK or not answer.records:
            # A smarthost we cannot resolve is our configuration's problem: defer.
            return RouteError(Reply(451, "4.4.3", f"cannot resolve smarthost {host} for {domain}"))
        addresses = tuple(str(a) for a in answer.records)
    return Route(domain, (RouteHost(host, 0, addresses),), site_key=f"smarthost:{route.host}",
                 implicit=False)


def drop_self(route: Route, port: int, local: set[tuple[str, int]]) -> Route | RouteError:
    """RFC 5321 §5.1: never deliver to ourselves. If our own listener is among the most
    preferred hosts the mail loops (5.4.6, as Postfix and qmail bounce); our addresses
    at a lower preference are dropped (4.4.4 if nothing is left)."""
    if not local:
        return route
    if not any((a, port) in local for h in route.hosts for a in h.addresses):
        return route  # the usual case: nothing of ours among them, the same route
    best = min((h.preference for h in route.hosts), default=0)
    kept = []
    for h in route.hosts:
        mine = [a for a in h.addresses if (a, port) in local]
        if mine and h.preference == best:
            return RouteError(Reply(554, "5.4.6", f"mail for {route.domain} loops back to myself"))
        others = tuple(a for a in h.addresses if (a, port) not in local)
        if others:
            kept.append(RouteHost(h.name, h.preference, others))
    if not kept:
        return RouteError(Reply(451, "4.4.4", f"no usable mail exchanger for {route.domain}"))
    return Route(route.domain, tuple(kept), site_key=route.site_key, implicit=route.implicit,
                 address_key=address_key(kept) if route.address_key else "")
