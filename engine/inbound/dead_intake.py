"""Mail for a destination this worker knows is dead is dated at intake to the end of its
backoff (delivery/dead.py defers it as a group otherwise).

Why: a message received for a site whose every connection is refused was written due
now, found by the next scan, and deferred by a group op that rewrote its record and
moved its due key: two writes and a scan for a message that could not go anywhere.
Receiving while every destination refused ran at 77-85% of receiving alone. Dated at
intake it is written once, due when the site may answer again, and no scan meets it
before then. What delivery would have done is kept: its recipients of that domain
wait until the backoff's end plus the same jitter (`Scheduler.dead_until`), show the
reply that killed the site as their last reply, have no attempt counted, and are
counted and logged as deferred once the commit has made them durable
(`Scheduler.deferred_at_intake`: volley_messages_deferred_total, the deferral
classes, the campaign's `deferred`, one delivery-log line per domain per group).

Only what delivery knows without waiting counts (a route already planned, the pool
backing off): a destination it has not met yet, or with [[egress]] sources in use,
is left to the scheduler as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from engine.queue.records import PENDING, MessageRecord, domain_of
from engine.smtp.replies import Reply

# domain -> (epoch until which it waits, the reply that killed its site, that reply's
# one-line summary for `last_reply`), or None when the site is not known to be dead.
DeadWait = Callable[[str], "tuple[float, Reply, str] | None"]


class IntakeDeferral(NamedTuple):
    domain: str
    until: float
    reply: Reply
    recipients: int


def date_for_dead(record: MessageRecord, dead_until: DeadWait) -> list[IntakeDeferral]:
    """Date the recipients of `record` whose domain is dead (in place); what was dated."""
    out: list[IntakeDeferral] = []
    by_domain: dict[str, list[int]] = {}
    for i, r in enumerate(record.recipients):
        if r.state == PENDING:
            by_domain.setdefault(domain_of(r.address), []).append(i)
    for domain, indices in by_domain.items():
        dead = dead_until(domain)
        if dead is None:
            continue
        until, reply, summary = dead
        for i in indices:
            r = record.recipients[i]
            r.next_attempt = max(r.next_attempt, until)
            r.last_reply = summary
        out.append(IntakeDeferral(domain, until, reply, len(indices)))
    return out
