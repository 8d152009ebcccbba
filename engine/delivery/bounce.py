"""Storing an outcome, and bouncing recipients: the one path by which the scheduler
(remote replies, routing errors, expiry) and an operator's `volley ctl bounce` (run by
the control side) change a message's recipients and queue the reports that owes.

Both run inside the caller's write transaction, after re-reading the record in it
(`stored`): whoever commits, the recipient states and the DSNs land together (P3).
Report ids are allocated by the caller outside the op, because an op may run twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.delivery import outcome
from engine.delivery.dsn import DEFAULT_NOTIFY
from engine.delivery.ledger import Ledger, book
from engine.delivery.onereport import failures_to_report, suspended_in
from engine.delivery.outcome import Applied
from engine.delivery.reports import queue_dsns
from engine.queue.records import MessageRecord, Recipient
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply

ReportIds = tuple[bytes, bytes, bytes]  # ids for the failure, relayed and delay reports


def write_outcome(w: WriteTxn, stored: MessageRecord, applied: Applied, body: bytes, *,
                  report_ids: ReportIds, reporting_mta: str, now: float, retry_until: float,
                  remote_mta: str = "", remote_dsn: bool = False,
                  delayed: list[tuple[Recipient, Reply, str]] | None = None,
                  hold: bool = True, ledger: Ledger | None = None) -> int:
    """Store `applied` (from outcome.apply / expire_pending over `stored`): the message
    is deleted when nothing is pending any more, else updated. Then queue the reports it
    owes (failure, relayed for NOTIFY=SUCCESS, and the `delayed` entries), each with the
    null sender (RFC 3461 §6.2) and `reporting_mta` as Reporting-MTA; `retry_until`
    becomes Will-Retry-Until in a delay report. Failures go out in one report per
    message and delivery pass (onereport.py): this may hold them in the record instead,
    or add those held earlier (`hold=False`: report them now). The campaign counters and
    the suppression list are booked in the same transaction (ledger.py; `ledger` None:
    counters only). Returns how many reports it queued (volley_dsns_queued_total)."""
    record = applied.record
    # The common outcome (delivered or deferred, nothing bounced or held) owes no
    # failure report: skip building the holds lookup it would never ask.
    failures = (failures_to_report(applied, remote_mta, now, hold=hold,
                                   suspended=suspended_in(w, now))  # before the record is written
                if applied.bounced or record.held_failures else [])
    if applied.done:
        w.delete_message(stored.id, stored=stored)
    else:
        w.update_message(record, stored=stored)
    queued = 0
    if failures or delayed or (not remote_dsn and _success_asked(applied)):
        queued = queue_dsns(w, applied, body, report_ids, reporting_mta, now, remote_mta,
                            remote_dsn, delayed or [], retry_until, failures)
    book(w, stored, applied, ledger or _COUNTERS_ONLY, now)
    return queued


_COUNTERS_ONLY = Ledger()


def _success_asked(applied: Applied) -> bool:
    """Did a recipient delivered here give NOTIFY at all? Without one it gets the
    default, FAILURE only (RFC 3461 §4.1, dsn.DEFAULT_NOTIFY), so a delivery owes no
    "relayed" report and queue_dsns need not run (most relayed mail)."""
    recipients = applied.record.recipients
    return any(recipients[i].notify is not None or _DEFAULT_ASKS_SUCCESS
               for i in applied.delivered)


_DEFAULT_ASKS_SUCCESS = "SUCCESS" in DEFAULT_NOTIFY


def bounce_recipients(w: WriteTxn, stored: MessageRecord, indices: Sequence[int],
                      reason: Reply, body: bytes, *, report_ids: ReportIds,
                      reporting_mta: str, now: float) -> tuple[Applied, int]:
    """Bounce the PENDING recipients `indices` of `stored` with `reason` (a 5xx reply),
    as a remote 5xx would: they become BOUNCED, the record is written (deleted when
    nothing is pending) and one failure report goes to the sender, unless the sender is
    null or the recipients asked for NOTIFY=NEVER. `body` is the queued message (its
    headers, or all of it for RET=FULL, go back with the report).

    Returns the outcome and how many reports it queued (for volley_dsns_queued_total).

    Raises IndexError for an index outside the record (a caller bug).
    """
    applied = outcome.apply(stored, dict.fromkeys(indices, reason), now, schedule=(60.0,),
                            max_age=float("inf"))
    queued = write_outcome(w, stored, applied, body, report_ids=report_ids,
                  reporting_mta=reporting_mta, now=now, retry_until=stored.received_at,
                  hold=False)
    return applied, queued
