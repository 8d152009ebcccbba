"""Bounce classes: what kind of permanent failure a reply was, for campaign accounting.

RFC 3463 §3 reads the enhanced code's subject digit: X.1 addressing, X.2 mailbox,
X.3 mail system, X.4 network and routing (X.4.7: delivery time expired), X.5 protocol,
X.6 content, X.7 security and policy. A reply without an enhanced code falls back to
the basic code: 550/551/553 are about the mailbox (RFC 5321 §4.2.3), 554 is policy.
"""

from __future__ import annotations

CLASSES = ("mailbox", "domain", "policy", "content", "expired", "suppressed", "other")

_BY_SUBJECT = {"1": "mailbox", "2": "mailbox", "3": "other", "4": "domain", "5": "other",
               "6": "content", "7": "policy"}
# X.1.2 bad destination system, X.1.10 null MX (RFC 7505): the domain, not the mailbox.
_DOMAIN_DETAILS = {"1.2", "1.10"}


def bounce_class(code: int, enhanced: str) -> str:
    """The class of one permanent failure: one of `CLASSES` (never "suppressed": the
    caller knows when it refused a recipient itself)."""
    if enhanced:
        _, _, rest = enhanced.partition(".")
        if rest == "4.7":
            return "expired"
        if rest in _DOMAIN_DETAILS:
            return "domain"
        return _BY_SUBJECT.get(rest.partition(".")[0], "other")
    if code in (550, 551, 553):
        return "mailbox"
    if code == 554:
        return "policy"
    return "other"
