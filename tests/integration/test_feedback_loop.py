"""The feedback loop over real SMTP into a real queue: complaints (ARF) and late bounces
(DSNs) sent to the feedback address, from a trusted client and from one on the internet,
become suppression entries and campaign counts; the report itself is never queued or
relayed; other recipients of the same transaction are queued as usual; X-Volley-*
campaign tags on SMTP mail count toward a campaign."""

from __future__ import annotations

from typing import Any

import pytest

from engine.mail import verp
from engine.queue.ids import id_text
from tests.feedback_reports import arf, dsn, original
from tests.integration.feedback_helpers import (
    CAMPAIGN,
    FBL,
    FEEDBACK,
    TENANT,
    UNTRUSTED,
    counts,
    events,
    report,
    sent_to,
    suppressed,
    token,
    transaction,
)
from tests.integration.harness import merge
from tests.integration.relay_helpers import Lab
from tests.integration.relay_helpers import lab as lab  # noqa: F401  (fixture)

ANN, BOB, CARL, DORA = (
    "ann@example.org", "robert.builder@mail.example.org", "carl@example.net", "dora@example.net")
UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown in virtual mailbox table"


def _send_the_reports(port: int) -> list[tuple[int, str]]:
    """A day of feedback for campaign spring-2026 of tenant acme."""
    bob_verp = verp.verp_address(FBL, token(BOB))
    carl_verp = verp.verp_address(FBL, token(CARL)).upper()  # a receiver that upper-cases
    return [
        # Yahoo-style complaint: recipient redacted, only our Message-ID names Ann.
        report(port, FBL, arf(FBL, original("redacted@yahoo.example",
                                            message_id=sent_to(ANN)["Message-ID"]),
                              headers_only=True)),
        # Postfix: a late 5.1.1 to Bob's VERP return path (over 64 octets of local part).
        report(port, bob_verp, dsn(bob_verp, sent_to(BOB), [(BOB, "failed", "5.1.1", UNKNOWN.format(BOB))])),
        # Gmail-style: a policy refusal (not a suppressing code) with the whole message.
        report(port, carl_verp, dsn(carl_verp, sent_to(CARL),
                                    [(CARL, "failed", "5.7.1", "550 5.7.1 Message rejected as spam")],
                                    headers_only=False)),
        # Still trying: logged only.
        report(port, FBL, dsn(FBL, sent_to(DORA), [(DORA, "delayed", "4.4.1", "")])),
        # Not a report at all: read and dropped all the same.
        report(port, FBL.upper(), b"Subject: out of office\r\n\r\nI am away.\r\n"),
    ]


@pytest.mark.parametrize("client", ["trusted", "internet"])
def test_reports_become_suppressions_and_counts(inbound: Any, capsys: Any, client: str) -> None:
    server = inbound(merge(FEEDBACK, UNTRUSTED) if client == "internet" else FEEDBACK)
    assert len(verp.verp_address(FBL, token(BOB)).partition("@")[0]) > 64
    replies = _send_the_reports(server.port)
    assert all(code == 250 and "report read" in text for code, text in replies), replies

    complaint = suppressed(server, ANN, TENANT)
    assert (complaint.reason, complaint.tenant) == ("complaint", TENANT)
    assert suppressed(server, ANN) is None  # a complaint is about this tenant's mail
    bounce = suppressed(server, BOB)
    assert (bounce.reason, bounce.tenant, bounce.value) == ("bounce", "", BOB)
    assert "5.1.1" in bounce.source
    assert suppressed(server, CARL, TENANT) is None and suppressed(server, DORA, TENANT) is None

    c = counts(server)
    assert (c.complained, c.bounced, c.bounced_by_class) == (1, 2, {"bad_mailbox": 1, "spam_block": 1})
    assert c.injected == 0 and c.delivered == 0
    assert server.queued() == 0  # nothing was queued: reports are read, not relayed

    logged = [(e["event"], e.get("recipient"), e.get("status")) for e in events(capsys.readouterr().err)]
    assert sorted(logged) == sorted([
        ("feedback_complaint", ANN, ""), ("feedback_bounce", BOB, "5.1.1"),
        ("feedback_bounce", CARL, "5.7.1"), ("feedback_delay", DORA, "4.4.1"),
        ("feedback_unparsed", None, None)])


def test_auto_suppression_off_still_counts(inbound: Any) -> None:
    server = inbound(merge(FEEDBACK, {"suppression": {"auto_bounce": False, "auto_complaint": False}}))
    report(server.port, FBL, arf(FBL, sent_to(ANN)))
    report(server.port, FBL, dsn(FBL, sent_to(BOB), [(BOB, "failed", "5.1.1", UNKNOWN.format(BOB))]))
    assert suppressed(server, ANN, TENANT) is None and suppressed(server, BOB) is None
    c = counts(server)
    assert (c.complained, c.bounced) == (1, 1)


def test_the_internet_may_report_but_not_relay(inbound: Any) -> None:
    server = inbound(merge(FEEDBACK, UNTRUSTED))
    replies = transaction(server.port, ["someone@elsewhere.example", "fbl@other.example", FBL],
                          arf(FBL, sent_to(ANN)))
    assert [c for c, _ in replies] == [250, 554, 554, 250, 354, 250], replies
    assert suppressed(server, ANN, TENANT) is not None


def test_a_mixed_transaction_queues_only_the_ordinary_recipient(inbound: Any, capsys: Any) -> None:
    server = inbound(FEEDBACK)
    data = dsn(FBL, sent_to(BOB), [(BOB, "failed", "5.1.1", UNKNOWN.format(BOB))])
    replies = transaction(server.port, [verp.verp_address(FBL, token(BOB)), "postmaster@example.com"],
                          data, sender="mailer-daemon@example.com")
    code, text = replies[-1]
    assert code == 250 and "queued as" in text, replies
    records = server.call(lambda: [server.store.get(i) for i in server.store.iter_ids()])
    assert [[r.address for r in rec.recipients] for rec in records] == [["postmaster@example.com"]]
    assert id_text(records[0].id) in text
    assert suppressed(server, BOB) is not None
    assert counts(server).bounced == 1
    assert [e["event"] for e in events(capsys.readouterr().err)] == ["feedback_bounce"]


def test_a_report_is_never_relayed(lab: Lab) -> None:
    # The feedback domain has a real MX (the sink): a report to it must still stay here.
    sink = lab.sink("127.0.0.2")
    lab.zone({"bounces.volley.test": {"MX": [(10, "mx.bounces.volley.test")]},
              "mx.bounces.volley.test": {"A": ["127.0.0.2"]}})
    server = lab.start(FEEDBACK)
    report(server.port, FBL, arf(FBL, sent_to(ANN)))
    report(server.port, verp.verp_address(FBL, token(BOB)),
           dsn(FBL, sent_to(BOB), [(BOB, "failed", "5.1.1", UNKNOWN.format(BOB))]))
    # An ordinary message to the same domain, sent after the reports, is delivered:
    # when it has arrived, anything queued before it would have had its chance.
    lab.send(["abuse@bounces.volley.test"], b"Subject: hello\r\n\r\nhi\r\n")
    lab.wait_sink(sink, 1)
    lab.wait_queue_empty()
    assert [m.rcpt_tos for m in sink.messages] == [["abuse@bounces.volley.test"]]


# --- X-Volley-Campaign / X-Volley-Tenant on SMTP mail ------------------------------------

def _tagged(campaign: str, tenant: str) -> bytes:
    return (f"From: <news@volley.test>\r\nX-Volley-Campaign: {campaign}\r\nSubject: hi\r\n"
            f"X-Volley-Tenant:\r\n {tenant}\r\nTo: <a@example.org>\r\n\r\nbody\r\n").encode()


def _records(server: Any) -> list[Any]:
    return server.call(lambda: [(server.store.get(i), server.store.get_body(i))
                                for i in server.store.iter_ids()])


def test_a_trusted_client_tags_its_mail(inbound: Any) -> None:
    server = inbound()
    replies = transaction(server.port, ["a@example.org", "b@example.org"], _tagged(CAMPAIGN, TENANT),
                          sender="news@volley.test")
    assert replies[-1][0] == 250, replies
    [(record, body)] = _records(server)
    assert (record.campaign, record.tenant) == (CAMPAIGN, TENANT)
    assert b"X-Volley" not in body and b"Subject: hi\r\nTo: <a@example.org>\r\n\r\nbody\r\n" in body
    assert counts(server).injected == 2


def test_a_bad_tag_is_ignored_and_still_removed(inbound: Any, capsys: Any) -> None:
    server = inbound()
    transaction(server.port, ["a@example.org"], _tagged("spring 2026!", TENANT), sender="n@volley.test")
    [(record, body)] = _records(server)
    assert (record.campaign, record.tenant) == ("", TENANT)
    assert b"X-Volley" not in body
    [line] = events(capsys.readouterr().err, "campaign_tag_ignored")
    assert line["field"] == "x-volley-campaign"


def test_an_untrusted_clients_tags_mean_nothing(inbound: Any) -> None:
    server = inbound(merge(UNTRUSTED, {"relay": {"local_domains": ["example.org"]}}))
    replies = transaction(server.port, ["a@example.org"], _tagged(CAMPAIGN, TENANT), sender="n@x.test")
    assert replies[-1][0] == 250, replies
    [(record, body)] = _records(server)
    assert (record.campaign, record.tenant) == ("", "")
    assert f"X-Volley-Campaign: {CAMPAIGN}".encode() in body
    assert counts(server) is None


def test_a_large_report_is_read_too(inbound: Any) -> None:
    # Over enqueue.INLINE_REPORT: parsed in the worker's executor, then committed.
    server = inbound(merge(FEEDBACK, UNTRUSTED))
    big = sent_to(BOB)
    big.set_content(("newsletter text " * 5 + "\n") * 20_000)
    data = dsn(FBL, big, [(BOB, "failed", "5.1.1", UNKNOWN.format(BOB))], headers_only=False)
    assert len(data) > 1_000_000
    assert report(server.port, FBL, data) == (250, "2.0.0 OK report read")
    assert suppressed(server, BOB).reason == "bounce"
    assert counts(server).bounced == 1
