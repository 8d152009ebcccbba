"""SPF records as terms (RFC 7208 §4.6, §5, §6) and their macros (§7); no DNS here.

`parse_record` turns "v=spf1 ip4:192.0.2.0/24 include:_spf.example.net ~all" into
`Term`s or raises `SpfSyntax` with the reason (a receiver's permerror). `expand` fills
in a domain-spec's macros. `suggest` builds the one record a domain should publish
from what it has and the addresses it must authorise.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
# The terms that cost a DNS lookup, counted against the limit of 10 (§4.6.4).
LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.S)
_MECH = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9_.-]*)(.*)", re.S)
_CIDR = re.compile(r"(.*?)(?:/(\d{1,3}))?(?://(\d{1,3}))?", re.S)
_MACRO = re.compile(r"%(?:\{([a-zA-Z])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.S)
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class SpfSyntax(ValueError):
    """A record a receiver answers permerror for; the message says why."""


@dataclass(frozen=True, slots=True)
class Term:
    """One directive (`qualifier` set) or modifier (`qualifier` "")."""

    text: str
    name: str  # lower-case mechanism or modifier name
    qualifier: str = ""  # "+", "-", "~", "?" for a directive
    value: str = ""  # the domain-spec or network after ":" (or "=" for a modifier)
    cidr4: int | None = None
    cidr6: int | None = None

    @property
    def is_mechanism(self) -> bool:
        return bool(self.qualifier)

    @property
    def result(self) -> str:
        return QUALIFIERS[self.qualifier]


def parse_record(record: str) -> list[Term]:
    """The terms of one SPF record ("v=spf1" first, then terms separated by spaces)."""
    words = record.split(" ")
    if words[0].lower() != "v=spf1":
        raise SpfSyntax(f'the record does not start with "v=spf1": {record!r}')
    terms = [parse_term(w) for w in words[1:] if w]
    for name in ("redirect", "exp"):
        if sum(1 for t in terms if not t.is_mechanism and t.name == name) > 1:
            raise SpfSyntax(f'"{name}=" appears more than once (RFC 7208 §6)')
    return terms


def parse_term(text: str) -> Term:
    mod = _MODIFIER.fullmatch(text)
    if mod and not text.startswith(("+", "-", "~", "?")):
        name, value = mod.group(1).lower(), mod.group(2)
        if name in ("redirect", "exp"):
            _check_macros(value, text)
        return Term(text, name, "", value)
    m = _MECH.fullmatch(text)
    if not m or m.group(2).lower() not in MECHANISMS:
        raise SpfSyntax(f"unknown mechanism {text!r} (RFC 7208 §5)")
    qualifier, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise SpfSyntax(f"{text!r}: \"all\" takes no argument")
        return Term(text, name, qualifier)
    if name in ("ip4", "ip6"):
        return _network(text, name, qualifier, rest)
    value, c4, c6 = rest, None, None
    if name in ("a", "mx"):
        cm = _CIDR.fullmatch(rest)
        assert cm is not None  # the pattern matches every string
        value = cm.group(1)
        c4, c6 = _cidr(cm.group(2), 32, text), _cidr(cm.group(3), 128, text)
    if value and not value.startswith(":"):
        raise SpfSyntax(f"malformed mechanism {text!r}")
    value = value[1:]
    if name in ("include", "exists") and not value:
        raise SpfSyntax(f'{text!r}: "{name}" needs a domain ({name}:example.net)')
    if value or rest.startswith(":"):
        _check_macros(value, text)
        if not value:
            raise SpfSyntax(f"{text!r}: empty domain after ':'")
    return Term(text, name, qualifier, value, c4, c6)


def _cidr(digits: str | None, top: int, text: str) -> int | None:
    if digits is None:
        return None
    if int(digits) > top or (len(digits) > 1 and digits[0] == "0"):
        raise SpfSyntax(f"{text!r}: bad prefix length /{digits}")
    return int(digits)


def _network(text: str, name: str, qualifier: str, rest: str) -> Term:
    if not rest.startswith(":"):
        raise SpfSyntax(f"{text!r}: {name} needs an address ({name}:...)")
    addr, _, length = rest[1:].partition("/")
    version = 4 if name == "ip4" else 6
    try:
        ip = ipaddress.ip_address(addr)
        if ip.version != version:
            raise ValueError
    except ValueError:
        raise SpfSyntax(f"{text!r}: not an IPv{version} address") from None
    cidr = _cidr(length, 32 if version == 4 else 128, text) if length else None
    if length == "" and "/" in rest:
        raise SpfSyntax(f"{text!r}: empty prefix length")
    return Term(text, name, qualifier, addr, cidr if version == 4 else None, cidr if version == 6 else None)


def _check_macros(value: str, text: str) -> None:
    """Every "%" starts a well-formed macro (§7.1); c, r, t are for exp= only."""
    pos = 0
    for m in _MACRO.finditer(value):
        if "%" in value[pos:m.start()]:
            raise SpfSyntax(f"{text!r}: malformed macro")
        pos = m.end()
        if m.group(5) is not None and m.group(5) not in "%_-":
            raise SpfSyntax(f"{text!r}: malformed macro %{m.group(5)}")
        if m.group(1) is not None and m.group(1).lower() not in "slodiphv":
            raise SpfSyntax(f"{text!r}: macro letter {m.group(1)!r} is not allowed here (RFC 7208 §7.2)")
    if "%" in value[pos:]:
        raise SpfSyntax(f"{text!r}: malformed macro")


@dataclass(frozen=True, slots=True)
class MacroContext:
    """What the macros of §7.2 stand for in one evaluation."""

    ip: str
    sender: str  # the MAIL FROM address (postmaster@helo for an empty one, §4.3)
    helo: str
    domain: str = ""

    def letter(self, c: str) -> str:
        local, _, sender_domain = self.sender.rpartition("@")
        ip = ipaddress.ip_address(self.ip)
        if c == "i":
            return self.ip if ip.version == 4 else ".".join(ip.exploded.replace(":", ""))
        values = {"s": self.sender, "l": local or "postmaster", "o": sender_domain, "d": self.domain,
                  "h": self.helo, "v": "in-addr" if ip.version == 4 else "ip6",
                  "p": "unknown"}  # §7.3: "p" is discouraged; we never look it up
        return values[c]


def expand(spec: str, ctx: MacroContext) -> str:
    """A domain-spec with its macros filled in (§7.3, §7.4), cut to 253 octets (§4.8)."""
    def one(m: re.Match[str]) -> str:
        if m.group(5) is not None:
            return {"%": "%", "_": " ", "-": "%20"}[m.group(5)]
        letter, digits, reverse, delims = m.group(1), m.group(2), m.group(3), m.group(4) or "."
        parts = re.split("[" + re.escape(delims) + "]", ctx.letter(letter.lower()))
        if reverse:
            parts.reverse()
        if digits:
            if int(digits) == 0:
                raise SpfSyntax(f"macro %{{{letter}{digits}...}}: zero labels (RFC 7208 §7.3)")
            parts = parts[-int(digits):]
        text = ".".join(parts)
        return urllib.parse.quote(text, safe="") if letter.isupper() else text
    out = _MACRO.sub(one, spec).rstrip(".")
    while len(out) > 253 and "." in out:
        out = out.split(".", 1)[1]
    return out


def valid_domain(name: str) -> bool:
    """Labels of 1-63 characters and a top label that is not all digits (§4.3)."""
    labels = name.rstrip(".").split(".")
    return len(labels) > 1 and all(_LABEL.fullmatch(x) for x in labels) and not labels[-1].isdigit()


def ip_term(ip: str) -> str:
    return f"ip{ipaddress.ip_address(ip).version}:{ip}"


def suggest(records: Sequence[str], ips: Iterable[str]) -> str:
    """One record to publish: the terms the domain has (every record's, in order, each
    once), the `ips` that are missing first, the first "all" last ("~all" if none)."""
    terms: list[str] = []
    final = redirect = ""
    for record in records:
        for word in record.split(" ")[1:]:
            try:
                term = parse_term(word) if word else None
            except SpfSyntax:
                continue
            if term is None or word in terms:
                continue
            if term.name == "all" and term.is_mechanism:
                final = final or word
            elif not term.is_mechanism and term.name == "redirect":
                redirect = redirect or word
            else:
                terms.append(word)
    head = [t for t in (ip_term(ip) for ip in ips) if t not in terms]
    # §6.1: redirect= is ignored when the record has "all"; keep it only without one.
    return " ".join(["v=spf1", *head, *terms, final or redirect or "~all"])
