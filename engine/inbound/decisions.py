"""Decisions the inbound adapter takes around the machine: what EHLO offers, the
Received: header and the queue record of a message, and whether AUTH may go on.

Functions over plain facts (the ServerSession's state, the listener's settings, a
few config values): each returns a Reply or a value and changes nothing, so the
Protocol class in protocol.py stays about bytes and flow, and these are read and
tested on their own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from email.utils import formatdate

from engine.config import ListenerConfig
from engine.errors import Transient
from engine.inbound.sasl import MECHANISMS
from engine.queue.records import MessageRecord, Recipient
from engine.smtp.commands import Ehlo, Helo, Rcpt
from engine.smtp.replies import (
    R235_AUTH_OK,
    R421_AUTH_FAILURES,
    R502_NOT_IMPLEMENTED,
    R504_AUTH_MECHANISM,
    R535_AUTH_FAILED,
    R538_ENCRYPTION_REQUIRED,
    Reply,
)
from engine.smtp.server import ServerSession

# --- EHLO --------------------------------------------------------------------------------


def auth_offered(listener: ListenerConfig, tls_active: bool) -> bool:
    """RFC 4954 §4: plaintext passwords only under TLS unless explicitly allowed."""
    return listener.auth != "none" and (tls_active or listener.allow_plaintext_auth)


def greeting_reply(
    command: Ehlo | Helo,
    *,
    hostname: str,
    max_message_size: int,
    listener: ListenerConfig,
    tls_active: bool,
    tls_available: bool,
) -> Reply:
    """The answer to EHLO (RFC 5321 §4.1.1.1, with our extensions) or HELO.

    `tls_available`: a server certificate is configured.
    """
    # RFC 2034 §3: no enhanced status code on replies to EHLO/HELO.
    if isinstance(command, Helo):
        return Reply(250, "", hostname)
    lines = [
        f"{hostname} greets {command.domain}",
        "PIPELINING",
        f"SIZE {max_message_size}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ]
    if listener.tls == "starttls" and not tls_active and tls_available:
        lines.append("STARTTLS")
    if auth_offered(listener, tls_active):
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


def _protocol_name(session: ServerSession, utf8: bool) -> str:
    # RFC 3848 / RFC 6531 §4.3 "with" protocol types.
    name = ("UTF8SMTP" if utf8 else "ESMTP") if session.esmtp else "SMTP"
    if session.tls_active:
        name += "S"
    if session.auth_user is not None:
        name += "A"
    return name


class ReceivedHeader:
    """The RFC 5321 §4.4 trace header of one session's messages, folded so no line
    exceeds 78 octets.

    What goes around the id depends only on session facts that change at EHLO,
    STARTTLS or AUTH (and on the message's SMTPUTF8): it is built once per session,
    and again when they change, not once per message.
    """

    __slots__ = ("_key", "_head", "_tail")

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._head = self._tail = ""

    def render(
        self, session: ServerSession, client_ip: str, hostname: str, tls_version: str, msg_id: str
    ) -> bytes:
        """The header for message `msg_id` of the transaction in `session.envelope`."""
        envelope = session.envelope
        mail = envelope.mail
        assert mail is not None
        utf8 = mail.smtputf8
        key = (session.helo, session.esmtp, session.tls_active, session.auth_user, utf8,
               tls_version)
        if key != self._key:
            helo = (session.helo or "unknown").replace("\r", "").replace("\n", "")[:200]
            self._head = (f"Received: from {helo} ([{client_ip}])\r\n"
                          f"\tby {hostname} (Volley) with {_protocol_name(session, utf8)} id ")
            self._tail = f"\r\n\t(using {tls_version})" if tls_version else ""
            self._key = key
        head, tail, rcpts = self._head, self._tail, envelope.rcpts
        if len(rcpts) == 1 and len(rcpts[0].address) < 200:
            return (f"{head}{msg_id}{tail}\r\n\tfor <{rcpts[0].address}>;\r\n"
                    f"\t{_rfc5322_date()}\r\n").encode()
        return f"{head}{msg_id}{tail};\r\n\t{_rfc5322_date()}\r\n".encode()


def hop_count(content: bytes) -> int:
    """Received: headers in the message's header section (RFC 5321 §6.3 loop check)."""
    end = content.find(b"\r\n\r\n")
    head = (content if end < 0 else content[: end + 2]).lower()
    return head.count(b"\r\nreceived:") + head.startswith(b"received:")


def queue_record(
    raw_id: bytes, session: ServerSession, size: int, client_ip: str, postmaster: str = "",
    rcpts: Sequence[Rcpt] | None = None,
) -> MessageRecord:
    """The queue's record of the transaction in `session.envelope`; `size` counts the
    body as stored (our Received: header included). `rcpts`: the recipients to queue
    when not all of the envelope's are (the feedback address is read, not queued).

    `postmaster` is server.postmaster: a bare RCPT TO:<postmaster> is queued for that
    address. No recipient is ever queued without a domain (delivery would look up
    the empty domain and bounce it): if one remains (server.postmaster was unset by a
    reload after the RCPT), the message gets 451 and the client's retry a clear 550.

    Raises:
        Transient: a recipient would be queued without a domain.
    """
    envelope = session.envelope
    mail = envelope.mail
    assert mail is not None
    recipients = []
    for r in envelope.rcpts if rcpts is None else rcpts:
        address = postmaster if r.address == "postmaster" else r.address
        if "@" not in address:
            raise Transient(f"recipient without a domain: {r.address!r}")
        recipients.append(Recipient(address, orcpt=r.orcpt, notify=r.notify))
    return MessageRecord(
        id=raw_id,
        sender=mail.address,
        recipients=recipients,
        received_at=time.time(),
        size=size,
        body_type=mail.body,
        smtputf8=mail.smtputf8,
        ret=mail.ret,
        envid=mail.envid,
        client_ip=client_ip,
        helo=session.helo or "",
        auth_user=session.auth_user,
        dot_lines=envelope.dot_lines,
    )


# --- AUTH (RFC 4954) ---------------------------------------------------------------------
def auth_refusal(listener: ListenerConfig, tls_active: bool, mechanism: str) -> Reply | None:
    """Why this AUTH command cannot start an exchange, or None when it can."""
    if listener.auth == "none":
        return R502_NOT_IMPLEMENTED
    if not auth_offered(listener, tls_active):
        return R538_ENCRYPTION_REQUIRED
    if mechanism not in MECHANISMS:
        return R504_AUTH_MECHANISM
    return None


def auth_result(ok: bool, failures: int, max_failures: int) -> Reply:
    """The reply to a checked password; `failures` counts this session's failed
    attempts, this one included. A 421 ends the session."""
    if ok:
        return R235_AUTH_OK
    if failures >= max_failures:
        return R421_AUTH_FAILURES
    return R535_AUTH_FAILED
