"""End of data: what one received transaction writes, as one group-commit op.

The recipients split in two. The feedback address (and its VERP forms) is read here:
its report becomes suppression entries and campaign counts (feedback_intake.py). The
others are queued as one message, with the campaign tags and priority a trusted client
set (campaign_tags.py; Volley-Priority is removed from anyone's message) and the
campaign's `injected` count. Both happen in one op, so in one
commit: the client's 250 means all of it is durable, its 451 that none of it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from engine.errors import VolleyError
from engine.inbound import decisions
from engine.inbound.campaign_tags import take_fields
from engine.inbound.dead_intake import IntakeDeferral, date_for_dead
from engine.inbound.feedback_intake import Report, read_report
from engine.inbound.handover import apply as apply_handover
from engine.inbound.handover import take as take_handover
from engine.observe import log
from engine.queue import campaigns
from engine.queue.ids import id_text
from engine.queue.records import MessageRecord
from engine.queue.writetxn import WriteTxn
from engine.smtp.commands import Rcpt
from engine.smtp.replies import R451_LOCAL_ERROR, Reply
from engine.smtp.server import ServerSession

if TYPE_CHECKING:
    from engine.inbound.context import WorkerContext
    from engine.inbound.policy import Policy

# A report up to this size is parsed on the loop (about 0.2 ms for a usual few-KB
# report); a larger one (up to feedback.MAX_PARSE read, some 30 ms) in the worker's
# executor, so a stream of big reports from the internet cannot stall every session.
INLINE_REPORT = 64 * 1024


class Submission:
    """One transaction's op and what its commit callback needs to answer and log."""

    __slots__ = ("record", "body", "msg_id", "report", "now", "handed_over", "deferred")

    def __init__(self) -> None:
        self.record: MessageRecord | None = None
        self.body = b""
        self.msg_id = ""  # "" when nothing is queued (a report only)
        self.report: Report | None = None
        self.now = time.time()
        # Handed over by another Volley (X-Volley-Handover): its campaign counted the
        # recipients as injected there; counting them again would double the fleet's sum.
        self.handed_over = False
        # Recipients dated at intake to a dead site's backoff end (dead_intake.py).
        self.deferred: list[IntakeDeferral] = []

    def op(self, w: WriteTxn) -> None:
        """Run inside the committer's write transaction."""
        record = self.record
        if record is not None:
            w.put_message(record, self.body)
            deferred = sum(d.recipients for d in self.deferred)
            if not self.handed_over or deferred:
                campaigns.bump(w, record.tenant, record.campaign, now=self.now,
                               injected=0 if self.handed_over else len(record.recipients),
                               deferred=deferred)
        if self.report is not None:
            self.report.apply(w, self.now)


def _feedback(policy: Policy, rcpts: Sequence[Rcpt]) -> list[str]:
    if not policy.feedback_address:
        return []
    return [r.address for r in rcpts if policy.is_feedback(r.address)]


def start(
    ctx: WorkerContext,
    session: ServerSession,
    content: bytes,
    *,
    client_ip: str,
    received: decisions.ReceivedHeader,
    tls_version: str,
    trusted: bool,
    submit: Callable[[Submission], None],
    fail: Callable[[Reply], None],
) -> None:
    """Make the op for the transaction in `session.envelope` with body `content` and
    hand it to `submit`, or a refusal to `fail`; either may run later (a large report
    is parsed off the loop; the session is paused meanwhile, its envelope unchanged).

    `trusted`: the client is in relay.networks or authenticated (its mail is signed and
    its X-Volley-* tags and Volley-Priority count).
    """
    feedback = _feedback(ctx.policy, session.envelope.rcpts)

    def finish(report: Report | None) -> None:
        try:
            submit(_prepare(ctx, session, content, report, client_ip=client_ip,
                            received=received, tls_version=tls_version, trusted=trusted))
        except VolleyError as err:
            fail(getattr(err, "reply", R451_LOCAL_ERROR))

    if not feedback:
        finish(None)
    elif len(content) <= INLINE_REPORT:
        finish(read_report(content, feedback, ctx.cfg))
    else:
        future = ctx.loop.run_in_executor(ctx.executor, read_report, content, feedback, ctx.cfg)

        def parsed(f: object) -> None:
            try:
                report = future.result()
            except Exception as err:  # pragma: no cover - read_report does not raise
                log.error("feedback_read_failed", client=client_ip, error=repr(err))
                fail(R451_LOCAL_ERROR)
                return
            finish(report)

        future.add_done_callback(parsed)


def _prepare(
    ctx: WorkerContext,
    session: ServerSession,
    content: bytes,
    report: Report | None,
    *,
    client_ip: str,
    received: decisions.ReceivedHeader,
    tls_version: str,
    trusted: bool,
) -> Submission:
    """The op: the report's effects, and the message for the other recipients.

    Raises:
        VolleyError: the record cannot be made (see `decisions.queue_record`).
    """
    sub = Submission()
    sub.report = report
    rcpts = session.envelope.rcpts
    policy = ctx.policy
    if report is not None:
        rcpts = [r for r in rcpts if not policy.is_feedback(r.address)]
    if not rcpts:
        return sub
    tags = take_fields(content, client_ip, trusted=trusted)
    handover, content = take_handover(tags.content, client_ip, trusted=trusted)
    raw_id = ctx.ids.next()
    sub.msg_id = id_text(raw_id)
    header = received.render(session, client_ip, ctx.hostname, tls_version, sub.msg_id)
    sub.body = header + content
    record = decisions.queue_record(raw_id, session, len(sub.body), client_ip,
                                    policy.postmaster, rcpts=rcpts)
    # Only mail we vouch for is signed with our keys: from a client we relay for
    # (relay.networks) or one that authenticated.
    record.sign = trusted
    record.campaign, record.tenant = tags.campaign, tags.tenant
    if tags.priority is not None:
        record.priority = tags.priority
    if handover is not None:  # the origin's record: arrival, tags, history (handover.py)
        apply_handover(record, handover)
        sub.handed_over = True
    if ctx.dead_until is not None:
        sub.deferred = date_for_dead(record, ctx.dead_until)
    sub.record = record
    return sub
