"""What an outcome means beyond the message itself: the campaign's counters and the
suppression list. Runs inside the outcome's write transaction (bounce.write_outcome),
so the counters, the list and the recipient states commit together or not at all.

Counted per recipient: delivered, deferred (each deferral), bounced by class
(engine/mail/bounce_class.py: the bounce rules; expiry is "expired"), and suppressed
when the bounce was our own refusal of a suppressed recipient. A permanent failure
whose class is one of `bounces.suppress_classes` (bad_mailbox, inactive_mailbox) or
whose enhanced code is one of `suppression.codes` puts the address on the shared list
(reason "bounce"): a mailbox that does not exist is gone for every tenant, while a
complaint is about one tenant's mail and is listed for that tenant alone
(engine/inbound/feedback_intake.py).
"""

from __future__ import annotations

from collections import Counter

import msgspec

from engine.delivery.outcome import Applied
from engine.mail import bounce_class
from engine.mail.bounce_class import BouncePolicy
from engine.queue import campaigns, suppression
from engine.queue.records import BOUNCED, EXPIRED, MessageRecord
from engine.queue.writetxn import WriteTxn


class Ledger(msgspec.Struct, frozen=True):
    """How to book one outcome. `suppress_codes` empty: no suppression by code; the
    classes that suppress are the installed policy's (bounce_class.configure), unless
    `policy` names another."""

    suppress_codes: frozenset[str] = frozenset()
    # The bounces of this outcome are refusals of suppressed recipients: count them as
    # "suppressed", never add them to the list again.
    suppressed: bool = False
    policy: BouncePolicy | None = None


def recipient_class(applied: Applied, i: int, *, suppressed: bool,
                    policy: BouncePolicy | None = None) -> str:
    """The class of recipient `i`'s reply in `applied`: "" when it was delivered,
    "suppressed" for our own refusal, "expired" when its queue lifetime ran out, else
    what the bounce rules make of the reply (deferrals too)."""
    rcpt = applied.record.recipients[i]
    reply = applied.replies.get(i)
    if reply is not None and 200 <= reply.code < 300:
        return ""
    if suppressed and rcpt.state == BOUNCED:
        return "suppressed"
    if rcpt.state == EXPIRED:
        return "expired"
    if reply is None:
        return "other"
    return (policy or bounce_class.active()).classify(reply.code, reply.enhanced,
                                                      " ".join(reply.lines))


def book(w: WriteTxn, stored: MessageRecord, applied: Applied, ledger: Ledger, now: float) -> None:
    """Count `applied` toward the message's campaign and suppress hard-bounced
    mailboxes."""
    if not applied.bounced and not (stored.campaign or stored.tenant):
        return  # nothing to classify, no counters to bump: most relayed mail
    record = applied.record
    policy = ledger.policy or bounce_class.active()
    classes: Counter[str] = Counter()
    entries: list[suppression.Suppression] = []
    for i in applied.bounced:
        if ledger.suppressed:
            continue
        reply = applied.replies.get(i)
        code, enhanced = (reply.code, reply.enhanced) if reply is not None else (554, "5.4.7")
        cls = recipient_class(applied, i, suppressed=False, policy=policy)
        classes[cls] += 1
        if enhanced in ledger.suppress_codes or policy.suppresses(cls):
            text = " ".join(reply.lines) if reply is not None else ""
            entries.append(suppression.Suppression(
                value=record.recipients[i].address.lower(), kind="address", reason="bounce",
                source=f"{code} {enhanced} {text}".strip()[:200], created=now))
    if entries:
        suppression.add(w, entries)
    if stored.campaign or stored.tenant:
        campaigns.bump(w, stored.tenant, stored.campaign, now=now,
                       delivered=len(applied.delivered), deferred=len(applied.deferred),
                       bounced=dict(classes) or None,
                       suppressed=len(applied.bounced) if ledger.suppressed else 0)
