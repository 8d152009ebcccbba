"""The lock-step transaction of one blast connection (`--no-pipelining`): MAIL, each
RCPT and DATA in a round trip of their own, as a client without RFC 2920 does.

A mixin of the per-connection state machine (engine.lab.blast.protocol), kept apart so
that module stays about the pipelined path that load tests use most.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.lab.blast.shared import Shared

__all__ = ["LockStepSteps", "positive"]


def positive(code: int) -> bool:
    return 200 <= code < 300


class LockStepSteps:
    """BlastConnection's lock-step steps, from MAIL to the 354 before the body."""

    if TYPE_CHECKING:  # provided by BlastConnection (whose __slots__ hold them)
        s: Shared
        ticket: int
        rcpt_ok: int
        rcpt_first_bad: int
        rcpt_index: int
        rset: bool

        def _write(self, data: bytes) -> None: ...
        def _expect(self, n: int, handler: Callable[[list[tuple[int, bytes]]], None]) -> None: ...
        def _finish(self, code: int, accepted: bool) -> None: ...
        def _next_message(self) -> None: ...
        def _send_body(self) -> None: ...
    else:
        __slots__ = ()  # (for the type checker the attributes above are this class's own)

    def _send_mail(self) -> None:
        self._write(self.s.blocks[self.ticket % len(self.s.blocks)][0])
        self._expect(1, self._on_mail)

    def _on_mail(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if not positive(code):
            self._finish(code, False)
            self._next_message()
            return
        self.rcpt_ok, self.rcpt_first_bad, self.rcpt_index = 0, 0, 1
        self._send_rcpt()

    def _send_rcpt(self) -> None:
        self._write(self.s.blocks[self.ticket % len(self.s.blocks)][self.rcpt_index])
        self._expect(1, self._on_rcpt)

    def _on_rcpt(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if positive(code):
            self.rcpt_ok += 1
        else:
            self.s.rcpt_refused[code] = self.s.rcpt_refused.get(code, 0) + 1
            self.rcpt_first_bad = self.rcpt_first_bad or code
        self.rcpt_index += 1
        if self.rcpt_index <= self.s.recipients:
            self._send_rcpt()
        elif not self.rcpt_ok:  # nobody to send to: don't issue DATA
            self._finish(self.rcpt_first_bad, False)
            self.rset = True
            self._next_message()
        else:
            self._write(b"DATA\r\n")
            self._expect(1, self._on_data)

    def _on_data(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if code != 354:
            self._finish(code, False)
            self.rset = True
            self._next_message()
            return
        self._send_body()
