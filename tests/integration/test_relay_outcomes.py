"""Per-recipient outcomes end to end: retry then success, expiry (5.4.7), mixed
replies in one transaction, DSN rules (never a bounce of a bounce, NOTIFY=NEVER,
RET=FULL, SMTPUTF8), and the delivery log's fields."""

from __future__ import annotations

from tests.integration.harness import wait_until
from tests.integration.relay_helpers import (
    SENDER,
    Counter,
    Lab,
    body,
    check_dsn,
    dsns,
    lab,  # noqa: F401  (fixture)
    rcpt_of,
    tag_of,
)

ZONE = {
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.2"]},
}


def test_deferred_then_delivered_on_retry(lab: Lab):
    seen = Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and seen.bump(rcpt_of(arg)) == 1:
            return "451 4.7.1 greylisted, try again later"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("retry"))
    lab.wait_sink(sink, 1)
    lines = lab.wait_log(lambda e: e["id"] == qid, 2)
    assert [(e["outcome"], e["attempt"]) for e in lines] == [("deferred", 1), ("delivered", 2)]
    assert lines[0]["code"] == 451 and lines[0]["enhanced"] == "4.7.1"
    assert lines[0]["reply"] == "greylisted, try again later"
    assert lines[1]["code"] == 250
    assert lines[1]["time"] - lines[0]["time"] >= 0.8, "retry after the 1s schedule (±10%)"
    lab.wait_queue_empty()
    assert len(sink.messages) == 1 and not home.messages


def test_always_deferred_expires_with_5_4_7_dsn(lab: Lab):
    sink = lab.sink("127.0.0.2", script=lambda v, a: "451 4.3.0 try later" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start({"delivery": {"max_age": "3s"}})
    qid = lab.send(["bob@dest.test"], body("expire"))
    lab.wait_sink(home, 1, timeout=15)
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bob@dest.test"], status="5.4.7")
    assert "451 4.3.0 try later" in dsn.diagnostics[0]
    lab.wait_queue_empty()
    lines = lab.wait_log(lambda e: e["id"] == qid and e["outcome"] == "expired")
    assert lines[0]["enhanced"] == "5.4.7"
    assert not sink.messages


def test_mixed_replies_in_one_transaction(lab: Lab):
    tries = Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb != "RCPT":
            return None
        rcpt = rcpt_of(arg)
        if rcpt.startswith("bad@"):
            return "550 5.1.1 no such user"
        if rcpt.startswith("later@") and tries.bump(rcpt) == 1:
            return "451 4.2.0 mailbox busy"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    rcpts = ["ok@dest.test", "bad@dest.test", "later@dest.test"]
    qid = lab.send(rcpts, body("mixed"))
    first = lab.wait_log(lambda e: e["id"] == qid, 3)
    assert {e["recipient"]: e["outcome"] for e in first} == {
        "ok@dest.test": "delivered", "bad@dest.test": "bounced", "later@dest.test": "deferred"}
    # The bounce DSN names only the 550 recipient.
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bad@dest.test"], status="5.1.1")
    assert "no such user" in dsn.diagnostics[0]
    # The retry carries only the deferred recipient; the delivered one is never resent.
    lab.wait_log(lambda e: e["id"] == qid and e["recipient"] == "later@dest.test"
                 and e["outcome"] == "delivered")
    lab.wait_queue_empty()
    got = [r for m in sink.messages for r in m.rcpt_tos]
    assert sorted(got) == ["later@dest.test", "ok@dest.test"], got
    assert sink.messages[0].rcpt_tos == ["ok@dest.test"]
    assert sink.messages[1].rcpt_tos == ["later@dest.test"]
    assert len(home.messages) == 1


def test_mixed_replies_leave_only_the_deferred_recipient_pending(lab: Lab):
    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and rcpt_of(arg).startswith("bad@"):
            return "550 5.1.1 no such user"
        if verb == "RCPT" and rcpt_of(arg).startswith("later@"):
            return "451 4.2.0 mailbox busy"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start({"delivery": {"retry": "1m"}})  # no retry during the test
    qid = lab.send(["ok@dest.test", "bad@dest.test", "later@dest.test"], body("mixed2"))
    lab.wait_log(lambda e: e["id"] == qid, 3)
    lab.wait_sink(home, 1)
    records = lab.records()
    record = records[qid]
    assert [r.state for r in record.recipients] == [1, 2, 0]  # DELIVERED, BOUNCED, PENDING
    assert record.recipients[2].attempts == 1
    assert record.recipients[2].last_reply.startswith("451 4.2.0")
    assert len(records) == 1, "the DSN itself was delivered and removed"
    assert len(sink.messages) == 1


def test_no_bounce_of_a_bounce(lab: Lab):
    sink = lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("null-sender"), sender="")
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert line["outcome"] == "bounced" and line["sender"] == ""
    lab.wait_queue_empty()
    assert not home.messages and home.connections == 0
    assert not sink.messages


def test_notify_never_gets_no_dsn(lab: Lab):
    lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("never"), rcpt_params="NOTIFY=NEVER")
    lab.wait_log(lambda e: e["id"] == qid and e["outcome"] == "bounced")
    lab.wait_queue_empty()
    assert not home.messages and home.connections == 0


def test_ret_full_returns_the_whole_message(lab: Lab):
    lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    lab.send(["bob@dest.test"], body("full"), mail_params="RET=FULL ENVID=env-42",
             rcpt_params="NOTIFY=FAILURE ORCPT=rfc822;bob@dest.test")
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bob@dest.test"], status="5.1.1")
    assert dsn.content_types == ["text/plain", "message/delivery-status", "message/rfc822"]
    assert b"body of full" in dsn.raw
    assert "Original-Envelope-Id: env-42" in dsn.status_text
    assert "Original-Recipient: rfc822; bob@dest.test" in dsn.status_text
    lab.wait_queue_empty()


def test_default_ret_returns_headers_only(lab: Lab):
    lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    lab.send(["bob@dest.test"], body("hdrs"))
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    assert dsn.content_types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert b"X-Test-Id: hdrs" in dsn.raw and b"body of hdrs" not in dsn.raw
    lab.wait_queue_empty()


def test_smtputf8_message_to_a_host_without_smtputf8_bounces_5_6_7(lab: Lab):
    sink = lab.sink("127.0.0.2")  # the sink never offers SMTPUTF8
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["jörg@dest.test"], body("utf8"), mail_params="SMTPUTF8")
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert (line["outcome"], line["enhanced"]) == ("bounced", "5.6.7"), line
    assert line["recipient"] == "jörg@dest.test"
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    assert dsn.msg.get_param("report-type") == "global-delivery-status"
    assert "jörg@dest.test" in dsn.status_text
    assert dsn.statuses == ["5.6.7"]
    assert not any(v in ("MAIL", "RCPT") for v, _ in sink.commands)
    lab.wait_queue_empty()


def test_delivery_log_fields(lab: Lab):
    lab.sink("127.0.0.2", script=lambda v, a: "250 2.0.0 Ok: queued as ABC123" if v == "." else None)
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("fields"))
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    expected = {"time", "id", "sender", "recipient", "domain", "mx", "ip", "tls", "code",
                "enhanced", "reply", "outcome", "attempt", "queue_time", "latency"}
    assert expected <= set(line), sorted(line)
    assert line["id"] == qid
    assert line["sender"] == SENDER and line["recipient"] == "bob@dest.test"
    assert line["domain"] == "dest.test" and line["mx"] == "mx.dest.test"
    assert line["ip"] == "127.0.0.2" and line["tls"] == "none"
    assert (line["code"], line["enhanced"]) == (250, "2.0.0")
    assert line["reply"] == "Ok: queued as ABC123"
    assert line["outcome"] == "delivered" and line["attempt"] == 1
    assert 0 <= line["queue_time"] < 10
    assert isinstance(line["latency"], float) and 0 <= line["latency"] < 10
    lab.wait_queue_empty()


def test_the_dsn_goes_through_the_queue_and_is_logged(lab: Lab):
    lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("dsn-queue"))
    lab.wait_sink(home, 1)
    # The DSN is a queued message of its own: it has its own log line, null sender.
    [dsn_line] = lab.wait_log(lambda e: e["id"] != qid)
    assert dsn_line["sender"] == "" and dsn_line["recipient"] == SENDER
    assert dsn_line["outcome"] == "delivered" and dsn_line["domain"] == "home.test"
    assert tag_of(home.messages[0].data) == "dsn-queue"
    lab.wait_queue_empty()
    wait_until(lambda: len(lab.log()) == 2, 5, "two log lines")


def test_undeliverable_dsn_is_dropped_not_bounced(lab: Lab):
    """The sender's own domain does not exist: the DSN (null sender) bounces in turn and
    nothing else is generated; the queue empties."""
    lab.sink("127.0.0.2", script=lambda v, a: "550 5.1.1 no such user" if v == "RCPT" else None)
    dns = lab.zone(ZONE, home=False)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("double"), sender="ghost@vanished.test")
    lines = lab.wait_log(lambda e: e["outcome"] == "bounced", 2)
    first, second = lines
    assert first["id"] == qid and first["recipient"] == "bob@dest.test"
    assert second["sender"] == "" and second["recipient"] == "ghost@vanished.test"
    assert second["enhanced"] == "5.1.2"
    lab.wait_queue_empty()
    assert len(lab.log()) == 2
    assert dns.count("vanished.test", "MX") >= 1


def test_notify_delay_gets_one_delay_dsn_then_the_message_is_delivered(lab: Lab):
    """RFC 3461 NOTIFY=DELAY: one "delayed" report once the message has waited
    delivery.delay_warning, however many deferrals follow; then normal delivery."""
    tries = Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and tries.bump(rcpt_of(arg)) <= 4:
            return "451 4.3.0 busy, try later"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start({"delivery": {"delay_warning": "1s"}})
    qid = lab.send(["bob@dest.test"], body("delay"), rcpt_params="NOTIFY=DELAY,FAILURE")
    lab.wait_sink(sink, 1, timeout=30)
    lines = lab.wait_log(lambda e: e["id"] == qid and e["outcome"] == "delivered")
    assert lines and lines[0]["attempt"] == 5
    lab.wait_queue_empty()
    [dsn] = dsns(home)  # exactly one report for four deferrals
    assert dsn.mail_from == "" and "Action: delayed" in dsn.status_text
    check_dsn(dsn, to=SENDER, recipients=["bob@dest.test"], status="4.3.0")
    assert "Will-Retry-Until:" in dsn.status_text
