"""What the checks take and give: the sending context, findings, records to publish."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.mail.dkim import DkimKey

OK = "OK"
FAIL = "FAIL"
ADVICE = "ADVICE"


@dataclass(frozen=True, slots=True)
class Record:
    """A DNS record to publish: owner name, type, the record's text (TXT unquoted)."""

    name: str
    type: str
    value: str

    def zone_line(self) -> str:
        """The record as a zone file line; a TXT over 255 octets is split in strings
        (RFC 1035 §3.3, RFC 6376 §3.6.2.2: verifiers join them)."""
        if self.type != "TXT":
            return f"{self.name}. {self.type} {self.value}"
        data = self.value
        pieces = [data[i:i + 255] for i in range(0, len(data), 255)] or [""]
        quoted = " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in pieces)
        return f"{self.name}. TXT {quoted}"


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report."""

    check: str  # "spf", "dkim", "dmarc", "mx", "ptr", "ehlo", "mta-sts", "tls-rpt", "sources"
    level: str  # OK, FAIL or ADVICE
    subject: str  # the name or address the line is about
    message: str
    publish: tuple[Record, ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    """One address Volley sends from, the name it greets with, and where it came from."""

    ip: str
    ehlo: str
    origin: str  # "--ip", "delivery.source_address", "egress[0].source_address", "server.hostname"


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One `[[dkim]]` entry that signs the domain: its key, or why it did not load."""

    index: int
    domain: str
    selector: str
    key_file: str
    key: DkimKey | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Context:
    domain: str  # lower-case, no final dot
    sources: tuple[Source, ...]
    keys: tuple[KeyEntry, ...] = ()
    ehlo: str = ""  # delivery.helo_name or server.hostname
    notes: tuple[Finding, ...] = field(default=())  # findings of the source plan itself


def org_domain(domain: str) -> str:
    """The organisational domain of RFC 7489 §3.2, approximated by the last two labels.

    The RFC uses the Public Suffix List, which Volley does not ship: for names under a
    two-label public suffix ("example.co.uk") this gives the suffix ("co.uk"), so the
    doctor looks one level too high there; for the usual "mail.example.com" it is exact.
    """
    labels = domain.rstrip(".").lower().split(".")
    return ".".join(labels[-2:])


def parse_tags(text: str) -> dict[str, str]:
    """A tag list "v=DKIM1; k=rsa; p=..." (RFC 6376 §3.2, RFC 7489 §6.4) → {tag: value};
    the first instance of a tag wins, names lower-cased, folding whitespace removed
    around values."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def family(ip: str) -> str:
    return "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"


def has_fail(findings: Sequence[Finding]) -> bool:
    return any(f.level == FAIL for f in findings)
