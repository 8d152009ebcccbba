"""`volley ctl shaping DOMAIN`, as the supervisor runs it: the [[shaping]] entry that
applies to the domain and why, its effective settings, and the provider's live
figures from the server-wide table (engine/delivery/shared_limits.py, mapped
read-only here).

The match may need the domain's MX hosts (an `mx_suffix` entry): the workers' MX
caches are asked first (`ask_mx`) (`MxQuery`, what delivery uses now); when it holds nothing, the
supervisor asks DNS itself ([dns] nameservers). A [[routes]] smarthost stands for the
MX hosts, as in delivery. No domain entry and no mx_suffix entry: no lookup at all.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from engine.config import Config, format_duration, split_host_port
from engine.control import protocol, replies, wire
from engine.control.message_view import domain_key
from engine.control.supervisor_api import SupervisorHandle
from engine.delivery.job import PoolSettings
from engine.delivery.routing import match_route, pool_settings
from engine.delivery.shaping import match, most_preferred, shaped
from engine.delivery.shared_limits import LimitTable, gcra, table_path
from engine.dns.mx import RouteHost, Status
from engine.dns.resolver import Resolver
from engine.queue.layout import stable_shard

WORKER_ANSWER = 5.0  # seconds to wait for a worker's MX cache


async def ask_mx(sup: SupervisorHandle, domain: str) -> wire.AnyAnswer:
    """What the workers' MX caches hold for `domain`. Every worker delivers a share of
    a domain's mail (queue layout format 4, layout.owner_of) and keeps its own cache,
    so all are asked: the first answer with a cached entry, the domain's home worker
    (`stable_shard`) first; else the home worker's answer."""
    slots = sup.slots
    home = stable_shard(domain, len(slots))
    order = [slots[home], *(s for i, s in enumerate(slots) if i != home)]
    answers = await asyncio.gather(*[s.ask(wire.MxQuery(domain=domain), WORKER_ANSWER) for s in order])
    for answer in answers:
        if isinstance(answer, wire.MxEntries) and any(e.kind != "none" for e in answer.entries):
            return answer
    return answers[0]


async def shaping(sup: SupervisorHandle, req: protocol.Shaping) -> replies.Shaping:
    cfg = sup.cfg
    domain = domain_key(req.domain)
    if not domain:
        raise protocol.RequestError("shaping: give a domain")
    route_cfg = match_route(cfg.routes, domain)
    rule, why = match(cfg.shaping, domain, None)
    hosts: list[str] = []
    source = "none"
    if (rule is None or not rule.domain) and any(r.mx_suffix for r in cfg.shaping):
        if route_cfg is not None and route_cfg.host:
            hosts, source = [split_host_port(route_cfg.host)[0].lower()], "smarthost"
        else:
            hosts, source = await _mx_hosts(sup, cfg, domain)
        rule, why = match(cfg.shaping, domain, hosts)
    elif rule is None:
        why = "no rule: delivery defaults"
    if route_cfg is not None:
        # Only the limits are shown: the password file stays unread.
        route_cfg = msgspec.structs.replace(route_cfg, auth_password_file="")
    effective = shaped(pool_settings(cfg, route_cfg), rule)
    live = await asyncio.to_thread(_live, cfg, rule.label, effective) if rule else None
    given = [k for k in _RULE_KEYS if rule is not None and getattr(rule, k) is not None]
    return replies.Shaping(domain=domain, rule=rule.label if rule else "", why=why,
                           mx_hosts=hosts, mx_source=source,
                           settings=_settings(effective, rule.rate if rule else None,
                                              rule.connect_rate if rule else None),
                           set_by_rule=given, live=live)


_RULE_KEYS = ("max_connections", "max_messages_per_connection", "max_recipients_per_message",
              "rate", "connect_rate", "idle_timeout", "tls")


async def _mx_hosts(sup: SupervisorHandle, cfg: Config, domain: str) -> tuple[list[str], str]:
    """The domain's most-preferred MX hosts and where they came from."""
    if sup.slots:
        answer = await ask_mx(sup, domain)
        if isinstance(answer, wire.MxEntries) and answer.entries:
            entry = answer.entries[0]
            if entry.kind == "route":
                return most_preferred([RouteHost(h.name, h.preference, tuple(h.addresses))
                                       for h in entry.hosts]), "cache"
            if entry.kind == "error":
                return [], "cache"
    resolver = Resolver(list(cfg.dns.nameservers), float(cfg.dns.timeout))
    mx = await resolver.mx(domain)
    if mx.status is Status.OK:
        records = [r for r in mx.records if r.host]  # a null MX (RFC 7505) has none
        best = min((r.preference for r in records), default=0)
        return [r.host for r in records if r.preference == best], "dns"
    if mx.status in (Status.NXDOMAIN, Status.NODATA):
        return [domain], "dns"  # RFC 5321 §5.1: the implicit MX is the domain itself
    raise protocol.RequestError(f"shaping: MX lookup of {domain} failed ({mx.status.value})")


def _settings(s: PoolSettings, rate: str | None, connect_rate: str | None) -> dict[str, object]:
    return {
        "max_connections": s.max_connections,
        "max_connections_server_wide": s.provider_connections or None,
        "max_messages_per_connection": s.max_messages_per_connection,
        "max_recipients_per_message": s.max_recipients or None,
        "rate": rate, "connect_rate": connect_rate,
        "idle_timeout": format_duration(s.idle_timeout),
        "tls": s.tls,
    }


def _live(cfg: Config, name: str, s: PoolSettings) -> replies.ShapingLive | None:
    table = LimitTable.open_readonly(table_path(cfg.queue.path))
    if table is None:
        return None
    try:
        slot = table.slot_of(name, create=False)
        if slot is None:
            return None
        view = table.view(slot)
    finally:
        table.close()
    now = time.monotonic()  # CLOCK_MONOTONIC, the workers' clock too
    return replies.ShapingLive(
        connections=view.total, by_worker={str(k): v for k, v in view.columns.items()},
        next_message_in=round(gcra(view.tat, now, s.provider_rate)[0], 3) if s.provider_rate else 0.0,
        next_connection_in=(round(gcra(view.ctat, now, s.provider_connect_rate)[0], 3)
                            if s.provider_connect_rate else 0.0))
