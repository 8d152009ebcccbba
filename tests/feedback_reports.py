"""Feedback reports as receivers send them, built with the email package: ARF complaints
(RFC 5965) the way Yahoo's and Microsoft's feedback loops shape them, and DSNs (RFC 3464)
the way Postfix and Gmail do. Shared by the parser's unit tests and the intake tests."""

from __future__ import annotations

from email.message import EmailMessage, Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP


def original(rcpt: str, *, message_id: str, sender: str = "news@volley.example",
             to: str | None = None) -> EmailMessage:
    """The message the report is about."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt if to is None else to
    msg["Subject"] = "Spring newsletter"
    msg["Message-ID"] = message_id
    msg.set_content("Hello,\n\nour spring offers.\n")
    return msg


def _report(report_type: str, human: str, machine: Message, returned: Message,
            reporter: str, to: str) -> bytes:
    outer = MIMEMultipart("report", report_type=report_type)
    outer["From"] = reporter
    outer["To"] = to
    outer["Subject"] = "Report"
    outer["Message-ID"] = "<report.1@reporter.example>"
    outer.attach(MIMEText(human))
    outer.attach(machine)
    outer.attach(returned)
    return outer.as_bytes(policy=SMTP)


def arf(to: str, orig: EmailMessage, *, rcpt_to: str | None = None,
        mail_from: str | None = None, feedback_type: str = "abuse",
        headers_only: bool = False, reporter: str = "feedback@arf.yahoo.example") -> bytes:
    """An RFC 5965 complaint. Yahoo redacts the recipient (no Original-Rcpt-To, the To:
    rewritten), so `rcpt_to=None` reports nobody but the tokens."""
    fields = [f"Feedback-Type: {feedback_type}", "User-Agent: YahooFBL/1.0", "Version: 1"]
    if mail_from:
        fields.append(f"Original-Mail-From: <{mail_from}>")
    if rcpt_to:
        fields.append(f"Original-Rcpt-To: <{rcpt_to}>")
    fields.append("Arrival-Date: Thu, 8 Mar 2026 14:00:00 EDT")
    machine = MIMEBase("message", "feedback-report")
    machine.set_payload("\r\n".join(fields) + "\r\n")
    returned: Message
    if headers_only:
        returned = MIMEText("".join(f"{k}: {v}\r\n" for k, v in orig.items()), "rfc822-headers")
    else:
        returned = MIMEMessage(orig)
    return _report("feedback-report", "This is an email abuse report.", machine, returned,
                   reporter, to)


def dsn(to: str, orig: EmailMessage, recipients: list[tuple[str, str, str, str]], *,
        headers_only: bool = True, reporter: str = "MAILER-DAEMON@mx.postfix.example") -> bytes:
    """An RFC 3464 report: `recipients` are (final recipient, action, status,
    diagnostic). Postfix returns the headers (text/rfc822-headers), Gmail the message."""
    machine = MIMEBase("message", "delivery-status")
    head = Message()
    head["Reporting-MTA"] = "dns; mx.postfix.example"
    head["Arrival-Date"] = "Thu, 8 Mar 2026 14:00:00 +0000"
    machine.attach(head)  # message/delivery-status is a list of field blocks
    for final, action, status, diagnostic in recipients:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {final}"
        block["Action"] = action
        block["Status"] = status
        if diagnostic:
            block["Diagnostic-Code"] = f"smtp; {diagnostic}"
        machine.attach(block)
    returned: Message
    if headers_only:
        returned = MIMEText("".join(f"{k}: {v}\r\n" for k, v in orig.items()), "rfc822-headers")
    else:
        returned = MIMEMessage(orig)
    return _report("delivery-status", "This is the mail system at host mx.postfix.example.",
                   machine, returned, reporter, to)
