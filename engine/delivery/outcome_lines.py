"""What one committed outcome shows the operator: its delivery-log lines (one per
recipient), the latency and queue-time histograms and the by-class counters. Called by
the scheduler after the outcome's commit, so nothing is logged that the queue does not
also say. Every line carries `class`: "" for a delivery, else the reply's bounce class
(ledger.recipient_class: the bounce rules, or "expired" / "suppressed")."""

from __future__ import annotations

from engine.delivery.job import JobResult
from engine.delivery.ledger import recipient_class
from engine.delivery.outcome import Applied
from engine.observe.delivery_log import DeliveryLog
from engine.observe.metrics import WorkerMetrics
from engine.queue.ids import id_text
from engine.queue.records import EXPIRED, MessageRecord


def observe_outcome(m: WorkerMetrics, before: MessageRecord, applied: Applied,
                    result: JobResult, now: float, mono_now: float) -> None:
    """Histograms: one latency per SMTP transaction, one queue time per recipient
    delivered; each recipient deferred or bounced counted by class."""
    if result.attempt_started and result.mx_host:
        m.delivery_latency.observe(max(0.0, mono_now - result.attempt_started))
    for _ in applied.delivered:
        m.queue_time.observe(max(0.0, now - before.received_at))
    for i in applied.deferred:
        m.count_class("deferred", recipient_class(applied, i, suppressed=False))
    for i in applied.bounced:
        m.count_class("bounced", recipient_class(applied, i, suppressed=result.suppressed))


def log_outcome(dlog: DeliveryLog, before: MessageRecord, applied: Applied, domain: str,
                result: JobResult, now: float, mono_now: float) -> None:
    """One delivery-log line per recipient this outcome decided. A recipient refused
    because it is on the suppression list reads "suppressed"; a message counted toward a
    campaign carries its campaign and tenant."""
    latency = round(mono_now - result.attempt_started, 4) if result.attempt_started else None
    verdicts = dict.fromkeys(applied.delivered, "delivered")
    verdicts.update(dict.fromkeys(applied.deferred, "deferred"))
    for i in applied.bounced:
        verdicts[i] = ("suppressed" if result.suppressed else
                       "expired" if applied.record.recipients[i].state == EXPIRED else "bounced")
    tags = ({"campaign": before.campaign, "tenant": before.tenant}
            if before.campaign or before.tenant else {})
    for i, verdict in sorted(verdicts.items()):
        reply = applied.replies.get(i)
        rcpt = applied.record.recipients[i]
        dlog.write({
            "time": round(now, 3), "id": id_text(before.id), "sender": before.sender,
            "recipient": rcpt.address, "domain": domain, "mx": result.mx_host,
            "ip": result.ip, "tls": result.tls or "none",
            "code": reply.code if reply else None,
            "enhanced": reply.enhanced if reply else "",
            "reply": "\n".join(reply.lines) if reply else "",
            "outcome": verdict,
            "class": "" if verdict == "delivered" else recipient_class(
                applied, i, suppressed=result.suppressed),
            "attempt": rcpt.attempts,
            "queue_time": round(now - before.received_at, 3), "latency": latency,
            **tags,
        })
