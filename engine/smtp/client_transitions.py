"""How a client Transaction moves on each reply (client.py has the theory of operation,
the shapes of a transaction and the outcome rules): the phases a reply can answer, the
remote's sequencing faults, and the transitions after RSET, MAIL, RCPT, DATA and the end
of data, down to the one outcome per recipient. Pure: no I/O, no clock.

`TransactionTransitions` is the part of `Transaction` that does this; the attributes it
declares are the transaction's own (its slots), set up by `Transaction.__init__`.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from engine.smtp.envelope import END_OF_DATA, bdat_parts, data_parts
from engine.smtp.replies import Reply

_DATA: Final = b"DATA\r\n"
_DOT: Final = END_OF_DATA

# Phase names: which reply is awaited, hence which timeout applies.
PHASE_RSET: Final = "rset"
PHASE_MAIL: Final = "mail"
PHASE_RCPT: Final = "rcpt"
PHASE_DATA: Final = "data"  # the 354 to DATA
PHASE_DATA_END: Final = "data_end"  # the reply to "." or to BDAT … LAST

# Remote faults in sequencing: transient, the adapter closes the connection.
R451_OUT_OF_TURN: Final = Reply(451, "4.5.0", "Remote server replied out of turn")
R451_UNEXPECTED: Final = Reply(451, "4.5.0", "Unexpected reply from remote server")
R451_RSET_REFUSED: Final = Reply(451, "4.5.0", "Remote server refused RSET")


class TransactionTransitions:
    # The state the replies advance; Transaction slots the rest.
    __slots__ = (
        "_accepted",
        "_failure",
        "_lone_dot",
        "_mail_reply",
        "_next_rcpt",
        "_outcomes",
        "clean",
        "done",
    )

    done: bool
    clean: bool
    _pipelining: bool
    _chunking: bool
    _prefix: bytes
    _body: bytes
    _dot_lines: bool | None
    _mail_line: bytes
    _rcpt_lines: list[bytes]
    _expect: deque[str]
    _next_rcpt: int
    _refused: list[Reply | None]
    _accepted: int
    _mail_reply: Reply | None
    _failure: Reply | None
    _lone_dot: bool
    _outcomes: list[Reply]

    def _on_rset(self, reply: Reply, ok: bool) -> list[bytes] | None:
        if ok:
            if self._pipelining:
                return None
            self._expect.append(PHASE_MAIL)
            return [self._mail_line]
        # The session's state is unknown: defer everyone, whatever the code was.
        self._failure = reply if reply.code // 100 == 4 else R451_RSET_REFUSED.with_text(
            (R451_RSET_REFUSED.lines[0] + ":", *reply.lines)
        )
        if not self._pipelining:
            self._finish(None, clean=False)
        return None  # pipelined: the group's other replies are still to come

    def _on_mail(self, reply: Reply, ok: bool) -> list[bytes] | None:
        if not ok:
            self._mail_reply = reply
        if self._pipelining:
            return None
        if not ok:
            self._finish(None, clean=self._failure is None)  # no transaction opened
            return None
        self._expect.append(PHASE_RCPT)
        return [self._rcpt_lines[0]]

    def _on_rcpt(self, reply: Reply, ok: bool) -> list[bytes] | None:
        i = self._next_rcpt
        self._next_rcpt = i + 1
        if ok:
            self._accepted += 1
        else:
            self._refused[i] = reply
        last = i + 1 == len(self._rcpt_lines)
        if self._pipelining:
            # The group ends with DATA's reply, or with pipelined BDAT's (data_end).
            return None
        if not last:
            self._expect.append(PHASE_RCPT)
            return [self._rcpt_lines[i + 1]]
        return self._after_rcpts()

    def _sendable(self) -> bool:
        return self._failure is None and self._mail_reply is None and self._accepted > 0

    def _after_rcpts(self) -> list[bytes] | None:
        if not self._sendable():
            # Clean only if MAIL was refused: otherwise the server holds an open
            # transaction with no recipient, and the next MAIL would be a 503.
            self._finish(None, clean=self._failure is None and self._mail_reply is not None)
            return None
        if self._chunking:
            # RFC 3030 §2: BDAT <octets> LAST, then exactly that many octets, no stuffing.
            self._expect.append(PHASE_DATA_END)
            return bdat_parts(b"", self._prefix, self._body)
        self._expect.append(PHASE_DATA)
        return [_DATA]

    def _on_data(self, reply: Reply, ok: bool) -> list[bytes] | None:
        if not ok:
            self._finish(reply, clean=self._failure is None and self._mail_reply is not None)
            return None
        self._expect.append(PHASE_DATA_END)
        if self._sendable():
            return data_parts(self._prefix, self._body, self._dot_lines)
        # RFC 2920 §3.1: DATA got 354 although no RCPT succeeded (pipelined); "the client
        # SMTP should send a single dot". The refusals already decided every outcome.
        self._lone_dot = True
        return [_DOT]

    def _on_data_end(self, reply: Reply, ok: bool) -> list[bytes] | None:
        if self._lone_dot:
            self._finish(None, clean=self._failure is None)
            return None
        # After ".", the transaction is over whatever the reply (RFC 5321 §4.1.1.4). After
        # a refused BDAT the state is indeterminate and RSET must clear it (RFC 3030 §2).
        self._finish(reply, clean=ok or not self._chunking)
        return None

    def _finish(self, final: Reply | None, *, clean: bool) -> None:
        self._expect.clear()
        self.done = True
        self.clean = clean
        common = self._failure if self._failure is not None else self._mail_reply
        outcomes: list[Reply] = []
        for refused in self._refused:
            outcome = common if common is not None else refused if refused is not None else final
            assert outcome is not None, "every recipient has an outcome"
            outcomes.append(outcome)
        self._outcomes = outcomes
