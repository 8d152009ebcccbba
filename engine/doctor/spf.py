"""A small SPF evaluator (RFC 7208 §4, §5): check_host() over an `Answers` table.

Pure: every DNS answer comes from the table, and one that is not there yet raises
`Missing` (the fetcher looks it up and the evaluation starts again). The lookups of
include, a, mx, ptr, exists and redirect= are counted against the limit of 10, void
lookups (NXDOMAIN or no records) against the limit of 2 (§4.6.4); passing either is a
permerror, as at the receiver.

`walk` is the other half of the doctor's SPF check: it visits every term of the record
tree, as an address that matches nothing would make a receiver do (every include and
the redirect followed, "all" not stopping it), so a record that only stays within the
limit because the doctor's own address matched early is still reported.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from engine.doctor.answers import Answer, Answers, txt_with_prefix
from engine.doctor.spf_terms import LOOKUP_TERMS, MacroContext, SpfSyntax, Term, expand, parse_record, valid_domain

MAX_LOOKUPS = 10
MAX_VOID = 2
MAX_MX_ADDRESSES = 10  # §4.6.4: "mx" looks up at most 10 exchanges' addresses
MAX_PTR_NAMES = 10
WALK_CAP = 60  # the walk stops counting here: a loop of includes is over the limit anyway


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of check_host() for one address."""

    result: str  # pass, fail, softfail, neutral, none, permerror, temperror
    reason: str
    lookups: int
    void_lookups: int


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


def spf_records(answers: Answers, domain: str) -> tuple[Answer, list[str]]:
    """The TXT answer of `domain` and its "v=spf1" records (§4.5)."""
    answer = answers.get(domain, "TXT")
    return answer, txt_with_prefix(answer.records, "v=spf1")


class _Evaluation:
    def __init__(self, answers: Answers, ip: str | None, sender: str, helo: str, walk: bool = False) -> None:
        self.answers = answers
        self.ip = ipaddress.ip_address(ip) if ip else None
        self.ctx = MacroContext(ip or "192.0.2.0", sender, helo)
        self.walk = walk
        self.lookups = 0
        self.voids = 0

    def count(self, term: Term, domain: str) -> None:
        self.lookups += 1
        if self.walk:
            if self.lookups > WALK_CAP:
                raise _PermError(f"more than {WALK_CAP} DNS lookups (an include loop?)")
        elif self.lookups > MAX_LOOKUPS:
            raise _PermError(f"more than {MAX_LOOKUPS} DNS lookups (RFC 7208 §4.6.4), "
                             f"the 11th at {term.text} in {domain}")

    def void(self, term: Term, domain: str) -> None:
        self.voids += 1
        if self.voids > MAX_VOID:
            raise _PermError(f"more than {MAX_VOID} void lookups (RFC 7208 §4.6.4), "
                             f"the 3rd at {term.text} in {domain}")

    def lookup(self, name: str, rdtype: str) -> Answer:
        answer = self.answers.get(name, rdtype)
        if answer.status.is_failure:
            raise _TempError(f"{name} {rdtype}: DNS {answer.status.value}")
        return answer

    def target(self, term: Term, domain: str) -> str:
        if not term.value:
            return domain
        name = expand(term.value, MacroContext(self.ctx.ip, self.ctx.sender, self.ctx.helo, domain))
        if not valid_domain(name):
            raise _PermError(f"{term.text} in {domain}: {name!r} is not a domain name")
        return name

    def check_host(self, domain: str) -> tuple[str, str]:
        """(result, reason) for `domain` (§4); _TempError/_PermError for the errors."""
        if not valid_domain(domain):
            return "none", f"{domain!r} is not a domain name (RFC 7208 §4.3)"
        answer = self.lookup(domain, "TXT")
        found = txt_with_prefix(answer.records, "v=spf1")
        if not found:
            return "none", f"no SPF record at {domain}"
        if len(found) > 1:
            raise _PermError(f"{len(found)} SPF records at {domain}; there must be exactly one (RFC 7208 §4.5)")
        try:
            terms = parse_record(found[0])
        except SpfSyntax as err:
            raise _PermError(f"{domain}: {err}") from None
        self._hint(terms, domain)
        has_all = False
        for term in terms:
            if not term.is_mechanism:
                continue
            has_all = has_all or term.name == "all"
            if self.matches(term, domain) and not self.walk:
                return term.result, f"matched {term.text} in {domain}"
        redirect = next((t for t in terms if t.name == "redirect" and not t.is_mechanism), None)
        if redirect is not None and not (self.walk and has_all):
            self.count(redirect, domain)
            target = self.target(redirect, domain)
            result, reason = self.check_host(target)
            if result == "none":
                raise _PermError(f"redirect={target} in {domain}: {reason} (RFC 7208 §6.1)")
            return result, reason
        return "neutral", f"no mechanism matched in {domain}: neutral (RFC 7208 §4.7)"

    def _hint(self, terms: list[Term], domain: str) -> None:
        """Ask for the next round's lookups all at once."""
        for term in terms:
            if term.name in ("include", "redirect") and "%" not in term.value:
                self.answers.hint(term.value, "TXT")
            elif term.name in ("a", "mx") and "%" not in term.value and not self.walk:
                self.answers.hint(term.value or domain, "MX" if term.name == "mx" else self._family())

    def _family(self) -> str:
        return "AAAA" if self.ip is not None and self.ip.version == 6 else "A"

    def matches(self, term: Term, domain: str) -> bool:
        name = term.name
        if name in LOOKUP_TERMS:
            self.count(term, domain)
        if name == "all":
            return not self.walk
        if name in ("ip4", "ip6"):
            return self._in(term.value, term.cidr4 if name == "ip4" else term.cidr6) if self.ip else False
        target = self.target(term, domain)
        if name == "include":
            return self._include(term, target)
        if self.walk:
            return False  # counted; its records do not change the count
        if name == "a":
            return self._a(term, domain, target)
        if name == "mx":
            return self._mx(term, domain, target)
        if name == "ptr":
            return self._ptr(target)
        answer = self.lookup(target, "A")  # exists: always A, even for IPv6 (§5.7)
        if answer.is_void:
            self.void(term, domain)
        return bool(answer.records)

    def _include(self, term: Term, target: str) -> bool:
        result, reason = self.check_host(target)
        if result == "none":
            raise _PermError(f"{term.text}: {reason} (RFC 7208 §5.2)")
        return result == "pass"

    def _in(self, network: str, cidr: int | None) -> bool:
        assert self.ip is not None
        try:
            net = ipaddress.ip_network(f"{network}/{cidr}" if cidr is not None else network, strict=False)
        except ValueError:
            return False
        return self.ip.version == net.version and self.ip in net

    def _a(self, term: Term, domain: str, target: str) -> bool:
        answer = self.lookup(target, self._family())
        if answer.is_void:
            self.void(term, domain)
        cidr = term.cidr6 if self._family() == "AAAA" else term.cidr4
        return any(self._in(addr, cidr) for addr in answer.records)

    def _mx(self, term: Term, domain: str, target: str) -> bool:
        answer = self.lookup(target, "MX")
        if answer.is_void:
            self.void(term, domain)
        hosts = [r.split()[-1].rstrip(".") for r in answer.records]
        hosts = [h for h in hosts if h]  # a null MX ("0 .") names no host
        if len(hosts) > MAX_MX_ADDRESSES:
            raise _PermError(f"{term.text} in {domain}: {len(hosts)} MX hosts, more than "
                             f"{MAX_MX_ADDRESSES} (RFC 7208 §4.6.4)")
        cidr = term.cidr6 if self._family() == "AAAA" else term.cidr4
        for host in hosts:
            self.answers.hint(host, self._family())
        return any(self._in(a, cidr) for h in hosts for a in self.lookup(h, self._family()).records)

    def _ptr(self, target: str) -> bool:
        assert self.ip is not None
        ptr = self.answers.get(self.ip.reverse_pointer, "PTR")
        if ptr.status.is_failure:
            return False  # §5.5: a DNS error here only makes "ptr" not match
        for name in ptr.records[:MAX_PTR_NAMES]:
            addrs = self.answers.get(name, self._family())
            if str(self.ip) in addrs.records and (name == target or name.endswith("." + target)):
                return True
        return False


def check_host(answers: Answers, ip: str, domain: str, *, sender: str = "", helo: str = "") -> SpfResult:
    """The SPF result for mail from `sender` (default postmaster@domain) sent by `ip`."""
    ev = _Evaluation(answers, ip, sender or f"postmaster@{domain}", helo or domain)
    try:
        result, reason = ev.check_host(domain)
    except _PermError as err:
        result, reason = "permerror", str(err)
    except _TempError as err:
        result, reason = "temperror", str(err)
    return SpfResult(result, reason, ev.lookups, ev.voids)


@dataclass(frozen=True, slots=True)
class SpfWalk:
    """The whole record tree: how many lookups it costs, or why it cannot be evaluated."""

    lookups: int
    error: str = ""  # a permerror or temperror any address could meet
    temporary: bool = False


def walk(answers: Answers, domain: str) -> SpfWalk:
    """Visit every include and redirect= of `domain`'s record, counting lookups (§4.6.4)."""
    ev = _Evaluation(answers, None, f"postmaster@{domain}", domain, walk=True)
    try:
        ev.check_host(domain)
    except _PermError as err:
        return SpfWalk(ev.lookups, str(err))
    except _TempError as err:
        return SpfWalk(ev.lookups, str(err), temporary=True)
    return SpfWalk(ev.lookups)
