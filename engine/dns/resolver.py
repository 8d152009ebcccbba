"""A thin async wrapper over dnspython that turns every DNS outcome into a value.

Delivery must tell DNS *facts* from DNS *failures* (the README's promise P11):
NXDOMAIN and NODATA are answers a zone gave us and may bounce mail; SERVFAIL and a
timeout say nothing about the zone and must only defer it. dnspython reports these as
a mix of return values and exceptions; this module folds them into one `Answer` with a
`Status`, so no caller catches DNS exceptions and none can mistake a failure for a fact.

No caching here (that is `cache.py`) and no SMTP meaning (that is `mx.py`).
"""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset

from engine.config import parse_nameserver

# The answer types are defined with the pure MX logic (engine/dns/mx.py imports no I/O)
# and re-exported here, where they are produced.
from engine.dns.mx import Answer, MxRecord, Status

__all__ = ["Answer", "MxRecord", "Resolver", "Status"]

# Used for a negative answer that carries no SOA, so RFC 2308 §5 gives no TTL. dnspython
# uses 300 s for the same case (dns.message.NEGATIVE_TTL_WITHOUT_SOA); the cache's
# floor and ceiling still apply.
DEFAULT_NEGATIVE_TTL = 300


def _dns_name(name: str) -> dns.name.Name | None:
    """An absolute name, or None if the text can never be a DNS name (bad label, IDNA)."""
    try:
        return dns.name.from_text(name.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308 §5: a negative answer lives for min(SOA TTL, SOA MINIMUM).

    dnspython's chaining result computes exactly that (and also the CNAME TTLs that led
    to the negative answer), falling back to its own default without an SOA.
    """
    if not isinstance(response, dns.message.QueryMessage):  # None: no response kept
        return DEFAULT_NEGATIVE_TTL
    try:
        return int(response.resolve_chaining().minimum_ttl)
    except dns.exception.DNSException:
        return DEFAULT_NEGATIVE_TTL


class Resolver:
    """Async MX and address lookups against configured nameservers (or resolv.conf).

    `timeout` is the whole budget of one `mx()` call and of one `addresses()` call
    (dnspython's `lifetime`), retries and TCP fallback included. Nothing is cached.
    """

    def __init__(self, nameservers: list[str], timeout: float) -> None:
        """Raises ValueError for a malformed nameserver entry; with no nameservers,
        dnspython reads /etc/resolv.conf (dns.resolver.NoResolverConfiguration if none).
        """
        if timeout <= 0:
            raise ValueError("timeout: must be positive")
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in map(parse_nameserver, nameservers)
            ]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.cache = None  # cache.py owns caching, with its own floors and bounds
        resolver.lifetime = timeout
        # Per-attempt timeout (dnspython's default is 2 s): below the lifetime so a lost
        # UDP datagram is retried, or the next nameserver tried, inside the same budget.
        resolver.timeout = min(2.0, timeout / 2)
        resolver.use_search_by_default = False  # mail domains are absolute names
        self._resolver = resolver
        self.timeout = timeout

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[Status, dns.rrset.RRset | None, int]:
        """One query → (status, dnspython answer RRset or None, ttl). Never raises for
        DNS outcomes; unexpected programming errors propagate."""
        qname = _dns_name(name)
        if qname is None:
            # A name that cannot be encoded can never exist: report it as the fact it is.
            return Status.NXDOMAIN, None, DEFAULT_NEGATIVE_TTL
        try:
            # dnspython checks its lifetime between attempts and can overrun it by a
            # retry backoff; the asyncio deadline makes `timeout` a hard bound (rule 8).
            async with asyncio.timeout(self.timeout):
                answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except TimeoutError:
            return Status.TIMEOUT, None, 0
        except dns.resolver.NXDOMAIN as exc:
            # What NXDOMAIN.responses() returns (dnspython leaves that method untyped).
            responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs["responses"]
            return Status.NXDOMAIN, None, _negative_ttl(next(iter(responses.values()), None))
        except dns.exception.Timeout:  # LifetimeTimeout: the whole budget is spent
            return Status.TIMEOUT, None, 0
        except (dns.exception.DNSException, OSError):
            # NoNameservers (every server answered SERVFAIL/REFUSED or was unusable),
            # YXDOMAIN, a CNAME chain too long, malformed answers: none of these is a fact
            # about the zone, so all of them must defer (P11).
            return Status.SERVFAIL, None, 0
        if answer.rrset is None:
            return Status.NODATA, None, int(answer.chaining_result.minimum_ttl)
        return Status.OK, answer.rrset, int(answer.chaining_result.minimum_ttl)

    async def mx(self, domain: str) -> Answer:
        """The MX RRset of `domain` (CNAMEs followed), records in the order received."""
        status, rrset, ttl = await self._query(domain, dns.rdatatype.MX)
        if rrset is None:  # every status but OK
            return Answer(status, (), ttl)
        records = tuple(
            MxRecord(
                int(rd.preference),
                "" if rd.exchange == dns.name.root else rd.exchange.to_text(omit_final_dot=True).lower(),
            )
            for rd in rrset
        )
        return Answer(Status.OK, records, ttl)

    async def addresses(self, host: str) -> Answer:
        """A and AAAA of `host`, queried concurrently; IPv4 addresses first.

        OK if either type has records (a failure of the other is then ignored: the host
        is usable by what we have). Otherwise a failure of either wins (SERVFAIL before
        TIMEOUT), since a failed half might have held addresses; else NXDOMAIN if either
        half said so; else NODATA. The TTL is the smallest of the two halves' TTLs that
        carry one (a later AAAA must not be hidden longer than its negative TTL).
        """
        (s4, r4, t4), (s6, r6, t6) = await asyncio.gather(
            self._query(host, dns.rdatatype.A), self._query(host, dns.rdatatype.AAAA)
        )
        addrs = tuple(rd.address for rd in (r4 or ())) + tuple(rd.address for rd in (r6 or ()))
        facts = [t for s, t in ((s4, t4), (s6, t6)) if not s.is_failure]
        if addrs:
            return Answer(Status.OK, addrs, min(facts))
        for failed in (Status.SERVFAIL, Status.TIMEOUT):
            if failed in (s4, s6):
                return Answer(failed, (), 0)
        if Status.NXDOMAIN in (s4, s6):
            return Answer(Status.NXDOMAIN, (), min(facts))
        return Answer(Status.NODATA, (), min(facts))

    async def txt(self, name: str) -> Answer:
        """The TXT records of `name` (CNAMEs followed; the `_mta-sts` record, RFC 8461
        §3.1): one text per record, its character-strings concatenated (RFC 7208 §3.3
        and RFC 8461 §3.1 read them so), bytes that are not UTF-8 replaced."""
        status, rrset, ttl = await self._query(name, dns.rdatatype.TXT)
        if rrset is None:
            return Answer(status, (), ttl)
        return Answer(Status.OK, tuple(b"".join(rd.strings).decode("utf-8", "replace") for rd in rrset), ttl)
