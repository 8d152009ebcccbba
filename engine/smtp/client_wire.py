"""Session-level client lines outside a mail transaction: EHLO/HELO, STARTTLS, AUTH
PLAIN/LOGIN, QUIT and RSET (RFC 5321, 3207, 4954, 4616)."""

from __future__ import annotations

import base64
from typing import Final

from engine.smtp.commands import Ehlo, Helo, encode
from engine.smtp.replies import Reply

QUIT: Final = b"QUIT\r\n"
RSET: Final = b"RSET\r\n"
STARTTLS: Final = b"STARTTLS\r\n"


def _check_domain(name: str) -> str:
    if not name or any(c in name for c in " \r\n\t\0"):
        raise ValueError("bad EHLO/HELO name")
    return name


def greeting_bytes(helo_name: str) -> bytes:
    """`EHLO <name>` with CRLF. Raises ValueError for an empty name or one with whitespace."""
    return encode(Ehlo(_check_domain(helo_name)))


def helo_bytes(helo_name: str) -> bytes:
    """`HELO <name>`: the fallback when EHLO is refused (RFC 5321 §3.2)."""
    return encode(Helo(_check_domain(helo_name)))


def starttls_ready(reply: Reply) -> bool:
    """True if the reply to STARTTLS lets the handshake start (RFC 3207 §4: 220)."""
    return reply.code == 220


def _sasl(value: bytes) -> bytes:
    return base64.b64encode(value) if value else b"="  # RFC 4954 §4: "=" is empty


def auth_plain(user: str, password: str, authzid: str = "") -> bytes:
    """`AUTH PLAIN <initial response>` (RFC 4954 §4, RFC 4616 §2: [authzid] NUL authcid NUL passwd).

    Raises ValueError if a field contains NUL.
    """
    if "\0" in user or "\0" in password or "\0" in authzid:
        raise ValueError("SASL PLAIN fields cannot contain NUL")
    message = f"{authzid}\0{user}\0{password}".encode()
    return b"AUTH PLAIN " + _sasl(message) + b"\r\n"


def auth_login(user: str, password: str) -> tuple[bytes, bytes, bytes]:
    """The three lines of AUTH LOGIN (draft-murchison-sasl-login): the command, then the
    base64 user name and password, each sent after a 334 challenge.

    These are continuation responses, not initial responses: an empty one is an empty
    line (RFC 4954 §4), not "=".
    """
    return (
        b"AUTH LOGIN\r\n",
        base64.b64encode(user.encode("utf-8")) + b"\r\n",
        base64.b64encode(password.encode("utf-8")) + b"\r\n",
    )
