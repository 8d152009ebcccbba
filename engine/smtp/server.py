"""The server side of an SMTP session as a pure state machine (no I/O, no clock).

Theory of operation
-------------------
Bytes go in through `receive_data` (b"" = EOF). `next_event` returns one event, or
NEED_DATA (nothing complete is buffered) or PAUSED (an event is waiting for its
reply). The adapter answers every event by calling `send(reply)`, which returns the
wire bytes *and* applies the reply's effect: a 250 to MAIL opens the transaction, a 354
to DATA switches to reading content, a 220 to STARTTLS discards everything buffered.
So the machine never runs ahead of a decision, which is what lets PIPELINING work:
the adapter loops `next_event`/`send` over everything one read delivered and writes
the replies at once.

Two kinds of event:
- `CommandReceived` and `MessageReceived` need a decision (policy, queue); the adapter
  chooses the Reply.
- `AutoReply` is a decision the machine already made (syntax error, bad sequence,
  NOOP, RSET, a BDAT chunk); the adapter just sends it back through `send`.

Which command is legal in which state is the table `ALLOWED` in sequence.py, and
nothing else; a pair missing from it is answered 503 5.5.1.

Input is bounded: a command line longer than 512 octets is discarded up to its real
CRLF (never re-read as a new command), and message content
beyond the size limit is discarded while the terminator is still looked for.

Reading message content (DATA and BDAT chunks) is server_content.py's `ContentReading`.
"""

from __future__ import annotations

from engine.smtp.commands import (
    MAX_COMMAND_LINE,
    Auth,
    Bdat,
    Command,
    Ehlo,
    Helo,
    Help,
    Mail,
    Rcpt,
    SmtpSyntaxError,
    StartTls,
    parse_command,
)

# The event and state vocabulary lives in events.py; re-exported here so adapters can
# take everything from engine.smtp.server.
from engine.smtp.events import (
    NEED_DATA,
    PAUSED,
    AuthResponse,
    AutoReply,
    CommandReceived,
    ConnectionClosed,
    Envelope,
    Event,
    MessageReceived,
    State,
    _Sentinel,
)
from engine.smtp.replies import (
    R221_BYE,
    R250_RESET,
    R354_START_DATA,
    R421_TOO_MANY_ERRORS,
    R500_LINE_TOO_LONG,
    R503_ALREADY_AUTH,
    R554_PREGREET,
    Reply,
)
from engine.smtp.sequence import ALLOWED_IN, AUTO_REPLIES, JUNK, help_reply, sequence_reply
from engine.smtp.server_content import ContentReading

# Module constants: a global load is cheaper than State.X (a class attribute) on the
# per-command path.
_GREETING, _DATA, _BDAT, _AUTH = State.GREETING, State.DATA, State.BDAT, State.AUTH
_TLS_HANDSHAKE, _CLOSED = State.TLS_HANDSHAKE, State.CLOSED

# RFC 4954 §4: a SASL continuation line may be up to 12288 octets.
MAX_AUTH_LINE = 12288


class ServerSession(ContentReading):
    """One connection's SMTP state. Not thread-safe; owned by one adapter."""

    def __init__(
        self,
        *,
        max_message_size: int,
        max_unknown_commands: int = 20,
        max_junk_commands: int = 100,
        tls_active: bool = False,
    ) -> None:
        self.state = State.GREETING
        self.max_message_size = max_message_size
        self.max_unknown_commands = max_unknown_commands
        self.max_junk_commands = max_junk_commands
        self.junk = 0
        self.tls_active = tls_active
        self.envelope = Envelope()
        self.helo: str | None = None
        self.esmtp = False
        self.offered: frozenset[str] = frozenset()  # the keywords of the last EHLO reply
        self.auth_user: str | None = None
        self.errors = 0
        self.discarded_at_starttls = 0  # bytes pipelined after STARTTLS, never executed
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed input in _buf
        self._eof = False
        self._pending: Event | None = None  # event awaiting send()
        self._pregreet = False
        self._discarding_line = False
        # DATA: content region starts at the CRLF that ended the DATA command.
        self._data_start = 0
        self._scan = 0
        self._too_big = False
        # BDAT
        self._chunks: list[bytes] = []
        self._chunked_size = 0
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._auth_return = State.READY

    # --- input -------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if not data:
            self._eof = True
            return
        state = self.state
        if state is _GREETING:
            self._pregreet = True
        elif state is _TLS_HANDSHAKE or state is _CLOSED:
            # P6: nothing that arrives between our 220 and the handshake is executed.
            self.discarded_at_starttls += len(data)
            return
        # Outside DATA keep the 2 octets before _pos: if the pending event is the 354 to
        # DATA, send() starts the content region at the CRLF that ended the DATA line.
        buf = self._buf
        if state is _DATA:
            keep = self._data_start
            if keep:
                self._data_start = 0
        else:
            keep = self._pos - 2
        if keep > 0:
            del buf[:keep]
            self._pos -= keep
            scan = self._scan - keep
            self._scan = scan if scan > 0 else 0
        buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    # --- events --------------------------------------------------------------------
    def next_event(self) -> Event | _Sentinel:
        """The next event, NEED_DATA, or PAUSED while an event awaits `send`."""
        if self._pending is not None:
            return PAUSED
        if self._pos == len(self._buf) and not self._eof and self.state is not _GREETING:
            # Nothing unread (the common case after each reply): no state can make an
            # event out of no new input, so skip the per-state readers.
            return NEED_DATA
        event = self._next()
        if event is None:
            if self._eof and self.state is not State.CLOSED:
                self.state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        self._pending = event
        return event

    def _next(self) -> Event | None:
        state = self.state
        if state is _DATA:
            return self._read_data()
        if state is _GREETING:
            return AutoReply(R554_PREGREET) if self._pregreet else None
        if state is _BDAT:
            return self._read_chunk()
        if state is _TLS_HANDSHAKE or state is _CLOSED:
            return None
        line = self._read_line(MAX_AUTH_LINE if state is _AUTH else MAX_COMMAND_LINE)
        if line is None:
            return None
        if not isinstance(line, bytes):  # a Reply: the line was too long
            return self._error(line)
        if state is _AUTH:
            return AuthResponse(line.decode("ascii", "replace"))
        return self._command(line)

    def _read_line(self, limit: int) -> bytes | Reply | None:
        buf = self._buf
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > limit:
                # Discard up to the real CRLF (finding 2): the tail of an overlong
                # line must never come back as a command of its own.
                self._discarding_line = True
                tail = buf[-1:] if buf.endswith(b"\r") else b""
                del buf[:]
                buf += tail
                self._pos = 0
            return None
        start, self._pos = self._pos, end + 2
        if self._discarding_line or end + 2 - start > limit:
            self._discarding_line = False
            return R500_LINE_TOO_LONG
        return bytes(buf[start:end])

    def _error(self, reply: Reply) -> AutoReply:
        self.errors += 1
        if self.errors > self.max_unknown_commands:
            return AutoReply(R421_TOO_MANY_ERRORS)
        return AutoReply(reply)

    def _command(self, line: bytes) -> Event | None:
        mail = self.envelope.mail
        try:
            command = parse_command(line, utf8_rcpt=mail is not None and mail.smtputf8)
        except SmtpSyntaxError as err:
            return self._error(err.reply)
        kind = type(command)
        if self.state not in ALLOWED_IN[kind]:
            if isinstance(command, Bdat):
                # RFC 3030 §2: the chunk follows regardless; swallow it, then refuse.
                self._start_chunk(command, sequence_reply(command, self.state))
                # None until the whole chunk is here: a BDAT has no reply of its own
                # before its chunk (RFC 3030 §2).
                return self._read_chunk()
            if isinstance(command, Auth) and self.auth_user is not None:
                return self._error(R503_ALREADY_AUTH)
            return self._error(sequence_reply(command, self.state))
        auto = AUTO_REPLIES.get(kind)
        if auto is not None:
            if kind in JUNK:
                # Postfix's smtpd_junk_command_limit: a session that only NOOPs, RSETs
                # or VRFYs is kept from holding a slot forever (P8).
                self.junk += 1
                if self.junk > self.max_junk_commands:
                    return AutoReply(R421_TOO_MANY_ERRORS)
                if kind is Help:  # what this session offers (RFC 5321 §4.1.1.8)
                    return AutoReply(help_reply(self.offered))
            return auto
        if kind is Bdat:
            self._start_chunk(command, None)  # type: ignore[arg-type]
            return self._read_chunk()  # None until the chunk is complete
        if kind is Auth and self.auth_user is not None:
            return self._error(R503_ALREADY_AUTH)
        return CommandReceived(command)

    # --- output --------------------------------------------------------------------
    # The dispatch on `kind = type(x)` in this class costs one call per command where a chain of
    # isinstance() tests would cost several (and isinstance on a msgspec Struct is ~5x a
    # type() call); mypy cannot narrow through `kind`, hence the few `type: ignore`s.
    def send(self, reply: Reply) -> bytes:
        """Reply to the pending event (or send the banner); returns the wire bytes.

        The reply decides the transition: see the module docstring.
        """
        event, self._pending = self._pending, None
        kind = type(event)
        if reply.code == 421:
            self.state = State.CLOSED
        elif kind is CommandReceived:
            self._apply(event.command, reply)  # type: ignore[union-attr]
        elif kind is AutoReply:
            decided = event.reply  # type: ignore[union-attr]
            if decided is R221_BYE or decided is R554_PREGREET:
                self.state = State.CLOSED
            else:
                self._apply_auto(decided, reply)
        elif kind is MessageReceived:
            self.reset_transaction()
        elif kind is AuthResponse:
            self._apply_auth(reply)
        elif event is None and self.state is State.GREETING:
            self.state = State.CONNECTED  # the banner
        return reply.to_bytes()

    def _apply(self, command: Command, reply: Reply) -> None:
        ok = reply.code < 400
        kind = type(command)
        if kind is Rcpt:
            if ok:
                self.envelope.rcpts.append(command)  # type: ignore[arg-type]
                self.state = State.RCPT
        elif kind is Mail:
            if ok:
                self.envelope.mail = command  # type: ignore[assignment]
                self.state = State.MAIL
        elif isinstance(command, (Ehlo, Helo)):
            if ok:
                # RFC 5321 §4.1.4: EHLO resets the transaction as RSET would.
                self.helo = command.domain
                self.esmtp = isinstance(command, Ehlo)
                # RFC 5321 §4.1.1.1: the EHLO reply's lines after the first are the
                # extensions offered, a keyword each; HELP lists only those offered.
                self.offered = frozenset(line.split(" ", 1)[0].upper()
                                         for line in reply.lines[1:]) if self.esmtp else frozenset()
                self.envelope = Envelope()
                self.state = State.READY
        elif isinstance(command, StartTls):
            if reply.code == 220:
                # CVE-2011-0411 / P6: whatever was pipelined after STARTTLS is dropped.
                self.discarded_at_starttls += self.buffered
                del self._buf[:]
                self._pos = 0
                self.state = State.TLS_HANDSHAKE
        elif isinstance(command, Auth):
            if reply.code == 334:
                self._auth_return = self.state
                self.state = State.AUTH

    def _apply_auth(self, reply: Reply) -> None:
        if reply.code != 334:
            self.state = self._auth_return

    def _apply_auto(self, decided: Reply, sent: Reply) -> None:
        if self.state is State.AUTH:
            # A 5xx (overlong SASL line) ends the exchange for the client, whose next
            # line is a command; staying in AUTH would read it as a SASL response.
            self.state = self._auth_return
        elif decided is R354_START_DATA and sent.code == 354:
            self.state = State.DATA
            self._data_start = self._pos - 2  # the CRLF of the DATA line
            self._scan = self._data_start
            self._too_big = False
        elif decided is R250_RESET:
            self.reset_transaction()
        elif self.state is State.READY and decided.code >= 400 and self._chunks == []:
            # A refused DATA/BDAT message: the transaction is over either way.
            self.reset_transaction()

    def authenticated(self, user: str) -> None:
        """The adapter verified credentials (RFC 4954 §4: one AUTH per session)."""
        self.auth_user = user

    def tls_established(self) -> None:
        """RFC 3207 §4.2: after the handshake the session starts over, EHLO first."""
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.offered = frozenset()
        self.auth_user = None
        self.envelope = Envelope()
        del self._buf[:]
        self._pos = 0
        self.state = State.CONNECTED

    def reset_transaction(self) -> None:
        self.envelope = Envelope()
        self._chunks = []
        if self.state not in (State.CONNECTED, State.CLOSED, State.TLS_HANDSHAKE):
            self.state = State.READY
