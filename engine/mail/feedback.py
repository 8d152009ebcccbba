"""Reading feedback: complaints (ARF, RFC 5965) and late bounces (DSN, RFC 3464).

A receiver that accepted a message and later learns something about it sends a report
to the feedback address: a complaint when the recipient pressed "this is spam", a
delivery status notification when the mailbox turned out not to exist (or the message
is still waiting). Both are `multipart/report` (RFC 6522) with a machine-readable part
and, usually, the original message or its headers.

Who a report is about comes from, in order: the VERP token of the address the report
was sent to (`token`, engine/mail/verp.py), the token in the returned message's
Message-ID, the token in an ARF's Original-Mail-From, and last the report's own
recipient fields (ARF Original-Rcpt-To, the returned To:, DSN Original-/Final-Recipient).
Large receivers redact the recipient from complaints, so the tokens usually decide.

This is not a hot path (reports are rare next to mail), so the stdlib email package
parses. It is bounded: only the first `MAX_PARSE` octets are read, at most `MAX_EVENTS`
events come out, and anything that is not a report, or does not parse, gives [] rather
than an exception.
"""

from __future__ import annotations

import re
from email import message_from_bytes, message_from_string
from email.message import Message

import msgspec

from engine.mail import verp

# A report's machine-readable part and the returned headers come first; the returned
# body (which may be a whole newsletter) is not needed and not read past this.
MAX_PARSE = 1 << 20
MAX_EVENTS = 1000
_MAX_DIAGNOSTIC = 500
# RFC 5965 §7.3 feedback types that are a recipient's complaint; "not-spam" (RFC 6650)
# and "auth-failure" (RFC 6591) are not.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})
DSN_ACTIONS = {"failed": "bounce", "delayed": "delay"}  # RFC 3464 §2.3.3; others: no event
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # RFC 3463 §2
_SPACE = re.compile(r"\s+")


class FeedbackEvent(msgspec.Struct, frozen=True):
    kind: str  # "complaint" | "bounce" | "delay"
    recipient: str
    status: str = ""  # enhanced code of a DSN ("5.1.1"); "" for complaints
    diagnostic: str = ""
    campaign: str = ""
    tenant: str = ""


def parse_feedback(content: bytes, *, token: str | None = None) -> list[FeedbackEvent]:
    """The events of one report; [] for anything that is not an ARF or DSN report (or
    names nobody). Never raises on what a peer sent."""
    try:
        return _parse(content[:MAX_PARSE], token)
    except Exception:  # garbage in any shape the email package trips on: not a report
        return []


def _parse(content: bytes, token: str | None) -> list[FeedbackEvent]:
    report = _find_report(message_from_bytes(content))
    if report is None:
        return []
    report_type = str(report.get_param("report-type", "") or "").lower()
    payload = report.get_payload()
    if not isinstance(payload, list):
        return []
    parts = [p for p in payload[:8] if isinstance(p, Message)]
    original = _returned_headers(parts)
    known = _token_fields(token, original)
    if report_type == "feedback-report":
        return _arf(parts, original, known)
    if report_type == "delivery-status":
        return _dsn(parts, known)
    return []


def _find_report(msg: Message) -> Message | None:
    """The multipart/report itself, or one directly inside the top level (a report
    forwarded as an attachment, as some feedback loops send it)."""
    if msg.get_content_type() == "multipart/report":
        return msg
    payload = msg.get_payload()
    if isinstance(payload, list):
        for part in payload[:8]:
            if isinstance(part, Message) and part.get_content_type() == "multipart/report":
                return part
    return None


def _returned_headers(parts: list[Message]) -> Message | None:
    """The header section of the returned message (RFC 6522 §3: the optional third
    part, message/rfc822 or text/rfc822-headers)."""
    for part in parts[1:4]:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            text = part.get_payload(decode=True)
            if isinstance(text, bytes):
                return message_from_bytes(text)
    return None


def _token_fields(token: str | None, original: Message | None) -> tuple[str, str, str] | None:
    """(recipient, campaign, tenant) from the RCPT token, else the Message-ID's."""
    if token:
        fields = verp.decode_token(token)
        if fields is not None:
            return fields
    if original is not None:
        mid = verp.token_of_message_id(str(original.get("Message-ID", "")))
        if mid is not None:
            return verp.decode_token(mid)
    return None


def _fields_part(part: Message) -> list[Message]:
    """The field blocks of a message/feedback-report or message/delivery-status part
    (the email package parses them as header blocks; an encoded part is decoded)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    blocks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [message_from_string(b.strip() + "\n\n") for b in blocks[:MAX_EVENTS + 1] if b.strip()]


def _part(parts: list[Message], ctype: str) -> Message | None:
    for part in parts[:4]:
        if part.get_content_type() == ctype:
            return part
    return None


def _address(value: object) -> str:
    """An address out of a report field: "rfc822; a@b" (RFC 3464 §2.3.2), "<a@b>"."""
    text = str(value or "").strip()
    kind, semi, rest = text.partition(";")
    if semi and "@" not in kind:
        text = rest.strip()
    text = text.strip().strip("<>").strip()
    return text if "@" in text and not _SPACE.search(text) and len(text) <= 254 else ""


def _arf(parts: list[Message], original: Message | None,
         known: tuple[str, str, str] | None) -> list[FeedbackEvent]:
    part = _part(parts, "message/feedback-report")
    if part is None:
        return []
    blocks = _fields_part(part)
    if not blocks:
        return []
    fields = blocks[0]
    feedback_type = str(fields.get("Feedback-Type", "abuse")).strip().lower()
    if feedback_type not in COMPLAINT_TYPES:
        return []
    if known is None:
        # RFC 5965 §3.5: Original-Mail-From is the original's return path: ours, VERP'd.
        local = _address(fields.get("Original-Mail-From")).rpartition("@")[0]
        plus = local.rpartition("+")[2] if "+" in local else ""
        decoded = verp.decode_token(plus) if plus else None
        known = decoded
    if known is not None:
        return [FeedbackEvent("complaint", known[0], campaign=known[1], tenant=known[2])]
    found = [_address(v) for v in fields.get_all("Original-Rcpt-To") or []]
    if not any(found) and original is not None:
        found = [_address(original.get("To"))]
    return [FeedbackEvent("complaint", r) for r in _unique(found)]


def _dsn(parts: list[Message], known: tuple[str, str, str] | None) -> list[FeedbackEvent]:
    part = _part(parts, "message/delivery-status") or _part(parts, "message/global-delivery-status")
    if part is None:
        return []
    events: list[FeedbackEvent] = []
    seen: set[tuple[str, str]] = set()
    for block in _fields_part(part)[1:MAX_EVENTS + 1]:  # [0]: the per-message fields
        kind = DSN_ACTIONS.get(str(block.get("Action", "")).strip().lower())
        if kind is None:
            continue
        if known is not None:
            recipient, campaign, tenant = known
        else:
            recipient = (_address(block.get("Original-Recipient"))
                         or _address(block.get("Final-Recipient")))
            campaign = tenant = ""
        if not recipient or (kind, recipient.lower()) in seen:
            continue
        seen.add((kind, recipient.lower()))
        m = _STATUS.search(str(block.get("Status", "")))
        diagnostic = _diagnostic(block.get("Diagnostic-Code"))
        events.append(FeedbackEvent(kind, recipient, m.group(0) if m else "", diagnostic,
                                    campaign, tenant))
    return events


def _diagnostic(value: object) -> str:
    """The reply text of "smtp; 550 5.1.1 No such user" (RFC 3464 §2.3.6), one line."""
    text = _SPACE.sub(" ", str(value or "")).strip()
    kind, semi, rest = text.partition(";")
    if semi and " " not in kind.strip():
        text = rest.strip()
    return text[:_MAX_DIAGNOSTIC]


def _unique(addresses: list[str]) -> list[str]:
    out: dict[str, str] = {}
    for a in addresses:
        if a:
            out.setdefault(a.lower(), a)
    return list(out.values())[:MAX_EVENTS]
