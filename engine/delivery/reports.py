"""Delivery status notifications queued inside the outcome's write transaction.

Used through `bounce.write_outcome`, the one path by which the scheduler (remote
replies, expiry) and the control socket (an operator's bounce) store an outcome, so a
report is built and queued the same way whoever decided it.
"""

from __future__ import annotations

from engine.delivery import dsn as dsn_mod
from engine.delivery import outcome as outcome_mod
from engine.delivery.onereport import Failure
from engine.queue.ids import id_text
from engine.queue.records import MessageRecord, Recipient
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply


def due_delay_reports(applied: outcome_mod.Applied, now: float,
                       delay_warning: float) -> list[tuple[Recipient, Reply, str]]:
    """Deferred recipients that asked for NOTIFY=DELAY and waited `delay_warning`:
    each is reported once (marked in the record that is about to be written)."""
    record = applied.record
    if delay_warning <= 0 or now - record.received_at < delay_warning:
        return []
    due = []
    for i in sorted(applied.deferred):
        rcpt = record.recipients[i]
        if not rcpt.delay_warned and dsn_mod.dsn_wanted(rcpt, "delayed"):
            rcpt.delay_warned = True
            due.append((rcpt, applied.replies[i], "delayed"))
    return due


def queue_dsns(w: WriteTxn, applied: outcome_mod.Applied, body: bytes,
                dsn_ids: tuple[bytes, bytes, bytes], reporting: str, now: float,
                remote_mta: str, remote_dsn: bool,
                delayed: list[tuple[Recipient, Reply, str]], retry_until: float,
                failures: list[Failure]) -> int:
    """Queue the failure DSN for `failures` (from onereport.failures_to_report: this
    outcome's and earlier held ones, each with its own Remote-MTA), the relayed DSN for
    NOTIFY=SUCCESS, and the delay DSN for NOTIFY=DELAY (RFC 3461 §4.1), each as its own
    message. `remote_mta` is the next hop that answered ("" for none); `remote_dsn`
    says it took over NOTIFY=SUCCESS. Returns how many reports it queued."""
    record = applied.record
    queued = 0
    remote = remote_mta or None
    kinds: list[list[tuple[Recipient, Reply, str]]] = [
        [(r, rep, a) for r, rep, a, _ in failures], [], delayed]
    per_rcpt: list[list[str] | None] = [[m for _, _, _, m in failures], None, None]
    action = dsn_mod.success_action(remote_dsn)
    if action and applied.delivered:
        kinds[1] = [(record.recipients[i], applied.replies[i], action)
                    for i in sorted(applied.delivered)]
    for entries, mtas, raw_id in zip(kinds, per_rcpt, dsn_ids):
        if not entries:
            continue
        message = dsn_mod.build_dsn(record, body, entries, reporting_mta=reporting, now=now,
                                    remote_mta=remote, message_id=f"{id_text(raw_id)}@{reporting}",
                                    retry_until=retry_until, remote_mtas=mtas)
        if message is None:
            continue
        # RFC 3461 §6.2 / RFC 5321 §6.1: reports go out with the null reverse-path, so
        # a DSN is never answered by another DSN.
        dsn_record = MessageRecord(
            id=raw_id, sender="", recipients=[Recipient(record.sender)], received_at=now,
            size=len(message), smtputf8=record.smtputf8,
            body_type="8BITMIME" if not message.isascii() else None, helo=reporting,
        )
        w.put_message(dsn_record, message, report=True)
        queued += 1
    return queued
