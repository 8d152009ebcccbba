"""The client side of SMTP: pure helpers and one pure machine per mail transaction.

Theory of operation
-------------------
The delivery adapter (engine/delivery/session.py) owns the socket and the clock; this
module owns every protocol decision. Per connection the adapter:

1. parses the banner with a `ReplyParser`, writes `greeting_bytes(name)` and turns the 250
   into `Capabilities` with `parse_ehlo` (if EHLO is refused: `helo_bytes`, and
   `Capabilities()` — no extensions). Optionally `STARTTLS` (220 expected, then a fresh
   parser and EHLO again, RFC 3207 §4.2) and AUTH (`auth_plain`, `auth_login`).
2. per message builds `Transaction(envelope, caps, first_on_connection=…, needs_rset=…)`.
   If `tx.done` right away, `precheck()` refused it and nothing is sent. Otherwise it
   writes `tx.initial_bytes()` in one write, feeds every parsed reply to `tx.on_reply`,
   writes what that returns (one write each), and stops when `tx.done`. `tx.phase` names
   the reply being waited for, so the adapter picks its deadline (RFC 5321 §4.5.3.2:
   MAIL 5 min, RCPT 5 min, DATA 2 min, end of data 10 min); `tx.pending_phases` lists all
   outstanding ones, so a pipelined write gets the sum (house rule 8).
3. reads `tx.outcomes` — one Reply per recipient, in order — and `tx.clean`.

Shapes of one transaction (→ one write, ← the replies that write waits for):

    PIPELINING, DATA:      → [RSET] MAIL RCPT… DATA   ← [250] 250 250… 354
                           → body "." (or a lone "." : RFC 2920 §3.1)   ← 250
    PIPELINING, CHUNKING:  → [RSET] MAIL RCPT… BDAT <n> LAST + body   ← [250] 250 250… 250
    lockstep (no PIPELINING): one command per write, each after the previous reply;
                           with CHUNKING, BDAT <n> LAST + body after the last RCPT reply.

BDAT is pipelined behind the RCPTs (RFC 3030 §4.2): one write and one read per message,
the body as is, no stuffing scan (§2). If MAIL or every RCPT is refused, the server still
must accept and discard the chunk before it refuses the BDAT (§2); that reply is awaited
like any other, then RSET (§2: the state after a failed BDAT is indeterminate, RSET MUST
clear it before further commands).

Content goes out in parts (`initial_parts`, `on_reply_parts`; `initial_bytes`/`on_reply`
join them): the commands, the Envelope's `prefix` (a DKIM-Signature) and the body, for
one scatter write that never copies the body. DATA skips the stuffing scan when the
Envelope's `dot_lines` is False (the receiver saw no line starting with ".").

Chaining (RFC 2920 §3.1 lets message content open the next group): with PIPELINING the
adapter may append the next transaction's `initial_bytes()` to this one's end-of-data
write, built with `needs_rset=False`; replies are then fed to this transaction until it
is `done` and to the next after. Nothing here depends on how replies were split in reads.
If the earlier one ends unclean after its data (421, ClientProtocolError) the connection
is finished: `abort()` the chained one.

Outcomes (RFC 2920 §3.1 and RFC 5321 §3.3): MAIL refused → every recipient gets the MAIL
reply; RCPT refused → that recipient gets its RCPT reply; DATA (or BDAT) refused → every
accepted recipient gets that reply; otherwise accepted recipients get the end-of-data
reply. A 421 at any point ends the transaction (the server is closing, RFC 5321 §3.8):
recipients not already refused get the 421.

Preconditions on the Envelope: addresses and parameters are what `parse_command` accepted
on the way in; the body has only CRLF line endings (the receiver refused bare CR/LF, P5)
— it is not rescanned here. A body not ending in CRLF gets one, so DATA and BDAT deliver
the same octets.

The transitions on each reply, and the phase names, are client_transitions.py's.
"""

from __future__ import annotations

from collections import deque

from engine.smtp.client_replies import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    Capabilities,
    ClientProtocolError,
    RemoteReply,
    ReplyParser,
    parse_ehlo,
)
from engine.smtp.client_transitions import (
    _DATA,
    PHASE_DATA,
    PHASE_DATA_END,
    PHASE_MAIL,
    PHASE_RCPT,
    PHASE_RSET,
    R451_OUT_OF_TURN,
    R451_UNEXPECTED,
    TransactionTransitions,
)
from engine.smtp.client_wire import (
    QUIT,
    RSET,
    STARTTLS,
    auth_login,
    auth_plain,
    greeting_bytes,
    helo_bytes,
    starttls_ready,
)
from engine.smtp.commands import Mail, Rcpt, encode
from engine.smtp.envelope import (
    Envelope,
    Recipient,
    bdat_parts,
    content_of,
    dot_stuff,
    local_refusal,
    xtext_safe,
)
from engine.smtp.replies import Reply

__all__ = [
    "MAX_REPLY_LINE", "MAX_REPLY_LINES", "QUIT", "RSET", "STARTTLS", "Capabilities",
    "ClientProtocolError", "Envelope", "Recipient", "RemoteReply", "ReplyParser", "Transaction",
    "auth_login", "auth_plain", "dot_stuff", "greeting_bytes", "helo_bytes", "parse_ehlo",
    "starttls_ready",
]


class Transaction(TransactionTransitions):
    """One mail transaction on a session whose Capabilities are known. Not thread-safe.

    Raises ValueError from the constructor if the envelope has no recipients or an
    address or parameter would put CR or LF on the wire (P5).
    """

    # The state the replies advance is slotted in TransactionTransitions.
    __slots__ = (
        "_body",
        "_chunking",
        "_dot_lines",
        "_expect",
        "_mail_line",
        "_pipelining",
        "_prefix",
        "_rcpt_lines",
        "_refusal",
        "_refused",
        "_rset",
        "_started",
        "caps",
        "envelope",
    )

    def __init__(
        self,
        envelope: Envelope,
        caps: Capabilities,
        *,
        first_on_connection: bool,
        needs_rset: bool = False,
    ) -> None:
        recipients = envelope.recipients
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        self.envelope = envelope
        self.caps = caps
        self.done = False
        self.clean = True  # False: send RSET before the next transaction (needs_rset)
        self._pipelining = caps.pipelining
        self._chunking = caps.chunking
        # KumoMTA: no RSET before the first message on a connection, because Postfix
        # under load may count RSET as a junk command and drop the session; after EHLO
        # (RFC 5321 §4.1.4) there is no transaction to reset anyway. Later, only after a
        # transaction that left the server's state open.
        self._rset = needs_rset and not first_on_connection
        self._prefix, self._body = content_of(envelope)
        self._dot_lines = envelope.dot_lines
        size = envelope.size if envelope.size is not None else len(self._prefix) + len(self._body)
        dsn = caps.dsn
        self._mail_line = encode(
            Mail(
                envelope.sender,
                size=size if caps.size is not None else None,
                body="8BITMIME" if envelope.body_8bit and caps.eightbitmime else None,
                smtputf8=envelope.needs_smtputf8,
                ret=envelope.ret if dsn else None,
                envid=xtext_safe(envelope.envid) if dsn else None,
            )
        )
        self._rcpt_lines = [
            encode(Rcpt(r.address, notify=r.notify, orcpt=xtext_safe(r.orcpt)))
            if dsn
            else encode(Rcpt(r.address))
            for r in recipients
        ]
        lines = 1 + len(recipients)
        wire = self._mail_line + b"".join(self._rcpt_lines)
        if wire.count(b"\n") != lines or wire.count(b"\r") != lines:
            raise ValueError("envelope address or parameter contains CR or LF")
        self._expect: deque[str] = deque()
        self._next_rcpt = 0  # index of the RCPT whose reply comes next
        self._refused: list[Reply | None] = [None] * len(recipients)
        self._accepted = 0
        self._mail_reply: Reply | None = None  # MAIL's refusal
        self._failure: Reply | None = None  # RSET's refusal: applies to everyone
        self._lone_dot = False
        self._started = False
        self._outcomes: list[Reply] = []
        self._refusal = local_refusal(envelope, caps, size)
        if self._refusal is not None:
            self._finish(self._refusal, clean=True)

    # --- public API ------------------------------------------------------------------
    def precheck(self) -> Reply | None:
        """The permanent refusal decided before sending anything, or None.

        When not None the transaction is already `done`, every outcome is this reply,
        `clean` is True and `initial_bytes` must not be called.
        """
        return self._refusal

    def initial_bytes(self) -> bytes:
        """`initial_parts()` joined (one bytes object)."""
        return b"".join(self.initial_parts())

    def initial_parts(self) -> list[bytes]:
        """The first write, as parts for one scatter write: the whole pipelined group
        (with CHUNKING the BDAT line, the prefix and the body as they are), or
        (lockstep) the first command.

        Raises RuntimeError if called twice or after a precheck refusal.
        """
        if self._started or self.done:
            raise RuntimeError("initial_bytes() is called once, on a transaction not refused")
        self._started = True
        expect = self._expect
        parts: list[bytes] = []
        if self._rset:
            parts.append(RSET)
            expect.append(PHASE_RSET)
            if not self._pipelining:
                return [RSET]
        parts.append(self._mail_line)
        expect.append(PHASE_MAIL)
        if not self._pipelining:
            return [self._mail_line]
        # RFC 2920 §3.1: RSET, MAIL and RCPT may sit anywhere in a group; DATA ends it.
        parts += self._rcpt_lines
        expect.extend([PHASE_RCPT] * len(self._rcpt_lines))
        if self._chunking:
            # RFC 3030 §4.2 allows BDAT in a pipelined group: MAIL, RCPTs and the whole
            # content go in one write, so a message costs one write and one read even
            # when no other message waits to be chained behind it. If every RCPT (or
            # MAIL) is refused the server discards the chunk and refuses the BDAT.
            expect.append(PHASE_DATA_END)
            return bdat_parts(b"".join(parts), self._prefix, self._body)
        parts.append(_DATA)
        expect.append(PHASE_DATA)
        return [b"".join(parts)]

    @property
    def phase(self) -> str | None:
        """The phase of the reply awaited next ("rset", "mail", "rcpt", "data",
        "data_end"), or None when no reply is awaited."""
        return self._expect[0] if self._expect else None

    @property
    def pending_phases(self) -> tuple[str, ...]:
        """Phases of every reply still awaited, oldest first (for a summed deadline)."""
        return tuple(self._expect)

    @property
    def outcomes(self) -> list[Reply]:
        """One Reply per recipient, in envelope order.

        Raises RuntimeError before the transaction is done.
        """
        if not self.done:
            raise RuntimeError("outcomes are known only when the transaction is done")
        return self._outcomes

    def on_reply(self, reply: Reply) -> bytes | None:
        """`on_reply_parts(reply)` joined, or None."""
        parts = self.on_reply_parts(reply)
        return None if parts is None else b"".join(parts)

    def on_reply_parts(self, reply: Reply) -> list[bytes] | None:
        """Feed the next reply (in order); returns the next write's parts, or None.

        Raises ClientProtocolError if no reply was awaited, or a reply's class makes no
        sense for its command (e.g. 354 to MAIL, 250 to DATA); the transaction is then
        done and not clean, with that error's reply for every undecided recipient.
        """
        if not self._expect:
            raise ClientProtocolError(R451_OUT_OF_TURN)
        phase = self._expect.popleft()
        if reply.code == 421:
            # RFC 5321 §3.8: 421 may answer any command, and the server then closes; the
            # replies still expected will never come.
            self._finish(reply, clean=False)
            return None
        positive = 3 if phase == PHASE_DATA else 2
        klass = reply.code // 100
        if klass != positive and klass not in (4, 5):
            error = ClientProtocolError(R451_UNEXPECTED, f"Remote server sent {reply.code} to {phase.upper()}")
            self._finish(error.reply, clean=False)
            raise error
        ok = klass == positive
        if phase == PHASE_RCPT:
            return self._on_rcpt(reply, ok)
        if phase == PHASE_MAIL:
            return self._on_mail(reply, ok)
        if phase == PHASE_DATA:
            return self._on_data(reply, ok)
        if phase == PHASE_DATA_END:
            return self._on_data_end(reply, ok)
        return self._on_rset(reply, ok)

    def abort(self, reply: Reply) -> None:
        """End the transaction from outside (timeout, connection lost, ClientProtocolError
        from the parser): every undecided recipient gets `reply`. No-op if done."""
        if not self.done:
            self._finish(reply, clean=False)
