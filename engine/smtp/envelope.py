"""What the client sends: the Envelope, and what a message needs before it goes out.

`Transaction` (client.py) takes an `Envelope` per message; `local_refusal` is its
precheck against the server's EHLO, so a message the server could never take
bounces without a word on the wire; `content_of` and `data_parts` are the content as
it goes out, in parts (a large body is never copied to be sent).
"""

from __future__ import annotations

from typing import Final

import msgspec

from engine.smtp import grammar
from engine.smtp.buffer import has_dot_line
from engine.smtp.client_replies import Capabilities
from engine.smtp.replies import Reply

END_OF_DATA: Final = b".\r\n"  # after content ending in CRLF (RFC 5321 §4.1.1.4)

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
    size: int | None = None  # RFC 1870 SIZE to declare; None = len(prefix + body)
    # Header lines sent before `body` (a DKIM-Signature), each ending in CRLF: the
    # stored body is never copied to put them in front, both go out in one scatter
    # write (Transaction.*_parts).
    prefix: bytes = b""
    # Does any line of prefix + body start with "."? The receiver recorded it while
    # unstuffing (MessageRecord.dot_lines). False skips the stuffing scan of DATA
    # (RFC 5321 §4.5.2); None = unknown, scan.
    dot_lines: bool | None = None


def dot_stuff(body: bytes) -> bytes:
    """RFC 5321 §4.5.2: double the dot that starts any line (the first line too).

    One C-level replace over the body with a CRLF prefix, so line 1 needs no special case.
    The check before it is a regex search (buffer.has_dot_line), ~3x cheaper than
    `b"\r\n." in body` on CRLF-dense text.
    """
    if not has_dot_line(body):
        return body  # the common case: no copy
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]


def content_of(envelope: Envelope) -> tuple[bytes, bytes]:
    """(prefix, body) as they go on the wire: a body not ending in CRLF gets one, so
    DATA and BDAT deliver the same octets.

    Raises ValueError if the prefix does not end in CRLF (its last line would run into
    the body's first, and stuffing the two apart would differ from stuffing them joined).
    """
    prefix, body = envelope.prefix, envelope.body
    if prefix and not prefix.endswith(b"\r\n"):
        raise ValueError("the header prefix must end with CRLF")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return prefix, body


def data_parts(prefix: bytes, body: bytes, dot_lines: bool | None) -> list[bytes]:
    """What follows the 354: the stuffed content and the end-of-data line, as parts
    for one scatter write (the body is not copied when nothing needs stuffing).

    `dot_lines` False: the receiver saw no line starting with "." (no scan at all).
    Each part is stuffed on its own, which equals stuffing the whole because the
    prefix ends with CRLF (content_of).
    """
    if dot_lines is not False:
        prefix, body = dot_stuff(prefix), dot_stuff(body)
    if not prefix:
        return [body, END_OF_DATA]
    return [prefix, body, END_OF_DATA]


def bdat_parts(commands: bytes, prefix: bytes, body: bytes) -> list[bytes]:
    """`commands` (the pipelined group before it, or b""), then `BDAT <n> LAST` and the
    content as it is: no stuffing, no terminator (RFC 3030 §2); the body not copied."""
    head = commands + b"BDAT %d LAST\r\n" % (len(prefix) + len(body))
    return [head + prefix, body] if prefix else [head, body]


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
