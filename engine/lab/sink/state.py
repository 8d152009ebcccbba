"""What a running SMTP sink shares between its connections: counters, recordings, faults.

Split from `engine.lab.sink.protocol` (the per-connection state machine) so each stays
small; everything here runs on the one event loop thread, so no locks.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Script = Callable[[str, str], "str | None"]
OnMessage = Callable[[str, list[str], bytes, bool], None]
OnAccepted = Callable[[], None]
NO_REPLY = "\0no reply"  # a script's answer meaning "send nothing"

ACCEPT, DEFER, REJECT, DISCONNECT = 0, 1, 2, 3
END_REPLIES = {
    ACCEPT: "250 2.0.0 queued",
    DEFER: "451 4.3.0 deferred by volley sink (--defer-rate)",
    REJECT: "550 5.7.1 rejected by volley sink (--reject-rate)",
}


class Faults:
    """Scripted misbehaviour: one seeded draw per transaction picks its verdict.

    The rates are disjoint slices of [0, 1): a draw below `disconnect_rate` drops the
    connection, the next `defer_rate` defers, the next `reject_rate` rejects, the rest
    is accepted; so their sum must be at most 1. With a seed the sequence of verdicts is
    the same on every run (which connection gets which depends on timing).
    """

    def __init__(self, *, defer_rate: float = 0.0, reject_rate: float = 0.0,
                 disconnect_rate: float = 0.0, latency: float = 0.0, seed: int | None = None) -> None:
        rates = (disconnect_rate, defer_rate, reject_rate)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("each rate must be within 0..1 and together at most 1")
        if latency < 0:
            raise ValueError("latency must not be negative")
        self.latency = latency
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self._random = random.Random(self.seed).random
        self._cuts = (disconnect_rate, disconnect_rate + defer_rate,
                      disconnect_rate + defer_rate + reject_rate)
        self.active = sum(rates) > 0

    def verdict(self) -> int:
        if not self.active:
            return ACCEPT
        draw = self._random()
        disconnect, defer, reject = self._cuts
        if draw < disconnect:
            return DISCONNECT
        if draw < defer:
            return DEFER
        if draw < reject:
            return REJECT
        return ACCEPT


class LiveConnection(Protocol):
    """What the sink needs of an open connection: its transport, to drop it on close."""

    transport: asyncio.Transport | None


@dataclass
class SinkMessage:
    """One message the sink accepted (or refused, in `Sink.refused`)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # unstuffed, without the terminating ".\r\n"
    tls: bool = False
    peer: str = ""  # the client's address (which source address it connected from)
    ehlo: str = ""  # the name the client gave in its latest EHLO / HELO


@dataclass
class Sink:
    """A running sink (one or more listeners); recordings are plain lists updated in place."""

    servers: list[asyncio.AbstractServer]
    port: int  # the first listener's port
    addresses: list[str] = field(default_factory=list)  # "host:port" per listener
    messages: list[SinkMessage] = field(default_factory=list)
    refused: list[SinkMessage] = field(default_factory=list)  # end of data answered non-2xx
    segments: list[bytes] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)
    connections: int = 0
    keep_segments: bool = True
    record: bool = True  # keep messages/refused/commands; False: counters only
    faults: Faults | None = None
    on_message: OnMessage | None = None
    on_accepted: OnAccepted | None = None  # per accepted message, after on_message; no data copied
    accepted: int = 0  # end of data answered 2xx
    deferred: int = 0  # ... 4xx
    rejected: int = 0  # ... 5xx
    disconnected: int = 0  # dropped by `faults` at the end of data, unanswered
    last: float = 0.0  # time.monotonic() of the latest accepted message
    max_live: int = 0  # most connections open at the same time
    auth_users: list[str] = field(default_factory=list)  # successful AUTH PLAIN logins
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    live: set[LiveConnection] = field(default_factory=set)  # the open connections

    @property
    def server(self) -> asyncio.AbstractServer:
        return self.servers[0]

    def _notify(self) -> None:
        self._changed.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until `count` messages were accepted; asyncio.TimeoutError after `timeout`."""

        async def wait() -> None:
            while self.accepted < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        for server in self.servers:
            server.close()
        for conn in list(self.live):
            if conn.transport is not None:
                conn.transport.abort()
        for server in self.servers:
            await server.wait_closed()
