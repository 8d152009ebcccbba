"""What the client sends: the Envelope, and what a message needs before it goes out.

`Transaction` (client.py) takes an `Envelope` per message; `local_refusal` is its
precheck against the server's EHLO, so a message the server could never take
bounces without a word on the wire.
"""

from __future__ import annotations

from typing import Final

import msgspec

from engine.smtp import grammar
from engine.smtp.client_replies import Capabilities
from engine.smtp.replies import Reply

# Local refusals (precheck): permanent, so the message bounces without being sent.
# RFC 6531: a message that needs SMTPUTF8 must not go to a server without it; Volley
# does not downgrade, so it bounces (X.6.7, RFC 6531's code for this).
R550_NEEDS_SMTPUTF8: Final = Reply(550, "5.6.7", "Remote server does not support SMTPUTF8, required by this message")
# RFC 1870: the server's declared maximum (SIZE 0 = no fixed maximum).
R552_OVER_REMOTE_SIZE: Final = Reply(552, "5.3.4", "Message size exceeds the remote server's limit")
# RFC 6152: 8-bit content needs 8BITMIME; Volley does not convert to 7-bit (KumoMTA
# also refuses rather than convert).
R554_NEEDS_8BITMIME: Final = Reply(554, "5.6.3", "Remote server does not support 8BITMIME, required by this message")


class Recipient(msgspec.Struct, frozen=True):
    address: str
    notify: tuple[str, ...] | None = None  # RFC 3461 §4.1, sent only if the server has DSN
    orcpt: str | None = None  # RFC 3461 §4.2 "rfc822;addr", sent only with DSN


class Envelope(msgspec.Struct, frozen=True):
    """One message to one server: what the Transaction sends."""

    sender: str  # "" = the null reverse-path (bounces)
    recipients: list[Recipient]
    body: bytes  # CRLF lines, not dot-stuffed
    needs_smtputf8: bool = False  # RFC 6531: UTF-8 addresses or headers
    body_8bit: bool = False  # RFC 6152: octets above 127 in the body
    ret: str | None = None  # RFC 3461 §4.3 "FULL" | "HDRS"
    envid: str | None = None  # RFC 3461 §4.4
    size: int | None = None  # RFC 1870 SIZE to declare; None = len(body)


def dot_stuff(body: bytes) -> bytes:
    """RFC 5321 §4.5.2: double the dot that starts any line (the first line too).

    One C-level replace over the body with a CRLF prefix, so line 1 needs no special case.
    """
    if not body.startswith(b".") and b"\r\n." not in body:
        return body  # the common case: no copy
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]


def xtext_safe(value: str | None) -> str | None:
    """`value` if it can go out as xtext (RFC 3461 §4), else None.

    grammar.xtext_encode carries one octet per "+XX"; drop what it cannot carry
    (optional DSN data is better lost than the whole transaction).
    """
    if value is None:
        return None
    try:
        grammar.xtext_encode(value)
    except ValueError:
        return None
    return value


def local_refusal(envelope: Envelope, caps: Capabilities, size: int) -> Reply | None:
    """The permanent refusal of a message this server cannot take as it is, or None.

    `size` is what MAIL FROM would declare (RFC 1870).
    """
    if envelope.needs_smtputf8 and not caps.smtputf8:
        return R550_NEEDS_SMTPUTF8
    if caps.size and size > caps.size:
        return R552_OVER_REMOTE_SIZE
    # RFC 6531: a server offering SMTPUTF8 must offer 8BITMIME as well.
    if envelope.body_8bit and not (caps.eightbitmime or caps.smtputf8):
        return R554_NEEDS_8BITMIME
    return None
