"""The envelope side of an injected message: address syntax, the trace header, the
queue record. Mirrors what SMTP intake does for a received message, without the
SMTP session it does not have.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from engine.queue.records import MessageRecord, Recipient
from engine.smtp import grammar


def mailbox_problem(address: str) -> str | None:
    """Why `address` is not an RFC 5321 §4.1.2 Mailbox, or None when it is one.

    The same grammar SMTP intake applies to RCPT TO (engine/smtp/grammar.py), with
    RFC 6531's UTF-8 forms; a source route ("@a,@b:x@y") is not a mailbox here.
    """
    if not address:
        return "empty address"
    if address != address.strip():
        return "address with surrounding spaces"
    m = grammar.PATH_UTF8.fullmatch(f"<{address}>")
    if m is None or address.startswith("@"):
        return "not a valid address (RFC 5321 §4.1.2)"
    domain = m.group("domain")
    if domain[:1] == "[" and not grammar.valid_address_literal(domain):
        return "bad address literal (RFC 5321 §4.1.3)"
    if len(domain.encode()) > grammar.MAX_DOMAIN or len(address.encode()) + 2 > grammar.MAX_PATH:
        return "address too long (RFC 5321 §4.5.3.1)"
    return None


class ReceivedHeader:
    """The RFC 5321 §4.4 trace header of one request's messages: "from" names the
    HTTP client, "with" the protocol (HTTP or HTTPS; RFC 5321 §4.4 allows any atom
    where RFC 3848 registers none). Built once per request; one line per message."""

    __slots__ = ("_head", "_date")

    def __init__(self, client_ip: str, hostname: str, tls: bool, token_name: str) -> None:
        via = f" (token {token_name})" if token_name else ""
        self._head = (f"Received: from [{client_ip}] ([{client_ip}]){via}\r\n"
                      f"\tby {hostname} (Volley) with {'HTTPS' if tls else 'HTTP'} id ")
        self._date = formatdate(time.time(), localtime=False)

    def render(self, msg_id: str, recipient: str) -> bytes:
        if len(recipient) < 200:
            return f"{self._head}{msg_id}\r\n\tfor <{recipient}>;\r\n\t{self._date}\r\n".encode()
        return f"{self._head}{msg_id};\r\n\t{self._date}\r\n".encode()


def injected_record(raw_id: bytes, sender: str, recipient: str, size: int, *, now: float,
                    body_8bit: bool, client_ip: str, token_name: str, campaign: str,
                    tenant: str, priority: int, verp: bool = False,
                    egress_pool: str = "") -> MessageRecord:
    """One message, one recipient, DKIM-signed as it leaves (`sign=True`).

    `verp`: the return path is Volley's own feedback address. Then the recipient asks
    for no DSN (RFC 3461 NOTIFY=NEVER): Volley books a bounce itself (suppression list,
    campaign counters, engine/delivery/ledger.py), and a DSN to that address would only
    come back to its own feedback intake and be counted twice."""
    return MessageRecord(
        id=raw_id,
        sender=sender,
        recipients=[Recipient(recipient, notify=("NEVER",) if verp else None)],
        received_at=now,
        size=size,
        body_type="8BITMIME" if body_8bit else None,
        smtputf8=not (sender.isascii() and recipient.isascii()),
        client_ip=client_ip,
        auth_user=f"http:{token_name}" if token_name else "http",
        campaign=campaign,
        tenant=tenant,
        priority=priority,
        sign=True,
        egress_pool=egress_pool,
    )
