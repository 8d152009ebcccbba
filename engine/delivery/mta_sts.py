"""MTA-STS (RFC 8461), the pure part: the `_mta-sts` TXT record, the policy file, and
which MX hosts a policy allows. No I/O; sts_fetch.py fetches, sts_policies.py caches
and applies.

What a policy does to delivery (sts_policies.py and connect.py carry it out):
- mode "enforce": only MX hosts matching the policy's `mx` patterns are used (§5), the
  session must use STARTTLS with a certificate that chains to a trusted root and names
  the MX host (§4.2); anything else defers (4.7.5), never bounces.
- mode "testing": mail goes as it would without a policy; what would have failed is
  logged (the RFC's reports are TLSRPT's, RFC 8460, not implemented).
- mode "none": as if the domain had no policy (§8.3: how a domain withdraws one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from engine.dns.mx import Route, RouteError, address_key
from engine.smtp.replies import Reply

MAX_POLICY_BYTES = 64 * 1024  # §3.3: senders may refuse a policy body larger than 64 KiB
MAX_AGE_LIMIT = 31_557_600  # §3.2: max_age is at most one year
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # §3.1 sts-id
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# §3.2 mx-pattern: a host name, or "*." and a domain (the wildcard is one leftmost label).
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")
_FIELD = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]{0,31})[ \t]*:[ \t]*(.*?)[ \t]*")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the problem."""


class Policy(msgspec.Struct, frozen=True):
    """One domain's policy, as fetched under the TXT record's `id`."""

    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]  # patterns, lower case, no trailing dot
    max_age: int  # seconds
    id: str = ""  # the `_mta-sts` TXT record's id it was fetched under

    def allows(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def record_id(texts: Sequence[str]) -> str | None:
    """The `id` of the one `_mta-sts` TXT record that begins with "v=STSv1", or None.

    §3.1: records not beginning with "v=STSv1;" are discarded; if not exactly one is
    left, or it is malformed, the domain has no available policy.
    """
    records = [t for t in texts if re.match(r"v=STSv1[ \t]*(;|$)", t)]
    if len(records) != 1:
        return None
    found: str | None = None
    for field in records[0].split(";")[1:]:
        field = field.strip(" \t")
        if not field:
            continue  # a trailing ";" (sts-field-delim)
        key, sep, value = field.partition("=")
        if not sep or not key:
            return None
        if key == "id" and found is None:
            if not _ID.fullmatch(value):
                return None
            found = value
    return found


def parse_policy(text: str) -> Policy:
    """The policy file of §3.2: "key: value" lines (LF or CRLF), `version: STSv1`,
    `mode`, `max_age`, one `mx` per allowed pattern. Unknown keys are ignored (§3.2);
    of a repeated key other than mx the first counts.

    Raises PolicyError naming what is missing or malformed.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        m = _FIELD.fullmatch(line)
        if m is None:
            raise PolicyError(f"line {n}: not a \"key: value\" field: {line[:80]!r}")
        key, value = m.group(1), m.group(2)
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyError(f"line {n}: not an MX pattern: {value[:80]!r}")
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version: {fields.get('version', '(missing)')!r}, expected STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode: {mode or '(missing)'!r}, expected enforce, testing or none")
    age = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", age):
        raise PolicyError(f"max_age: {age or '(missing)'!r} is not a number of seconds")
    if not mx and mode != "none":
        raise PolicyError(f"mx: a {mode} policy names no MX host")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT))


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: `host` matches the pattern exactly, or the pattern is "*.suffix" and the
    host is exactly one label more than the suffix ("*.example.com" matches
    "mx1.example.com", not "example.com" nor "a.b.example.com"). Case-insensitive."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def restrict_route(policy: Policy, route: Route) -> Route | RouteError:
    """The route with only the MX hosts the policy allows (§5: an enforced policy's MX
    list is the candidate list); a 4.7.5 deferral if none is left. The very same route
    when every host is allowed."""
    kept = tuple(h for h in route.hosts if policy.allows(h.name))
    if len(kept) == len(route.hosts):
        return route
    if not kept:
        names = ", ".join(h.name for h in route.hosts) or "(none)"
        return RouteError(Reply(451, "4.7.5", (
            f"MTA-STS policy of {route.domain}: no MX host is allowed "
            f"(MX: {names}; policy mx: {', '.join(policy.mx)})")))
    return Route(route.domain, kept, ",".join(sorted(h.name for h in kept)),
                 implicit=route.implicit, address_key=address_key(kept) if route.address_key else "")


def disallowed_hosts(policy: Policy, route: Route) -> list[str]:
    """The route's MX host names the policy does not allow (for a testing policy's log)."""
    return [h.name for h in route.hosts if not policy.allows(h.name)]
