"""The delivery side of the newsletter: the suppression list is checked again just
before sending, a hard bounce puts the mailbox on the list, and every outcome is
counted toward the message's campaign, checked against what the sink saw.

Messages are put straight into the queue with a campaign and tenant (the way the HTTP
API and tagged SMTP mail arrive), so only the scheduler's side is under test here.
"""

from __future__ import annotations

import time
from typing import Any

from engine.queue import suppression
from engine.queue.ids import id_text
from engine.queue.records import MessageRecord, Recipient
from tests.integration.harness import InboundServer, wait_until
from tests.integration.relay_helpers import (
    SENDER,
    Counter,
    Lab,
    body,
    check_dsn,
    dsns,
    lab,  # noqa: F401  (fixture)
    rcpt_of,
)

ZONE = {
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.2"]},
}


def queue_campaign_mail(server: InboundServer, rcpts: list[str], *, campaign: str,
                        tenant: str = "", tag: str = "campaign") -> str:
    """Queue one message to `rcpts` counted toward `campaign`; returns its queue id text."""
    data = body(tag)

    async def make() -> MessageRecord:
        return MessageRecord(id=server.runtime.ctx.ids.next(), sender=SENDER,
                             recipients=[Recipient(r) for r in rcpts], received_at=time.time(),
                             size=len(data), campaign=campaign, tenant=tenant)

    record: MessageRecord = server.call(make())
    server.commit(lambda w: w.put_message(record, data))
    server.call(lambda: server.runtime.delivery.scheduler.wake())
    return id_text(record.id)


def suppress(server: InboundServer, address: str, tenant: str = "", reason: str = "manual") -> None:
    entry = suppression.Suppression(value=address, kind="address", reason=reason, source="test",
                                    created=time.time(), tenant=tenant)
    server.commit(lambda w: suppression.add(w, [entry]))


def counts(server: InboundServer, campaign: str, tenant: str = "") -> Any:
    return server.call(lambda: server.store.campaign(tenant, campaign))


def test_an_address_suppressed_after_acceptance_is_not_mailed(lab: Lab):
    sink = lab.sink("127.0.0.2")
    home = lab.home_sink()
    lab.zone(ZONE)
    server = lab.start()
    suppress(server, "bob@dest.test")
    qid = queue_campaign_mail(server, ["bob@dest.test", "carol@dest.test"], campaign="spring")
    lab.wait_sink(sink, 1)
    lab.wait_sink(home, 1)
    lab.wait_queue_empty()
    [msg] = sink.messages
    assert msg.rcpt_tos == ["carol@dest.test"], "the suppressed recipient never reached the wire"
    lines = {e["recipient"]: e for e in lab.wait_log(lambda e: e["id"] == qid, 2)}
    assert lines["bob@dest.test"]["outcome"] == "suppressed"
    assert (lines["bob@dest.test"]["code"], lines["bob@dest.test"]["enhanced"]) == (550, "5.7.1")
    assert lines["carol@dest.test"]["outcome"] == "delivered"
    assert {e["campaign"] for e in lines.values()} == {"spring"}
    # The sender still hears about the recipient it will not reach (RFC 5321 §6.1).
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bob@dest.test"], status="5.7.1")
    c = counts(server, "spring")
    assert (c.delivered, c.suppressed, c.bounced) == (len(sink.messages), 1, 0)


def test_a_tenant_entry_holds_only_for_that_tenant(lab: Lab):
    sink = lab.sink("127.0.0.2")
    lab.home_sink()
    lab.zone(ZONE)
    server = lab.start()
    suppress(server, "bob@dest.test", tenant="acme")
    queue_campaign_mail(server, ["bob@dest.test"], campaign="a", tenant="acme", tag="acme")
    queue_campaign_mail(server, ["bob@dest.test"], campaign="b", tenant="other", tag="other")
    lab.wait_sink(sink, 1)
    lab.wait_queue_empty()
    assert [m.rcpt_tos for m in sink.messages] == [["bob@dest.test"]]
    assert b"X-Test-Id: other" in sink.messages[0].data
    assert counts(server, "a", "acme").suppressed == 1
    assert counts(server, "b", "other").delivered == 1


def test_a_hard_bounce_suppresses_the_mailbox_and_counts_by_class(lab: Lab):
    seen = Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb != "RCPT":
            return None
        rcpt = rcpt_of(arg)
        if rcpt.startswith("gone@"):
            return "550 5.1.1 no such user"
        if rcpt.startswith("spam@"):
            return "550 5.7.1 message refused by policy"
        if rcpt.startswith("grey@") and seen.bump(rcpt) == 1:
            return "451 4.7.1 greylisted"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    lab.home_sink()
    lab.zone(ZONE)
    server = lab.start({"delivery": {"retry": "1s"}})
    rcpts = ["gone@dest.test", "spam@dest.test", "grey@dest.test", "ok@dest.test"]
    queue_campaign_mail(server, rcpts, campaign="news", tenant="acme")
    lab.wait_queue_empty()
    got = sorted(r for m in sink.messages for r in m.rcpt_tos)
    assert got == ["grey@dest.test", "ok@dest.test"]
    c = counts(server, "news", "acme")
    assert (c.delivered, c.deferred, c.bounced) == (2, 1, 2)
    assert c.bounced_by_class == {"bad_mailbox": 1, "policy": 1}
    # A mailbox that does not exist is gone for every tenant: the shared list.
    gone = server.call(lambda: server.store.suppressed("gone@dest.test", ""))
    assert gone is not None and gone.reason == "bounce" and "5.1.1" in gone.source
    assert gone.tenant == ""
    # A policy refusal is about the message, not the mailbox: not suppressed.
    assert server.call(lambda: server.store.suppressed("spam@dest.test", "acme")) is None


def test_auto_suppression_can_be_turned_off(lab: Lab):
    lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    lab.home_sink()
    lab.zone(ZONE)
    server = lab.start({"suppression": {"auto_bounce": False}})
    queue_campaign_mail(server, ["gone@dest.test"], campaign="x")
    wait_until(lambda: (c := counts(server, "x")) is not None and c.bounced == 1, 20, "bounce counted")
    assert server.call(lambda: server.store.suppressed("gone@dest.test")) is None
