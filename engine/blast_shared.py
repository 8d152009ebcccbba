"""What all connections of one blast run share: message bytes built once, tickets, counters.

Split from `engine.blast_protocol` (the per-connection state machine) so each stays
small; everything here runs on the one event loop thread, so no locks.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.blast_protocol import BlastConnection

SENDER = "blast@volley.test"
HELO_NAME = "blast.volley.test"
_LINE = 76  # filler characters per body line (RFC 5322 recommends <= 78 with CRLF)
_FILLER = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3)[:_LINE]


@functools.lru_cache(maxsize=16)
def make_message(size: int) -> bytes:
    """A message of exactly `size` bytes (headers included) ending in CRLF; min ~200 bytes.

    No line starts with "." so the bytes need no dot-stuffing and can be written as is;
    the sink (and the server) see exactly these bytes after unstuffing.
    """
    date = email.utils.formatdate(usegmt=True)
    head = (
        f"From: <{SENDER}>\r\n"
        f"To: <u0@d0.example>\r\n"
        f"Subject: volley blast {size}\r\n"
        f"Message-ID: <blast-{size}@volley.test>\r\n"
        f"Date: {date}\r\n"
        "\r\n"
    ).encode()
    room = size - len(head)
    if room <= 0:
        return head
    if room < 3:  # too little for a filler line ("x\r\n"): pad the subject instead
        return head.replace(b"\r\nMessage-ID", b"x" * room + b"\r\nMessage-ID", 1)
    lines: list[bytes] = []
    while room > 0:
        n = min(_LINE + 2, room)
        if 0 < room - n < 3:  # keep the last line at least "x\r\n"
            n = room - 3
        lines.append(_FILLER[: n - 2] + b"\r\n")
        room -= n
    return head + b"".join(lines)


def command_blocks(recipients: int, domains: int) -> list[list[bytes]]:
    """Per message i, its commands are blocks[i % domains]: MAIL, RCPT..., DATA lines.

    Recipient j of the whole run is u{j % (D*R)}@d{j % D}.example, so consecutive
    recipients walk the domains and the pattern repeats every `domains` messages:
    precomputing D blocks removes all per-message formatting.
    """
    r, d = max(1, recipients), max(1, domains)
    span = r * d
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    blocks = []
    for m in range(d):
        rcpts = [
            f"RCPT TO:<u{j}@d{j % d}.example>\r\n".encode()
            for j in ((m * r + k) % span for k in range(r))
        ]
        blocks.append([mail, *rcpts, b"DATA\r\n"])
    return blocks


class Shared:
    """State shared by all connections of one run: tickets, message bytes, counters.

    Plain attributes and dicts, no locks: everything runs on one event loop thread.
    """

    def __init__(
        self,
        *,
        messages: int,
        recipients: int,
        domains: int,
        size: int,
        pipelining: bool,
        chain: bool = True,
        rate: float,
        duration: float,
        timeout: float,
        per_session: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self.total = messages
        self.pipelining = pipelining
        self.chain = chain
        self.rate = rate
        self.timeout = timeout
        self.per_session = per_session
        self.blocks = command_blocks(recipients, domains)
        self.joined = [b"".join(b) for b in self.blocks]  # pipelined form: one write
        self.recipients = max(1, recipients)
        self.body = make_message(size) + b".\r\n"  # body + end of data: one write
        # Chained form (RFC 2920): body, end of data and the next message's group, one write.
        self.chained = [self.body + j for j in self.joined]
        self.started = loop.time()
        self.stop_at = self.started + duration if duration > 0 else math.inf
        self.next_ticket = 0
        # Counters reported at the end.
        self.attempted = 0
        self.sent = 0
        self.accepted = 0
        self.failed = 0
        self.refused: dict[int, int] = {}
        self.rcpt_refused: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.connections = 0
        self.latencies: list[float] = []
        self.live: set[BlastConnection] = set()

    def take(self) -> int:
        """The next message's ticket, or -1 when the run is out of messages or time."""
        t = self.next_ticket
        if t >= self.total:
            return -1
        if self.stop_at != math.inf and self.due(t) >= self.stop_at:
            return -1
        self.next_ticket = t + 1
        return t

    def take_now(self) -> int:
        """Like `take`, but only a ticket that may start right away (for chaining); a
        ticket the rate cap holds back is left for `take` after the current message."""
        if self.rate > 0 and self.due(self.next_ticket) > self.loop.time() + 0.0005:
            return -1
        return self.take()

    def due(self, ticket: int) -> float:
        """Loop time at which `ticket` may start under the rate cap (start time if none)."""
        if self.rate <= 0:
            return max(self.started, self.loop.time())
        return self.started + ticket / self.rate

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def refuse(self, code: int) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def sweep(self) -> None:
        """Abort connections whose awaited reply is overdue (one timer per run, not per reply)."""
        now = self.loop.time()
        for conn in [c for c in self.live if c.deadline < now]:
            conn.expire()
