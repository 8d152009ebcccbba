"""What all connections of one blast run share: message bytes built once, tickets, counters.

Split from `engine.lab.blast.protocol` (the per-connection state machine) so each stays
small; everything here runs on the one event loop thread, so no locks.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from typing import TYPE_CHECKING, Protocol

from engine.lab.blast.message import RCPT_TEMPLATE, SENDER, BodyFor, command_blocks, make_message

if TYPE_CHECKING:
    from engine.lab.blast.auth import BlastAuth

__all__ = ["Shared", "UNLIMITED_QUOTA"]

UNLIMITED = 1 << 62  # a count no run reaches: "no limit" without a special case per message
# A connection's quota when -m is not given: "no limit" too (after a billion messages the
# connection reconnects), but one 30-bit digit, so decrementing it allocates nothing.
UNLIMITED_QUOTA = (1 << 30) - 1
# Above this many bytes, "body + next group" is concatenated per message instead of kept
# as a table of every combination (domains x body size: 10,000 domains x 100 kB = 1 GB).
_CHAIN_TABLE_BYTES = 32 << 20


class LiveConnection(Protocol):
    """What the run needs of a connection in flight: its reply deadline and a way to end it."""

    deadline: float

    def expire(self) -> None: ...

    def abort(self) -> None: ...


class Shared:
    """State shared by all connections of one run: tickets, message bytes, counters.

    Plain attributes and dicts, no locks: everything runs on one event loop thread.
    Slots, because past 30 attributes CPython 3.11 stops specialising instance-dict
    attribute loads, and every message reads a dozen of these.
    """

    __slots__ = (
        "loop", "unlimited", "total", "pipelining", "chain", "rate", "timeout", "per_session",
        "unreserved", "tls_context", "tls_name", "auth", "blocks", "joined", "recipients",
        "body_for", "fixed", "body", "chained", "started", "stop_at", "interrupted",
        "next_ticket", "attempted", "sent", "accepted", "failed", "refused", "rcpt_refused",
        "errors", "connections", "latencies", "live",
    )

    def __init__(
        self,
        *,
        messages: int,
        recipients: int,
        domains: int,
        size: int = 1024,
        pipelining: bool,
        chain: bool = True,
        rate: float,
        duration: float,
        timeout: float,
        per_session: int,
        loop: asyncio.AbstractEventLoop,
        body: tuple[bytes | None, BodyFor] | None = None,
        sender: str = SENDER,
        rcpt_template: str = RCPT_TEMPLATE,
        tls_context: ssl.SSLContext | None = None,
        tls_name: str | None = None,
        auth: BlastAuth | None = None,
    ) -> None:
        self.loop = loop
        # 0 messages with a duration: no count limit, the duration ends the run.
        self.unlimited = messages == 0 and duration > 0
        self.total = UNLIMITED if self.unlimited else messages
        self.pipelining = pipelining
        self.chain = chain
        self.rate = rate
        self.timeout = timeout
        self.per_session = per_session
        self.unreserved = self.total  # messages no connection has claimed (with per_session)
        self.tls_context = tls_context
        self.tls_name = tls_name
        self.auth = auth  # None: no AUTH
        self.blocks = command_blocks(recipients, domains, sender, rcpt_template)
        self.joined = [b"".join(b) for b in self.blocks]  # pipelined form: one write
        self.recipients = max(1, recipients)
        if body is None:
            fixed = make_message(size, sender) + b".\r\n"
            body = (fixed, lambda _: fixed)
        one, self.body_for = body
        # `fixed`: every message has the same body, and the table of "body + next group"
        # (RFC 2920 chaining: one write per message) is small enough to build up front.
        self.fixed = one is not None and len(one) * len(self.joined) <= _CHAIN_TABLE_BYTES
        self.body = one if one is not None else b""  # body + end of data: one write
        self.chained = [self.body + j for j in self.joined] if self.fixed else []
        self.started = loop.time()
        self.stop_at = self.started + duration if duration > 0 else math.inf
        self.interrupted = False
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
        self.live: set[LiveConnection] = set()

    def reserve(self) -> int:
        """Messages the next connection may take (0: the run has none left).

        With `per_session` each connection claims its share before it connects, so
        -n 105 -m 10 opens exactly 11 connections and none connects only to QUIT.
        """
        t = self.next_ticket
        if t >= self.total or (self.stop_at != math.inf and self.due(t) >= self.stop_at):
            return 0  # (the test `take` makes: no connection that could only QUIT)
        if not self.per_session:
            return UNLIMITED_QUOTA
        quota = min(self.per_session, self.unreserved)
        self.unreserved -= quota
        return quota

    def release(self, quota: int) -> None:
        """Give back what a finished connection claimed but did not take."""
        if self.per_session:
            self.unreserved += quota

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

    def interrupt(self) -> None:
        """Start no more messages; those in flight finish (Ctrl-C, or a library's stop)."""
        self.interrupted = True
        self.stop_at = min(self.stop_at, self.loop.time())

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def refuse(self, code: int) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def sweep(self) -> None:
        """Abort connections whose awaited reply is overdue (one timer per run, not per reply)."""
        now = self.loop.time()
        for conn in [c for c in self.live if c.deadline < now]:
            conn.expire()
