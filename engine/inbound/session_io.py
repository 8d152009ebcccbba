"""Decisions the inbound adapter takes around the machine: EHLO capabilities, the
Received: header and queue record, and the AUTH exchange. Kept apart from
protocol.py so the Protocol class stays about bytes and flow."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import TYPE_CHECKING

from engine.inbound.sasl import MECHANISMS
from engine.queue.ids import id_text
from engine.queue.records import MessageRecord, Recipient
from engine.smtp.commands import Auth, Ehlo, Helo
from engine.smtp.replies import (
    R235_AUTH_OK,
    R421_AUTH_FAILURES,
    R502_NOT_IMPLEMENTED,
    R504_AUTH_MECHANISM,
    R535_AUTH_FAILED,
    R538_ENCRYPTION_REQUIRED,
    Reply,
)
from engine.smtp.server import MessageReceived

if TYPE_CHECKING:
    from engine.inbound.protocol import SmtpServerProtocol

def auth_offered(proto: SmtpServerProtocol) -> bool:
    """RFC 4954 §4: plaintext passwords only under TLS unless explicitly allowed."""
    listener = proto.listener
    return listener.auth != "none" and (
        proto.session.tls_active or listener.allow_plaintext_auth
    )


def greeting_reply(proto: SmtpServerProtocol, command: Ehlo | Helo) -> Reply:
    # RFC 2034 §3: no enhanced status code on replies to EHLO/HELO.
    hostname = proto.ctx.hostname
    if isinstance(command, Helo):
        return Reply(250, "", hostname)
    lines = [
        f"{hostname} greets {command.domain}",
        "PIPELINING",
        f"SIZE {int(proto.ctx.cfg.limits.max_message_size)}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ]
    if proto.listener.tls == "starttls" and not proto.session.tls_active and proto.ctx.ssl_context:
        lines.append("STARTTLS")
    if auth_offered(proto):
        lines.append("AUTH " + " ".join(MECHANISMS))
    return Reply(250, "", tuple(lines))


# --- the Received: header and the queue record ------------------------------------------
_date_cache: tuple[int, str] = (0, "")


def _rfc5322_date() -> str:
    # Formatting a date costs more than the rest of the header: once per second.
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, localtime=False))
    return _date_cache[1]


def _protocol_name(proto: SmtpServerProtocol, utf8: bool) -> str:
    # RFC 3848 / RFC 6531 §4.3 "with" protocol types.
    session = proto.session
    name = ("UTF8SMTP" if utf8 else "ESMTP") if session.esmtp else "SMTP"
    if session.tls_active:
        name += "S"
    if session.auth_user is not None:
        name += "A"
    return name


def received_header(proto: SmtpServerProtocol, msg_id: str, rcpts: list[str], utf8: bool) -> bytes:
    """RFC 5321 §4.4 trace header, folded so no line exceeds 78 octets."""
    session = proto.session
    # What goes around the id depends only on session facts that change at EHLO,
    # STARTTLS or AUTH: built once per session (and again when they change).
    key = (session.helo, session.esmtp, session.tls_active, session.auth_user, utf8,
           proto.tls_version)
    cached = proto.received_parts
    if cached is None or cached[0] != key:
        helo = (session.helo or "unknown").replace("\r", "").replace("\n", "")[:200]
        head = (f"Received: from {helo} ([{proto.client_ip}])\r\n"
                f"\tby {proto.ctx.hostname} (Volley) with {_protocol_name(proto, utf8)} id ")
        tail = f"\r\n\t(using {proto.tls_version})" if proto.tls_version else ""
        cached = proto.received_parts = (key, head, tail)
    _, head, tail = cached
    if len(rcpts) == 1 and len(rcpts[0]) < 200:
        return f"{head}{msg_id}{tail}\r\n\tfor <{rcpts[0]}>;\r\n\t{_rfc5322_date()}\r\n".encode()
    return f"{head}{msg_id}{tail};\r\n\t{_rfc5322_date()}\r\n".encode()


def hop_count(content: bytes) -> int:
    """Received: headers in the message's header section (RFC 5321 §6.3 loop check)."""
    end = content.find(b"\r\n\r\n")
    head = (content if end < 0 else content[: end + 2]).lower()
    return head.count(b"\r\nreceived:") + head.startswith(b"received:")


def submit_message(proto: SmtpServerProtocol, event: MessageReceived) -> None:
    """Build the record and body and hand them to group commit; the 250 waits for it."""
    ctx = proto.ctx
    session = proto.session
    mail = session.envelope.mail
    assert mail is not None
    raw_id = ctx.ids.next()
    msg_id = id_text(raw_id)
    rcpts = session.envelope.rcpts
    addresses = [r.address for r in rcpts]
    content = event.content
    if content and not content.endswith(b"\r\n"):
        # BDAT content need not end in CRLF, but the relayed copy must (P5).
        content += b"\r\n"
    body = received_header(proto, msg_id, addresses, mail.smtputf8) + content
    record = MessageRecord(
        id=raw_id,
        sender=mail.address,
        recipients=[Recipient(r.address, orcpt=r.orcpt, notify=r.notify) for r in rcpts],
        received_at=time.time(),
        size=len(body),
        body_type=mail.body,
        smtputf8=mail.smtputf8,
        ret=mail.ret,
        envid=mail.envid,
        client_ip=proto.client_ip,
        helo=session.helo or "",
        auth_user=session.auth_user,
    )
    ctx.committer.submit(
        lambda txn: txn.put_message(record, body),
        lambda result: proto.committed(result, msg_id, len(body)),
    )


# --- AUTH PLAIN / LOGIN (RFC 4954, RFC 4616) -------------------------------------------
def auth_refusal(proto: SmtpServerProtocol, command: Auth) -> Reply | None:
    if proto.listener.auth == "none":
        return R502_NOT_IMPLEMENTED
    if not auth_offered(proto):
        return R538_ENCRYPTION_REQUIRED
    if command.mechanism not in MECHANISMS:
        return R504_AUTH_MECHANISM
    return None


def auth_result(proto: SmtpServerProtocol, user: str, ok: bool) -> Reply:
    if ok:
        proto.session.authenticated(user)
        return R235_AUTH_OK
    proto.auth_failures += 1
    if proto.auth_failures >= proto.ctx.cfg.limits.max_auth_failures:
        return R421_AUTH_FAILURES
    return R535_AUTH_FAILED
