"""One failure report per message and delivery pass (RFC 3464 §2: one DSN may cover
several recipients; the README promises one per message).

A message's recipients at different domains are delivered as separate (message,
domain) units, maybe by different workers (domains are sharded over workers), and each
unit commits its own outcome. Reporting each unit's failures at once would send the
sender one report per failing domain.

One delivery pass of a message: the attempts of its recipients that are due at the
same time, i.e. every PENDING recipient whose due time (max(received_at, next_attempt))
has come when a unit's outcome commits: its attempt is in flight, or about to start.
When a unit's outcome leaves such a recipient at another domain, its final failures
are not reported yet but kept in the record (`MessageRecord.held_failures`, written in
the same transaction as the recipient states, so a crash loses neither). The outcome
that leaves no such recipient (the last unit of the pass was delivered, bounced,
expired or deferred: a deferral dates the recipient into the future) sends one report
with every held failure and its own; so does the outcome that deletes the record. A
failure after a later retry belongs to a later pass and may be a second report.

Bounded: a due recipient is attempted or, past `delivery.max_age`, expired, and either
outcome ends the pass. A recipient at a domain suspended by an operator hold is not in
the pass (it is parked, re-dated without an outcome); if the suspension starts after
failures were held for it, they wait for the message's next outcome (at the latest its
expiry). An operator's `volley ctl bounce` reports at once (with any held failures):
it ends no delivery pass. `volley ctl delete` of the whole message drops them with it
(like `postsuper -d`, no report).
"""

from __future__ import annotations

from collections.abc import Callable

from engine.delivery.holds import HOLDS_KEY, Holds, decode_holds
from engine.delivery.outcome import Applied
from engine.queue.records import PENDING, HeldFailure, MessageRecord, Recipient, domain_of
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply

# (recipient, reply, action, remote MTA) for dsn.build_dsn with per-recipient Remote-MTA.
Failure = tuple[Recipient, Reply, str, str]


def _others_due(record: MessageRecord, changed: set[int], now: float,
                suspended: Callable[[str], bool]) -> bool:
    """Another PENDING recipient (not changed by this outcome) is due, and its domain
    not suspended (it would be parked, not attempted): in this pass."""
    received = record.received_at
    return any(r.state == PENDING and i not in changed
               and max(received, r.next_attempt) <= now and not suspended(domain_of(r.address))
               for i, r in enumerate(record.recipients))


def suspended_in(w: WriteTxn, now: float) -> Callable[[str], bool]:
    """domain → suspended at `now` by the holds table stored in `w` (read on first use:
    most outcomes never ask)."""
    table: list[Holds] = []

    def suspended(domain: str) -> bool:
        if not table:
            raw = w.get_control(HOLDS_KEY)
            table.append(decode_holds(raw) if raw else Holds())
        return table[0].suspended(domain, now) is not None

    return suspended


def failures_to_report(applied: Applied, remote_mta: str, now: float, *, hold: bool = True,
                       suspended: Callable[[str], bool] = lambda domain: False) -> list[Failure]:
    """The failures to report now for the outcome `applied` (about to be written):
    `applied.bounced` plus those held earlier, or [] while the pass goes on (they are
    then held in `applied.record`). Clears the held list when it reports them.
    `hold=False` (an operator's bounce: not a delivery pass) reports at once."""
    record = applied.record
    if not applied.bounced and not record.held_failures:
        return []  # the common outcome (delivered or deferred, nothing held): no work
    held = list(record.held_failures)
    for i in sorted(applied.bounced):
        rep = applied.replies[i]
        held.append(HeldFailure(i, rep.code, rep.enhanced, rep.lines, remote_mta))
    if not held:
        return []
    if hold and not applied.done and _others_due(record, set(applied.replies), now, suspended):
        record.held_failures = held
        return []
    record.held_failures = []
    return [(record.recipients[h.index], Reply(h.code, h.enhanced, h.text), "failed",
             h.remote_mta) for h in held]
