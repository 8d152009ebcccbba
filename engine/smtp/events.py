"""What the server machine reports (events), the states it moves through, and the
per-transaction envelope it keeps: the vocabulary shared by engine.smtp.server and
its adapter."""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from engine.smtp.commands import Command, Mail, Rcpt
from engine.smtp.replies import Reply


class State(enum.Enum):
    GREETING = "greeting"  # connected, banner not yet sent
    CONNECTED = "connected"  # banner sent, no EHLO/HELO yet
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # sender accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading DATA content
    BDAT = "bdat"  # reading a BDAT chunk
    BDAT_MORE = "bdat_more"  # between BDAT chunks
    AUTH = "auth"  # waiting for a SASL continuation line
    TLS_HANDSHAKE = "tls_handshake"  # 220 to STARTTLS sent; plaintext is dead
    CLOSED = "closed"


class _Sentinel(enum.Enum):
    NEED_DATA = "need_data"
    PAUSED = "paused"


NEED_DATA: Final = _Sentinel.NEED_DATA
PAUSED: Final = _Sentinel.PAUSED


class CommandReceived(msgspec.Struct, frozen=True):
    command: Command


class MessageReceived(msgspec.Struct, frozen=True):
    content: bytes  # unstuffed, exactly as the client meant it; no Received: yet
    chunked: bool  # BDAT rather than DATA


class AuthResponse(msgspec.Struct, frozen=True):
    line: str  # one SASL continuation line (base64 or "*")


class AutoReply(msgspec.Struct, frozen=True):
    reply: Reply


class ConnectionClosed(msgspec.Struct, frozen=True):
    pass


Event = CommandReceived | MessageReceived | AuthResponse | AutoReply | ConnectionClosed


class Envelope:
    """Per-transaction facts (RFC 5321's mail transaction)."""

    __slots__ = ("dot_lines", "mail", "rcpts")

    def __init__(self) -> None:
        self.mail: Mail | None = None
        self.rcpts: list[Rcpt] = []
        # Set with MessageReceived: does a line of its content start with "."? (DATA:
        # a stuffed ".." was seen, RFC 5321 §4.5.2.) The queue record keeps it, so the
        # relaying client skips its stuffing scan when False.
        self.dot_lines = True
