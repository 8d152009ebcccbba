"""The inbound side of the feedback loop, and suppression at RCPT.

Mail to the feedback address (or its VERP form local+TOKEN@domain) is read, never
relayed: its complaints (ARF) and late bounces (DSNs) become suppression entries and
campaign counts, written in the same commit as the transaction's other recipients'
message. What a report says is trusted as far as RFC 5965 and RFC 3464 let it be: the
receiver is not authenticated, so a forged report can stop mail to someone (never
send it); each entry is logged with what caused it, and an operator can remove it.

The report itself is not kept: it may quote the whole message, someone else's mail,
and everything it says that Volley acts on is in the log lines and the counters. A
report that parses to nothing is still taken (250) and logged (`feedback_unparsed`),
so the reporter does not retry it for days.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from engine.config import Config
from engine.mail import verp
from engine.mail.bounce_class import policy_for
from engine.mail.feedback import FeedbackEvent, parse_feedback
from engine.observe import log
from engine.queue import campaigns, suppression
from engine.queue.suppression import Suppression
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply

if TYPE_CHECKING:
    from engine.queue.store import QueueStore

_CODE = re.compile(r"([245]\d\d)\b")


def rcpt_refusal(store: QueueStore | None, address: str) -> Reply | None:
    """550 5.7.1 for a recipient on the shared (tenant "") suppression list: RFC 3463
    X.7.1, delivery not authorized. The tenant is not known before DATA (it travels in
    X-Volley-Tenant), so a tenant's own entries are applied at delivery."""
    if store is None or "@" not in address:
        return None
    try:
        entry = store.suppressed(address)
    except Exception as err:  # a read that fails must not refuse mail: delivery checks again
        log.error("suppression_lookup_failed", address=address, error=repr(err))
        return None
    if entry is None:
        return None
    return Reply(550, "5.7.1", f"<{address}>: recipient is suppressed ({entry.reason})")


class Report:
    """What the reports of one transaction do: suppression entries and counter bumps
    (applied inside the transaction's commit) and the log lines (after it)."""

    __slots__ = ("events", "entries", "bumps", "size")

    def __init__(self, events: list[FeedbackEvent], size: int) -> None:
        self.events = events
        self.size = size
        self.entries: list[Suppression] = []
        self.bumps: list[tuple[str, str, int, dict[str, int]]] = []

    def apply(self, w: WriteTxn, now: float) -> None:
        """Inside the commit's write transaction."""
        if self.entries:
            suppression.add(w, self.entries)
        for tenant, campaign, complained, bounced in self.bumps:
            campaigns.bump(w, tenant, campaign, now=now, complained=complained,
                           bounced=bounced or None)

    def log(self, client_ip: str) -> None:
        """After the commit: one line per event."""
        if not self.events:
            log.warning("feedback_unparsed", client=client_ip, size=self.size)
        for e in self.events:
            name = {"complaint": "feedback_complaint", "bounce": "feedback_bounce"}.get(
                e.kind, "feedback_delay")
            log.info(name, client=client_ip, recipient=e.recipient, campaign=e.campaign,
                     tenant=e.tenant, status=e.status, diagnostic=e.diagnostic)


def read_report(content: bytes, rcpts: Iterable[str], cfg: Config,
                now: float | None = None) -> Report:
    """Parse the report sent to `rcpts` (the transaction's feedback recipients) and
    decide what it does under `cfg.suppression`."""
    now = time.time() if now is None else now
    tokens = {verp.token_of_address(cfg.feedback.address, r) for r in rcpts}
    events: dict[FeedbackEvent, None] = {}
    for token in sorted(tokens, key=lambda t: t or ""):
        events.update(dict.fromkeys(parse_feedback(content, token=token)))
    report = Report([_named(e) for e in events], len(content))
    rules = cfg.suppression
    for e in report.events:
        if e.kind == "complaint":
            if rules.auto_complaint:
                # A complaint is about the sender who mailed: the tenant's own list.
                _add(report, e.recipient, "complaint", "complaint (ARF)", e.tenant, now)
            report.bumps.append((e.tenant, e.campaign, 1, {}))
        elif e.kind == "bounce":
            code = _CODE.match(e.diagnostic)
            # The same rules as a reply on the delivery path (engine/mail/bounce_rules.py).
            bounces = policy_for(cfg)
            cls = bounces.classify(int(code.group(1)) if code else 0, e.status, e.diagnostic)
            if rules.auto_bounce and (e.status in rules.codes or bounces.suppresses(cls)):
                # A mailbox that does not exist does not exist for anyone: shared list.
                _add(report, e.recipient, "bounce", e.diagnostic or e.status, "", now)
            report.bumps.append((e.tenant, e.campaign, 0, {cls: 1}))
    return report


def _named(e: FeedbackEvent) -> FeedbackEvent:
    """The event with its campaign and tenant dropped when they cannot be counter
    names (a token is only base32: anyone can make one)."""
    try:
        campaigns.campaign_key(e.tenant, e.campaign)
        suppression.check_tenant(e.tenant)
    except ValueError:
        return FeedbackEvent(e.kind, e.recipient, e.status, e.diagnostic)
    return e


def _add(report: Report, recipient: str, reason: str, source: str, tenant: str,
         now: float) -> None:
    try:
        report.entries.append(suppression.make(recipient, reason, source=source[:200],
                                               created=now, tenant=tenant))
    except ValueError as err:  # checked here, so the commit itself cannot fail on it
        log.warning("feedback_not_suppressed", recipient=recipient[:200], error=str(err))
