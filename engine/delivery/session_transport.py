"""What a delivery session does with its transport (session.py has the theory of
operation): each write, joined or scattered and held back under flow control; the one
deadline that bounds every wait, re-armed at each write with the sum of the phases still
awaited (house rule 8); and the ways out: the deadline's expiry, QUIT (RSET first after
an unclean end) and abort.

`SessionTransport` is the part of `DeliverySession` that does this; the attributes it
declares are the session's own, set up by `DeliverySession.__init__`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from engine.config import TimeoutsConfig
from engine.delivery.deadline import Deadline
from engine.delivery.outcome import transient_failure
from engine.observe import log
from engine.smtp.client import QUIT, RSET, Transaction
from engine.smtp.replies import Reply

# Below this many octets a write's parts are joined rather than scattered.
_SCATTER_MIN = 16 * 1024


class _InFlightTx(Protocol):
    """A transaction in flight, as the deadline sees it (session._InFlight)."""

    tx: Transaction


class SessionTransport:
    loop: asyncio.AbstractEventLoop
    timeouts: TimeoutsConfig
    transport: asyncio.Transport
    closed: bool
    ready: bool
    quitting: bool
    _rset_first: bool
    _last_clean: bool
    _write_paused: bool
    _backlog: list[bytes]
    _closed_fut: asyncio.Future[None]
    _inflight: Sequence[_InFlightTx]
    _deadline: Deadline
    _phase_timeout: dict[str, float]

    @property
    def where(self) -> str:
        raise NotImplementedError

    def _fail_all(self, reply: Reply) -> None:
        raise NotImplementedError

    # --- writing and deadlines -----------------------------------------------------------
    def _write(self, out: list[bytes]) -> None:
        if not out or self.closed or self.transport.is_closing():
            out.clear()
            return
        if self._write_paused:
            self._backlog += out  # flow control: resume_writing flushes
        else:
            self._send(out)
        out.clear()
        # House rule 8: a pipelined write gets the sum of its phases' timeouts.
        timeouts = self._phase_timeout
        budget = 0.0
        for entry in self._inflight:
            for phase in entry.tx.pending_phases:
                budget += timeouts[phase]
        self._deadline.set(self.loop.time() + budget)

    def _send(self, parts: list[bytes]) -> None:
        """One write of `parts`: joined when small (cheaper than a buffer per part),
        else one scatter write, so a body is never copied (uvloop's writelines is one
        writev; asyncio's joins, as we would)."""
        if len(parts) == 1:
            self.transport.write(parts[0])
        elif sum(map(len, parts)) < _SCATTER_MIN:
            self.transport.write(b"".join(parts))
        else:
            self.transport.writelines(parts)

    def _on_deadline(self) -> None:
        if self.closed or not self.ready:
            return
        if self.quitting:
            self._abort_transport()
        elif self._inflight:
            phase = self._inflight[0].tx.phase or "reply"
            log.info("delivery_timeout", where=self.where, phase=phase)
            self._fail_all(transient_failure(
                "timeout", f"timeout waiting for the reply to {phase.upper()} from {self.where}"))
            self._abort_transport()
        else:
            self.begin_quit()  # idle_timeout

    # --- ending --------------------------------------------------------------------------
    def begin_quit(self) -> None:
        """Send QUIT (RFC 5321 §4.1.1.10) and close on its reply, or after timeouts.quit.
        Anything in flight is aborted first (4.4.2)."""
        if self.closed or self.quitting:
            return
        self.quitting = True
        self._fail_all(transient_failure("lost", f"connection to {self.where} closed by us"))
        # After an unclean end (a refused BDAT above all: RFC 3030 §2, the state is
        # indeterminate and RSET MUST clear it before further commands) RSET goes first.
        self._rset_first = not self._last_clean
        self.transport.write(RSET + QUIT if self._rset_first else QUIT)
        self._deadline.set(self.loop.time() + float(self.timeouts.quit))

    async def quit(self) -> None:
        """QUIT and wait (bounded by timeouts.quit) until the connection is closed."""
        self.begin_quit()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_fut)

    def close(self, reply: Reply | None = None) -> None:
        """Abort the connection now; in-flight jobs get `reply` (default 4.4.2)."""
        self._fail_all(reply or transient_failure("lost", f"connection to {self.where} aborted"))
        self._abort_transport()

    def _abort_transport(self) -> None:
        self.ready = False
        self._deadline.cancel()
        self.transport.abort()
