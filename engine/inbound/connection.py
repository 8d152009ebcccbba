"""The transport side of one inbound connection, under the SMTP conversation that
protocol.py's SmtpServerProtocol adds on top: when to stop and resume reading, how
replies go out, the per-command deadline the worker's sweeper enforces, and the
ways a connection ends (timeout, drain, close)."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from engine.observe import log
from engine.smtp.events import State
from engine.smtp.replies import R421_SHUTTING_DOWN, R421_TIMEOUT
from engine.smtp.server import ServerSession

if TYPE_CHECKING:
    from engine.inbound.context import WorkerContext

_DATA_STATES = (State.DATA, State.BDAT, State.BDAT_MORE)
# A session waiting for a SASL line holds no mail: drain ends it like an idle one.
_IDLE_STATES = (State.CONNECTED, State.READY, State.GREETING, State.AUTH)


class InboundConnection(asyncio.Protocol):
    """Flow control, output, deadline and ending of one accepted connection."""

    def __init__(self, ctx: WorkerContext, session: ServerSession) -> None:
        self.ctx = ctx
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.deadline = math.inf  # loop.time() after which the sweeper ends us
        self.busy = False  # a decision (commit, auth, TLS handshake) is pending
        self.closing = False
        self._reading_paused = False
        self._write_paused = False

    # --- flow control ----------------------------------------------------------------
    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands (bounded
        # memory under a pipelining flood).
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self.busy:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closing:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- output ----------------------------------------------------------------------
    def _write(self, out: list[bytes]) -> None:
        """Send the replies gathered in `out` in one write, and empty it."""
        if not out:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(out) if len(out) > 1 else out[0])
            out.clear()
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        # A deadline per command (or per DATA phase), not per read: a client that
        # dribbles one byte a minute still times out (P8).
        if self.busy:
            return
        ctx = self.ctx
        budget = ctx.data_timeout if self.session.state in _DATA_STATES else ctx.command_timeout
        self.deadline = ctx.loop.time() + budget

    # --- ending ----------------------------------------------------------------------
    def timed_out(self) -> None:
        """Called by the worker's sweeper once `deadline` has passed."""
        if self.closing:
            # Closed a sweep ago and still here: close() waits for the write buffer
            # to flush, which a client that never reads never lets happen. Drop it,
            # or it holds its slot, its per-IP count and its buffer for ever (P8).
            if self.transport is not None:
                self.transport.abort()
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(R421_TIMEOUT.to_bytes())
        log.info("session_timeout", client=self.client_ip, state=self.session.state.value)
        self.close()

    def shutdown_if_idle(self) -> bool:
        """Drain: end a session that is between transactions; True if it was ended."""
        if self.busy or self.session.state not in _IDLE_STATES:
            return False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(R421_SHUTTING_DOWN.to_bytes())
        self.close()
        return True

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()
