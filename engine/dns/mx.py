"""The MX plan, as a pure function of DNS answers: where to deliver mail for a domain.

RFC 5321 §5.1 in short: look up MX; try hosts in preference order, shuffling equal
preferences to spread load; try each host's addresses in turn; with no MX RRs at all,
treat the domain itself as the only MX ("implicit MX"); if this relay is one of the
MX hosts, discard every record at its own preference or worse. RFC 7505 adds the null
MX ("0 .") by which a domain says it takes no mail.

Which outcomes bounce and which defer is promise P11 of the README: DNS *facts* (NXDOMAIN,
NODATA, null MX, a loop to ourselves) bounce; DNS *failures* (SERVFAIL, timeout) defer
with 4.4.3 and never fall back to A records, since a failed MX lookup says nothing
about whether MX records exist.

No I/O, no clock: randomness comes in as a `random.Random`. The answer types live here
(and are re-exported by `resolver.py`) so this module imports nothing but msgspec.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from engine.smtp.replies import Reply


class Status(enum.Enum):
    """What the DNS said. OK, NXDOMAIN and NODATA are facts; the others are failures."""

    OK = "ok"
    NXDOMAIN = "nxdomain"  # RFC 8020: the name does not exist
    NODATA = "nodata"  # RFC 2308 §2.2: the name exists, without records of this type
    SERVFAIL = "servfail"  # SERVFAIL, REFUSED, a malformed answer, an unreachable server
    TIMEOUT = "timeout"  # no answer within the configured lifetime

    @property
    def is_failure(self) -> bool:
        """True for outcomes that say nothing about the zone (defer, never bounce)."""
        return self is Status.SERVFAIL or self is Status.TIMEOUT


class MxRecord(msgspec.Struct, frozen=True):
    """One MX RR. `host` is lower-case without the trailing dot; "" is the root (null MX)."""

    preference: int
    host: str


class Answer(msgspec.Struct, frozen=True):
    """One lookup's outcome.

    `records` holds `MxRecord`s for an MX lookup and IP address strings for an address
    lookup; it is empty unless `status` is OK. `ttl` is the smallest TTL of the RRsets
    used (CNAME chain included) for OK; for NXDOMAIN/NODATA the negative TTL of RFC 2308
    §5, min(SOA TTL, SOA MINIMUM), or a default when the answer carried no SOA; 0 for
    failures.
    """

    status: Status
    records: tuple[Any, ...] = ()
    ttl: int = 0


class RouteHost(msgspec.Struct, frozen=True):
    """One mail exchanger with its addresses, in the order to try them."""

    name: str
    preference: int
    addresses: tuple[str, ...]


class Route(msgspec.Struct, frozen=True):
    """Where to deliver: `hosts` in the order to try them (usable hosts only).

    `site_key` is the sorted set of MX host names joined by ",", so domains served by
    one MX set (every domain hosted at one provider) share one connection pool
    (ARCHITECTURE rule 10). `address_key` is the sorted set of their addresses: where
    the certificate's name is not checked, domains whose differently named MX hosts
    are the same machines (a provider naming one MX per customer domain) share a pool
    by address, as Postfix's connection cache reuses sessions by server address.
    "" (smarthosts) keeps the name. `implicit` is True for the RFC 5321 §5.1 implicit MX.
    """

    domain: str
    hosts: tuple[RouteHost, ...]
    site_key: str
    implicit: bool = False
    address_key: str = ""


def norm_domain(domain: str) -> str:
    """A domain as the caches and the operator's tables key it: no surrounding space,
    no trailing dot, lower case."""
    return domain.strip().rstrip(".").lower()


def address_key(hosts: Sequence[RouteHost]) -> str:
    """`Route.address_key` of these hosts."""
    return "ip:" + ",".join(sorted({a for h in hosts for a in h.addresses}))


class RouteError(msgspec.Struct, frozen=True):
    """No route. `reply.code` says what to do: 5xx bounce now, 4xx defer and retry."""

    reply: Reply

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500


def null_mx_reply(domain: str) -> Reply:
    # RFC 7505 §4.1: "SMTP clients ... SHOULD NOT try ... and SHOULD return ... 556 5.1.10".
    return Reply(556, "5.1.10", f"Recipient address has null MX ({domain} accepts no mail, RFC 7505)")


def nxdomain_reply(domain: str) -> Reply:
    # RFC 3463 X.1.2: "Bad destination system address".
    return Reply(550, "5.1.2", f"Domain {domain} does not exist (DNS NXDOMAIN)")


def no_address_reply(domain: str) -> Reply:
    # RFC 5321 §5.1: no MX and no address records: the domain cannot receive mail.
    return Reply(550, "5.1.2", f"Domain {domain} has no MX and no address records")


def dns_failure_reply(domain: str, status: Status) -> Reply:
    # RFC 3463 X.4.3 "Directory server failure"; P11: a DNS failure never bounces.
    return Reply(451, "4.4.3", f"DNS lookup for {domain} failed ({status.value}), will retry")


def no_usable_mx_reply(domain: str) -> Reply:
    # RFC 3463 X.4.4 "Unable to route"; Postfix defers this case too.
    return Reply(451, "4.4.4", f"Unable to find a usable mail exchanger for {domain}")


def loop_reply(domain: str) -> Reply:
    # RFC 3463 X.4.6 "Routing loop detected"; Postfix: "mail for %s loops back to myself".
    return Reply(554, "5.4.6", f"Mail for {domain} loops back to myself (best MX is this host)")


def is_null_mx(records: Sequence[MxRecord]) -> bool:
    """RFC 7505 §3: a null MX is the *only* MX RR, preference 0, exchange "." (root).

    A "0 ." mixed with other MX RRs is a misconfiguration; RFC 7505 §3 says such a domain
    "MUST NOT" publish it, and we treat the other records as the real ones.
    """
    return len(records) == 1 and records[0].preference == 0 and records[0].host == ""


def order_mx(records: Iterable[MxRecord], rng: random.Random) -> list[list[MxRecord]]:
    """Group by preference, most preferred (lowest) first, shuffling each group.

    RFC 5321 §5.1: "If there are multiple destinations with the same preference and
    there is no clear reason to favor one ... the SMTP client SHOULD pick one at random
    to spread the load across multiple mail exchangers".
    """
    groups: dict[int, list[MxRecord]] = {}
    for record in records:
        groups.setdefault(record.preference, []).append(record)
    ordered = [groups[pref] for pref in sorted(groups)]
    for group in ordered:
        rng.shuffle(group)
    return ordered


def _usable_address(address: str) -> bool:
    """False for an address no mail exchanger can have: IPv4 0/8 ("this network"; a
    connect to 0.0.0.0 reaches this very host on Linux), multicast 224/4, reserved 240/4
    and broadcast; IPv6 "::" and multicast ff00::/8. Such an RR is a zone's mistake
    (or a parked domain's "0.0.0.0"), and connecting to it would at best fail and at
    worst loop back to ourselves past the loop check.

    Private (RFC 1918, ULA) and loopback addresses stay usable on purpose: internal
    relays, split-horizon DNS and a lab MX on loopback are legitimate, and mail to an
    address of this relay is caught by the loop check (an MX naming this host, or one of
    its listeners' addresses, bounces 5.4.6), as Postfix does. An operator who wants
    them refused lists them in a transport rule.

    Addresses arrive in dnspython's canonical text, so a string test suffices (this
    runs for every route built).
    """
    if ":" in address:
        return address != "::" and address[:2].lower() != "ff"
    first = address.partition(".")[0]
    return first.isdigit() and 0 < int(first) < 224


def _shuffled_addresses(addresses: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    """Shuffle within each family, IPv4 before IPv6 as the resolver gave them; addresses
    no host can have (`_usable_address`) are left out.

    A cached RRset would otherwise freeze one order, and every connection would go to
    the first address of a round-robin host.
    """
    addresses = [a for a in addresses if _usable_address(a)]
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    rng.shuffle(v4)
    rng.shuffle(v6)
    return (*v4, *v6)


def _is_local(name: str, answer: Answer | None, local: frozenset[str]) -> bool:
    if name in local:
        return True
    return answer is not None and answer.status is Status.OK and not local.isdisjoint(answer.records)


def build_route(
    domain: str,
    mx_answer: Answer,
    address_answers: dict[str, Answer],
    rng: random.Random,
    *,
    local: frozenset[str] = frozenset(),
) -> Route | RouteError:
    """Apply RFC 5321 §5.1, RFC 7505 and P11 to the answers of one domain.

    `address_answers` maps each MX host name (or, for an implicit MX, the domain itself)
    to its address lookup; an MX host without an entry was not looked up (see
    `hosts_to_resolve`) and is left out, a domain without one (implicit MX) defers. `local` holds this
    relay's own host names and IP addresses, for loop detection (empty: never a loop).
    Outcomes: SERVFAIL/TIMEOUT on MX → 4.4.3; NXDOMAIN → 550 5.1.2; null MX → 556 5.1.10;
    NODATA → implicit MX on the domain's A/AAAA (none there → 550 5.1.2); MX hosts
    without addresses are skipped, and if none is left → 4.4.3 when a lookup failed,
    else 4.4.4; this relay as the best MX → 554 5.4.6.
    """
    domain = domain.rstrip(".").lower()
    status = mx_answer.status
    if status.is_failure:
        # Never an A-record fallback here: the MX records may well exist (finding 10).
        return RouteError(dns_failure_reply(domain, status))
    if status is Status.NXDOMAIN:
        return RouteError(nxdomain_reply(domain))
    if status is Status.NODATA:
        return _implicit_route(domain, address_answers.get(domain), rng, local)

    records: list[MxRecord] = list(mx_answer.records)
    if is_null_mx(records):
        return RouteError(null_mx_reply(domain))
    records = _distinct_hosts(records)
    if not records:
        return RouteError(no_usable_mx_reply(domain))
    site_key = ",".join(sorted(r.host for r in records))

    if local:
        # RFC 5321 §5.1: if this host is an MX, "it MUST discard all MX records with
        # preference equal to or greater than its own".
        own = [r.preference for r in records if _is_local(r.host, address_answers.get(r.host), local)]
        if own:
            records = [r for r in records if r.preference < min(own)]
            if not records:
                return RouteError(loop_reply(domain))

    hosts, transient = _hosts_with_addresses(records, address_answers, rng)
    if not hosts:
        if transient:
            return RouteError(dns_failure_reply(domain, Status.SERVFAIL))
        return RouteError(no_usable_mx_reply(domain))
    return Route(domain, tuple(hosts), site_key, implicit=False, address_key=address_key(hosts))


def _distinct_hosts(records: list[MxRecord]) -> list[MxRecord]:
    """One record per named host (its best preference), by preference."""
    best: dict[str, MxRecord] = {}
    for r in sorted(records, key=lambda r: r.preference):
        # A root exchange among other records (or alone at a preference other than 0)
        # is not a null MX and names no host: ignore it.
        if r.host:
            best.setdefault(r.host, r)  # a host listed twice keeps its best preference
    return list(best.values())


def _hosts_with_addresses(
    records: list[MxRecord], address_answers: dict[str, Answer], rng: random.Random
) -> tuple[list[RouteHost], bool]:
    """The hosts to try, in order, each with its addresses; and whether a host was
    skipped only because its address lookup failed (so "no host" must defer)."""
    hosts: list[RouteHost] = []
    transient = False
    for group in order_mx(records, rng):
        for record in group:
            answer = address_answers.get(record.host)
            if answer is None:
                continue  # not looked up (beyond the host limit)
            if answer.status.is_failure:
                transient = True  # might have addresses; skip it this time only
            elif answer.status is Status.OK and answer.records:
                addrs = _shuffled_addresses(answer.records, rng)
                if addrs:
                    hosts.append(RouteHost(record.host, record.preference, addrs))
            # NXDOMAIN/NODATA (or only unusable addresses): an MX naming a host without
            # addresses; skip it.
    return hosts, transient


def _implicit_route(
    domain: str, answer: Answer | None, rng: random.Random, local: frozenset[str]
) -> Route | RouteError:
    """RFC 5321 §5.1: "If an empty list of MXs is returned, the address is treated as if
    it was associated with an implicit MX RR, with a preference of 0, pointing to that
    host." """
    if answer is None or answer.status.is_failure:
        return RouteError(dns_failure_reply(domain, answer.status if answer else Status.TIMEOUT))
    if answer.status is not Status.OK or not answer.records:
        return RouteError(no_address_reply(domain))
    if local and _is_local(domain, answer, local):
        return RouteError(loop_reply(domain))
    addrs = _shuffled_addresses(answer.records, rng)
    if not addrs:  # only addresses no host can have: defer, as for an MX without any
        return RouteError(no_usable_mx_reply(domain))
    host = RouteHost(domain, 0, addrs)
    return Route(domain, (host,), domain, implicit=True, address_key=address_key((host,)))


def hosts_to_resolve(domain: str, mx_answer: Answer, limit: int | None = None) -> list[str]:
    """The names whose addresses `build_route` needs for this MX answer: the domain for
    an implicit MX; no name when the MX answer alone decides (failure, NXDOMAIN, null
    MX); else the MX hosts, at most `limit` of them, most preferred first (so a huge MX
    RRset cannot fan out into hundreds of queries)."""
    domain = domain.rstrip(".").lower()
    if mx_answer.status is Status.NODATA:
        return [domain]
    if mx_answer.status is not Status.OK or is_null_mx(mx_answer.records):
        return []
    names: dict[str, None] = {}
    for r in sorted(mx_answer.records, key=lambda r: (r.preference, r.host)):
        if r.host:
            names.setdefault(r.host, None)
    return list(names)[:limit]
