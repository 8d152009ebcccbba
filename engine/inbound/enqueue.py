"""End of data: what one received transaction writes, as one group-commit op.

The recipients split in two. The feedback address (and its VERP forms) is read here:
its report becomes suppression entries and campaign counts (feedback_intake.py). The
others are queued as one message, with the campaign tags a trusted client set
(campaign_tags.py) and the campaign's `injected` count. Both happen in one op, so in one
commit: the client's 250 means all of it is durable, its 451 that none of it is.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engine.inbound import decisions
from engine.inbound.campaign_tags import take_tags
from engine.inbound.feedback_intake import Report, read_report
from engine.queue import campaigns
from engine.queue.ids import id_text
from engine.queue.records import MessageRecord
from engine.queue.writetxn import WriteTxn
from engine.smtp.server import ServerSession

if TYPE_CHECKING:
    from engine.inbound.context import WorkerContext


class Submission:
    """One transaction's op and what its commit callback needs to answer and log."""

    __slots__ = ("record", "body", "msg_id", "report", "now")

    def __init__(self) -> None:
        self.record: MessageRecord | None = None
        self.body = b""
        self.msg_id = ""  # "" when nothing is queued (a report only)
        self.report: Report | None = None
        self.now = time.time()

    def op(self, w: WriteTxn) -> None:
        """Run inside the committer's write transaction."""
        record = self.record
        if record is not None:
            w.put_message(record, self.body)
            campaigns.bump(w, record.tenant, record.campaign, now=self.now,
                           injected=len(record.recipients))
        if self.report is not None:
            self.report.apply(w, self.now)


def prepare(
    ctx: WorkerContext,
    session: ServerSession,
    content: bytes,
    *,
    client_ip: str,
    received: decisions.ReceivedHeader,
    tls_version: str,
    trusted: bool,
) -> Submission:
    """The op for the transaction in `session.envelope` with body `content`.

    `trusted`: the client is in relay.networks or authenticated (its mail is signed and
    its X-Volley-* tags count).

    Raises:
        VolleyError: the record cannot be made (see `decisions.queue_record`).
    """
    sub = Submission()
    policy = ctx.policy
    rcpts = session.envelope.rcpts
    if policy.feedback_address:
        feedback = [r.address for r in rcpts if policy.is_feedback(r.address)]
        if feedback:
            sub.report = read_report(content, feedback, ctx.cfg, sub.now)
            rcpts = [r for r in rcpts if not policy.is_feedback(r.address)]
    if not rcpts:
        return sub
    campaign = tenant = ""
    if trusted:
        campaign, tenant, content = take_tags(content, client_ip)
    raw_id = ctx.ids.next()
    sub.msg_id = id_text(raw_id)
    header = received.render(session, client_ip, ctx.hostname, tls_version, sub.msg_id)
    sub.body = header + content
    record = decisions.queue_record(raw_id, session, len(sub.body), client_ip,
                                    policy.postmaster, rcpts=rcpts)
    # Only mail we vouch for is signed with our keys: from a client we relay for
    # (relay.networks) or one that authenticated.
    record.sign = trusted
    record.campaign, record.tenant = campaign, tenant
    sub.record = record
    return sub
