"""The newsletter sections of the configuration: HTTP injection, DKIM keys, feedback
(complaints and asynchronous bounces) and suppression.

Kept apart from tree.py, which imports them into `Config`; the same rules hold here:
every key has a default (a `[[dkim]]` entry names its key), and a `__post_init__`
raises ValueError("key: problem") for what a key's type cannot say.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from engine.config.units import Size, split_host_port


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAILBOX = re.compile(rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]+@{_LABEL}(?:\.{_LABEL})*")


class HttpConfig(_Frozen, frozen=True):
    # "host:port" of the injection API (POST /api/v1/inject); "" = off.
    listen: str = ""
    # One bearer token per line ("name:token" or a bare token); required with listen:
    # the API never runs open.
    tokens_file: str = ""
    # Serve HTTPS with tls.cert_file / tls.key_file (the SMTP listeners' certificate).
    tls: bool = False
    # A request body larger than this gets 413 before it is read whole.
    max_body_size: Size = Size(64 * 1024**2)
    # Recipients one request may carry; all of them are stored in one commit.
    max_recipients: int = 50_000

    def __post_init__(self) -> None:
        if self.listen:
            try:
                split_host_port(self.listen)
            except ValueError as err:
                raise ValueError(f"listen: {err}") from None
            if not self.tokens_file:
                raise ValueError("tokens_file: required when listen is set (the API needs bearer tokens)")
        if self.max_recipients < 1:
            raise ValueError("max_recipients: must be at least 1")
        if self.max_body_size < 1024:
            raise ValueError("max_body_size: must be at least 1KiB")


# RFC 6376 §5.4.1 lists these as the headers that SHOULD be signed; the list-unsubscribe
# pair is signed as RFC 8058 §4 requires.
DEFAULT_SIGNED_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To",
    "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID",
)
_CANON = ("simple", "relaxed")


class DkimConfig(_Frozen, frozen=True):
    """One `[[dkim]]` key. Mail whose From: domain is `domain` or a subdomain of it is
    signed with it (RFC 6376 §3.10 alignment as DMARC reads it); several entries for
    one domain (RSA and Ed25519, RFC 8463) all sign."""

    domain: str
    selector: str
    key_file: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    headers: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_SIGNED_HEADERS))
    canonicalization: str = "relaxed/relaxed"  # header/body, RFC 6376 §3.4
    # Sign each header name once more than it occurs, so no instance can be added
    # afterwards without breaking the signature (RFC 6376 §8.15).
    over_sign: bool = False

    def __post_init__(self) -> None:
        if not _DOMAIN.fullmatch(self.domain):
            raise ValueError(f'domain: expected a domain such as "example.com", got "{self.domain}"')
        if not _DOMAIN.fullmatch(self.selector):
            raise ValueError(f'selector: expected a DNS label such as "s2026", got "{self.selector}"')
        if not self.key_file:
            raise ValueError("key_file: required (a PEM private key)")
        if not any(h.lower() == "from" for h in self.headers):
            raise ValueError('headers: must include "From" (RFC 6376 §5.4)')
        parts = self.canonicalization.split("/")
        if len(parts) > 2 or any(p not in _CANON for p in parts):
            raise ValueError(
                f'canonicalization: expected "relaxed/relaxed", "simple/simple", "relaxed/simple"'
                f' or "simple/relaxed", got "{self.canonicalization}"')

    @property
    def header_canon(self) -> str:
        return self.canonicalization.split("/")[0]

    @property
    def body_canon(self) -> str:
        parts = self.canonicalization.split("/")
        return parts[1] if len(parts) == 2 else "simple"  # RFC 6376 §3.5 c= default


# RFC 3463 mailbox-level permanent failures: X.1.1 bad mailbox, X.1.3 bad syntax,
# X.1.6 mailbox moved, X.1.10 null MX (RFC 7505 §4.2), X.2.1 mailbox disabled.
DEFAULT_SUPPRESS_CODES = ("5.1.1", "5.1.3", "5.1.6", "5.1.10", "5.2.1")


class SuppressionConfig(_Frozen, frozen=True):
    # A recipient that bounces with one of `codes` is added to the list.
    auto_bounce: bool = True
    codes: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_SUPPRESS_CODES))
    # A complaint (ARF report, RFC 5965) adds the complaining recipient.
    auto_complaint: bool = True

    def __post_init__(self) -> None:
        for i, code in enumerate(self.codes):
            if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", code):
                raise ValueError(f'codes[{i}]: expected a permanent enhanced code such as "5.1.1", got "{code}"')


class FeedbackConfig(_Frozen, frozen=True):
    # The mailbox complaints (ARF) and late bounces (DSNs) come back to. Mail for it, or
    # for its VERP form local+TOKEN@domain, is read by Volley and never relayed. "" = off.
    address: str = ""
    # Mail injected over HTTP whose envelope sender is this address gets the VERP form
    # local+TOKEN@domain as its return path, so a late bounce names its recipient.
    verp: bool = True

    def __post_init__(self) -> None:
        if self.address and not _MAILBOX.fullmatch(self.address):
            raise ValueError(f'address: expected an address such as "fbl@bounces.example.com", got "{self.address}"')
        if "+" in self.address.partition("@")[0]:
            raise ValueError("address: must not contain '+' (it separates the VERP token)")


class CampaignsConfig(_Frozen, frozen=True):
    # /metrics labels only the most recently active campaigns (bounded cardinality);
    # the rest are summed under campaign="other".
    metrics_top: int = 50

    def __post_init__(self) -> None:
        if self.metrics_top < 0:
            raise ValueError("metrics_top: must be 0 or more")
