"""parse_feedback (engine/mail/feedback.py): ARF complaints and DSNs as receivers send
them, who they are about (RCPT token > Message-ID token > the report's own fields), and
that nothing a peer sends makes it raise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.mail import verp
from engine.mail.feedback import MAX_PARSE, FeedbackEvent, parse_feedback
from tests.feedback_reports import arf, dsn, original

FBL = "fbl@bounces.volley.example"
ANN = "ann@example.org"
TOKEN = verp.encode_token(ANN, "spring", "acme")
OURS = original(ANN, message_id=verp.message_id(TOKEN, "mx.volley.example"))
FOREIGN = original(ANN, message_id="<CAF00.1234@mail.example>")
USER_UNKNOWN = "550 5.1.1 <ann@example.org>: Recipient address rejected: User unknown"


def test_yahoo_style_complaint_with_the_recipient_redacted() -> None:
    # No Original-Rcpt-To, To: redacted: only our Message-ID's token says who.
    report = arf(FBL, original("redacted@yahoo.example", message_id=OURS["Message-ID"]),
                 headers_only=True)
    assert parse_feedback(report) == [FeedbackEvent("complaint", ANN, campaign="spring", tenant="acme")]


def test_complaint_with_the_whole_message_and_original_rcpt_to() -> None:
    report = arf(FBL, FOREIGN, rcpt_to="Bob@Example.org")
    assert parse_feedback(report) == [FeedbackEvent("complaint", "Bob@Example.org")]


def test_complaint_names_the_returned_to_when_nothing_else_does() -> None:
    assert parse_feedback(arf(FBL, FOREIGN)) == [FeedbackEvent("complaint", ANN)]


def test_complaint_token_in_original_mail_from() -> None:
    report = arf(FBL, FOREIGN, mail_from=verp.verp_address(FBL, TOKEN), rcpt_to="x@example.org")
    assert parse_feedback(report) == [FeedbackEvent("complaint", ANN, campaign="spring", tenant="acme")]


def test_the_rcpt_token_wins_over_everything() -> None:
    other = verp.encode_token("zed@example.net", "autumn")
    report = arf(FBL, OURS, rcpt_to="x@example.org")
    assert parse_feedback(report, token=other) == [
        FeedbackEvent("complaint", "zed@example.net", campaign="autumn")]
    # A token that is not ours falls through to the Message-ID.
    assert parse_feedback(report, token="notatoken")[0].recipient == ANN


def test_not_spam_and_auth_failure_are_not_complaints() -> None:
    assert parse_feedback(arf(FBL, OURS, feedback_type="not-spam")) == []
    assert parse_feedback(arf(FBL, OURS, feedback_type="auth-failure")) == []


def test_postfix_dsn_with_returned_headers() -> None:
    report = dsn(FBL, OURS, [(ANN, "failed", "5.1.1", USER_UNKNOWN)])
    assert parse_feedback(report) == [
        FeedbackEvent("bounce", ANN, "5.1.1", USER_UNKNOWN, "spring", "acme")]


def test_gmail_style_dsn_with_the_message_and_several_recipients() -> None:
    report = dsn(FBL, FOREIGN, [
        ("bob@example.org", "failed", "5.2.1", "550 5.2.1 The email account is disabled"),
        ("carl@example.org", "delayed", "4.4.1", ""),
        ("dora@example.org", "delivered", "2.0.0", ""),
        ("eve@example.org", "failed", "", "554 rejected"),
    ], headers_only=False)
    assert parse_feedback(report) == [
        FeedbackEvent("bounce", "bob@example.org", "5.2.1", "550 5.2.1 The email account is disabled"),
        FeedbackEvent("delay", "carl@example.org", "4.4.1"),
        FeedbackEvent("bounce", "eve@example.org", "", "554 rejected"),
    ]


def test_a_literal_dsn_as_an_mta_writes_it() -> None:
    report = (
        b"From: MAILER-DAEMON@mx.example.net\r\nTo: fbl@bounces.volley.example\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="B0"\r\n\r\n'
        b"--B0\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n\r\n"
        b"--B0\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.net\r\n\r\n"
        b"Final-Recipient: rfc822; frank@example.net\r\nOriginal-Recipient: rfc822;Frank@Example.NET\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <frank@example.net>:\r\n    unknown user\r\n\r\n"
        b"--B0\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <x@y>\r\nTo: frank@example.net\r\n\r\n"
        b"--B0--\r\n")
    assert parse_feedback(report) == [FeedbackEvent(
        "bounce", "Frank@Example.NET", "5.1.1", "550 5.1.1 <frank@example.net>: unknown user")]


def test_what_is_not_a_report_gives_nothing() -> None:
    assert parse_feedback(b"") == []
    assert parse_feedback(OURS.as_bytes()) == []  # a plain message, our token or not
    assert parse_feedback(b"Content-Type: multipart/report; report-type=disposition-notification;"
                          b" boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n") == []
    assert parse_feedback(b"Content-Type: multipart/report; boundary=x\r\n\r\nno parts") == []


def test_a_huge_report_is_read_only_as_far_as_it_matters() -> None:
    big = original(ANN, message_id=OURS["Message-ID"])
    big.set_content(("x" * 80 + "\n") * (3 * MAX_PARSE // 81))
    report = dsn(FBL, big, [(ANN, "failed", "5.1.1", USER_UNKNOWN)], headers_only=False)
    assert len(report) > 2 * MAX_PARSE
    assert [e.recipient for e in parse_feedback(report)] == [ANN]


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(content: bytes) -> None:
    assert isinstance(parse_feedback(content), list)


_HEAD = st.sampled_from([
    b'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n',
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n',
])
_PART = st.sampled_from([
    b"--b\r\nContent-Type: message/feedback-report\r\n\r\n",
    b"--b\r\nContent-Type: message/delivery-status\r\n\r\n",
    b"--b\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n",
    b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\n",
    b"--b\r\nContent-Type: message/rfc822\r\n\r\n",
    b"--b--\r\n", b"Action: failed\r\n", b"Final-Recipient: rfc822; a@b\r\n", b"Status: 5.1.1\r\n",
    b"Original-Rcpt-To: <a@b>\r\n", b"Message-ID: <" + TOKEN.encode() + b".1@h>\r\n", b"\r\n",
])


@settings(max_examples=300)
@given(_HEAD, st.lists(st.one_of(_PART, st.binary(max_size=40)), max_size=20))
def test_report_shaped_garbage_never_raises(head: bytes, parts: list[bytes]) -> None:
    for event in parse_feedback(head + b"".join(parts)):
        assert event.kind in ("complaint", "bounce", "delay") and "@" in event.recipient
