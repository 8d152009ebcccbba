"""RFC 3464 delivery status notifications (bounces, delay and relay reports). Pure.

`build_dsn` returns the complete RFC 5322 message as bytes (CRLF only, no line over
998 octets; P5), or None when no DSN is due. The caller queues it like any message
and sends it with the null reverse-path, ``MAIL FROM:<>`` (RFC 3461 §6.2, RFC 5321
§4.5.5), to the original envelope sender — that is what makes the Return-Path of the
DSN null, so a DSN can never cause another one ("never bounce a bounce"): a message
whose sender is "" gets no DSN at all. When the DSN is SMTPUTF8 (see below) the
caller must also send it with the SMTPUTF8 parameter; when it returns an 8-bit
original it must send BODY=8BITMIME.

Choices (documented deviations from other MTAs):

- No RET given → headers only (text/rfc822-headers, RFC 3462 / RFC 6522). RFC 3461
  §4.3 leaves the default to the MTA. Postfix returns the full message by default,
  KumoMTA the headers: Volley is a bulk relay, and returning every megabyte
  newsletter to a sender that bounces thousands of them wastes bandwidth and storage;
  the headers identify the message. RET=FULL returns message/rfc822, except when the
  original is not line-clean (bare CR/LF or a line over 998 octets, possible only for
  BINARYMIME): then headers only, and the human-readable part says so (P5).
- No NOTIFY given → FAILURE only (`DEFAULT_NOTIFY`). RFC 3461 §4.1 lets the MTA pick
  FAILURE or FAILURE,DELAY; delay reports for bulk mail nobody asked about are noise.
- NOTIFY=SUCCESS: when the next hop advertised DSN, RFC 3461 §5.2 passes the duty on
  with the NOTIFY/ORCPT parameters and we report nothing; otherwise one "relayed"
  report (Action: relayed, RFC 3464 §2.3.3) — see `success_action`.
- Delay reports: `dsn_wanted(r, "delayed")`; the caller decides when (e.g. the first
  time a recipient is still deferred 4h after arrival) and sends one only once.
- SMTPUTF8 (RFC 6533): when the original was SMTPUTF8 or any address is non-ASCII,
  the report is message/global-delivery-status (report-type=global-delivery-status),
  the returned headers message/global-headers, the full message message/global;
  addresses are written as raw UTF-8 (RFC 6532 §3.2) — intact, never RFC 2047
  encoded (an encoded-word is not allowed in an addr-spec). Non-ASCII addresses use
  the "utf-8" address type (RFC 6533 §3). Otherwise every generated field is US-ASCII
  (RFC 3464 §2.1) and stray non-ASCII reply text is replaced by "?".
- Last-Attempt-Date (optional, RFC 3464 §2.3.7) is `now`: the record keeps no
  per-recipient attempt time; it is omitted for recipients never attempted.
- Long Diagnostic-Code text is folded at spaces (RFC 3464 §2.1.1 uses RFC 822
  continuation lines). A run of more than 800 octets without a space cannot be folded
  without a change, so it is split by "CRLF SP" (unfolding adds one space there).
  Control characters in remote text become spaces (no header injection).
"""

from __future__ import annotations

import hashlib

from engine.delivery.dsn_fields import (
    _NON_ASCII,
    _addr_type,
    _clean,
    _date,
    _decoded,
    _diagnostic,
    _field,
    _headers_of,
    _line_clean,
    _status,
    _wrap,
)
from engine.queue.records import MessageRecord, Recipient
from engine.smtp.replies import Reply

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})  # RFC 3464 §2.3.3
DEFAULT_NOTIFY: tuple[str, ...] = ("FAILURE",)

# RFC 3461 §4.1: which NOTIFY keyword asks for which Action.
_KEYWORD = {"failed": "FAILURE", "delayed": "DELAY",
            "delivered": "SUCCESS", "relayed": "SUCCESS", "expanded": "SUCCESS"}
_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}


def dsn_wanted(recipient: Recipient, action: str) -> bool:
    """Does this recipient's NOTIFY (RFC 3461 §4.1) ask for a report with `action`?

    NEVER → no report of any kind; no NOTIFY → `DEFAULT_NOTIFY` (FAILURE only);
    otherwise the keyword for the action (failed→FAILURE, delayed→DELAY,
    delivered/relayed/expanded→SUCCESS) must be listed. Keywords compare case-blind.

    Raises:
        ValueError: unknown action.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}; expected one of {sorted(ACTIONS)}")
    notify = recipient.notify if recipient.notify is not None else DEFAULT_NOTIFY
    keywords = {k.strip().upper() for k in notify}
    if "NEVER" in keywords:
        return False
    return _KEYWORD[action] in keywords


def success_action(remote_advertised_dsn: bool) -> str | None:
    """Action for a recipient with NOTIFY=SUCCESS once the remote accepted it.

    RFC 3461 §5.2: a DSN-capable next hop gets NOTIFY/ORCPT passed on and reports
    itself, so None (no report from us); otherwise "relayed" (RFC 3461 §5.2.2 (b)).
    """
    return None if remote_advertised_dsn else "relayed"


Entry = tuple[Recipient, Reply, str]  # (recipient, its reply, the DSN action)

_INTRO = {
    "failed": "Your message could not be delivered to one or more recipients. "
    "The reason reported for each recipient follows; the original message "
    "(or its headers) is attached.",
    "delayed": "Your message has not yet been delivered to one or more recipients. "
    "The mail system will keep trying; you do not need to resend it.",
    "success": "Your message was delivered or relayed to the recipients below. "
    "The next system did not offer delivery reports, so no further report may follow.",
}
_HEADERS_ONLY = ("The original message contains bare CR/LF or over-long lines, "
                 "so only its headers are returned.")


def build_dsn(
    record: MessageRecord,
    original: bytes,
    recipients: list[Entry],
    *,
    reporting_mta: str,
    now: float,
    remote_mta: str | None = None,
    message_id: str,
    retry_until: float | None = None,
    remote_mtas: list[str] | None = None,
) -> bytes | None:
    """The DSN message for `recipients` [(recipient, reply, action)], or None.

    None when the sender is null (RFC 3461 §6.2: never report on a report) or when
    `dsn_wanted` leaves no recipient. `original` is the queued message (headers are
    the part up to the first CRLF CRLF). `remote_mta` becomes Remote-MTA for every
    recipient, unless `remote_mtas` (parallel to `recipients`, "" for none) names one per
    recipient (one report covering several destinations); `retry_until` becomes Will-Retry-Until on "delayed" recipients
    (RFC 3464 §2.3.8). `message_id` is the new Message-ID (with or without <>).

    Raises:
        ValueError: an unknown action.
    """
    if record.sender == "":
        return None
    mtas = remote_mtas if remote_mtas is not None else [remote_mta or ""] * len(recipients)
    keep = [n for n, (r, _, a) in enumerate(recipients) if dsn_wanted(r, a)]
    if not keep:
        return None
    wanted = [recipients[n] for n in keep]
    utf8 = record.smtputf8 or any(
        _NON_ASCII.search(s)
        for s in [record.sender] + [r.address + (r.orcpt or "") for r, _, _ in wanted]
    )
    actions = {a for _, _, a in wanted}
    kind = "failed" if "failed" in actions else "delayed" if "delayed" in actions else "success"
    mta = _clean(reporting_mta, False)
    full = (record.ret or "").upper() == "FULL"
    returnable = full and _line_clean(original)

    notification = _notification(wanted, kind, mta, utf8, headers_only=full and not returnable)
    status = _delivery_status(record, wanted, mta, utf8, now, [mtas[n] for n in keep],
                              retry_until)
    ctype3, desc3, returned = _returned(original, returnable, utf8, kind)
    boundary = _boundary(message_id, record.id, (notification, status, returned))

    out = _report_head(record, kind, mta, utf8, now, message_id, boundary)
    charset = "utf-8" if _cte(notification) == "8bit" else "us-ascii"
    out += _mime_part(boundary, f"text/plain; charset={charset}", "Notification", notification)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    out += _mime_part(boundary, status_type, "Delivery report", status)
    out += _mime_part(boundary, ctype3, desc3, returned)
    out += f"--{boundary}--\r\n".encode()
    return out


def _notification(wanted: list[Entry], kind: str, mta: str, utf8: bool, *,
                  headers_only: bool) -> bytes:
    """Part 1, for people (RFC 3462 §2 / RFC 6522 §3): what happened, per recipient."""
    text = [f"This is the mail system at host {mta}.", ""] + _wrap(_INTRO[kind]) + [""]
    for r, rep, a in wanted:
        text += _wrap(f"<{_clean(r.address, utf8)}> ({a}): {_clean(_diagnostic(rep)[6:], utf8)}", "    ")
    if headers_only:
        text += [""] + _wrap(_HEADERS_ONLY)
    return ("\r\n".join(text) + "\r\n").encode("utf-8")


def _delivery_status(record: MessageRecord, wanted: list[Entry], mta: str, utf8: bool,
                     now: float, remote_mtas: list[str], retry_until: float | None) -> bytes:
    """Part 2, for machines: the per-message fields (RFC 3464 §2.2), then one block of
    per-recipient fields (§2.3) for each recipient."""
    ds: list[str] = _field("Reporting-MTA", f"dns; {mta}")
    ds += _field("X-Volley-Queue-ID", record.id.hex())
    if record.envid:
        ds += _field("Original-Envelope-Id", _decoded(record.envid, utf8))  # §2.2.1
    ds += _field("Arrival-Date", _date(record.received_at))  # §2.2.5
    for (r, rep, a), remote_mta in zip(wanted, remote_mtas):
        ds.append("")
        ds += _recipient_fields(r, rep, a, utf8, now, remote_mta or None, retry_until)
    return ("\r\n".join(ds) + "\r\n").encode("utf-8")


def _recipient_fields(r: Recipient, rep: Reply, a: str, utf8: bool, now: float,
                      remote_mta: str | None, retry_until: float | None) -> list[str]:
    ds: list[str] = []
    if r.orcpt:  # §2.3.1, from RFC 3461 §4.2 ORCPT=addr-type;xtext
        atype, sep, addr = r.orcpt.partition(";")
        value = f"{_clean(atype.strip(), utf8)}; {_decoded(addr.strip(), utf8)}" if sep else _clean(r.orcpt, utf8)
        ds += _field("Original-Recipient", value)
    ds += _field("Final-Recipient", f"{_addr_type(r.address)}; {_clean(r.address, utf8)}")  # §2.3.2
    ds += _field("Action", a)  # §2.3.3
    ds += _field("Status", _status(rep, a))  # §2.3.4
    if remote_mta:
        ds += _field("Remote-MTA", f"dns; {_clean(remote_mta, utf8)}")  # §2.3.5
    ds += _field("Diagnostic-Code", _clean(_diagnostic(rep), utf8))  # §2.3.6
    if r.attempts > 0:
        ds += _field("Last-Attempt-Date", _date(now))  # §2.3.7
    if a == "delayed" and retry_until is not None:
        ds += _field("Will-Retry-Until", _date(retry_until))  # §2.3.8
    return ds


def _returned(original: bytes, returnable: bool, utf8: bool, kind: str) -> tuple[str, str, bytes]:
    """Part 3 (RFC 3462 §2): (content type, description, body): the whole original when
    RET=FULL allows it, else its headers."""
    if returnable:
        ctype, desc, body = ("message/global" if utf8 else "message/rfc822"), "Undelivered Message", original
    else:
        ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
        desc, body = "Undelivered Message Headers", _headers_of(original)
    if kind != "failed":
        desc = desc.replace("Undelivered", "Original")
    return ctype, desc, body


def _boundary(message_id: str, record_id: bytes, parts: tuple[bytes, ...]) -> str:
    """A MIME boundary derived from the report's ids, made longer until no part holds it."""
    seed = hashlib.sha256(message_id.encode("utf-8") + record_id).hexdigest()[:20]
    boundary = f"=_volley-dsn-{seed}"
    n = 0
    while any(boundary.encode() in p for p in parts):
        n += 1
        boundary = f"=_volley-dsn-{seed}-{n}"
    return boundary


def _report_head(record: MessageRecord, kind: str, mta: str, utf8: bool, now: float,
                 message_id: str, boundary: str) -> bytes:
    """The report's RFC 5322 header and MIME preamble (RFC 3462 multipart/report)."""
    mid = _clean(message_id.strip(), False)
    if not mid.startswith("<"):
        mid = f"<{mid}>"
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    head: list[str] = []
    head += _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>")
    head += _field("To", f"<{_clean(record.sender, utf8)}>")
    head += _field("Subject", _SUBJECT[kind])
    head += _field("Date", _date(now))
    head += _field("Message-ID", mid)
    head += _field("Auto-Submitted", "auto-replied")  # RFC 3834 §5: a DSN is a reply
    head += _field("MIME-Version", "1.0")
    head += _field("Content-Type", f'multipart/report; report-type={report_type}; boundary="{boundary}"')
    head += ["", "This is a MIME-encapsulated message.", ""]
    return "\r\n".join(head).encode("utf-8") + b"\r\n"


def _cte(data: bytes) -> str:
    return "8bit" if any(c > 0x7F for c in data) else "7bit"


def _mime_part(boundary: str, ctype: str, desc: str, body: bytes) -> bytes:
    hdr = [f"--{boundary}", f"Content-Description: {desc}", f"Content-Type: {ctype}",
           f"Content-Transfer-Encoding: {_cte(body)}", ""]
    return "\r\n".join(hdr).encode("utf-8") + b"\r\n" + body + b"\r\n"
