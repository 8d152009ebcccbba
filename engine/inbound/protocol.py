"""asyncio Protocol per inbound connection: the thin adapter around ServerSession.

Every read is run through the machine until it needs more bytes or a decision that
takes time (a queue commit, a password check); all replies produced by one read go
out in one write (house rule 5). While a decision is pending the machine is PAUSED,
so nothing pipelined behind it runs ahead.

The class runs the conversation: it feeds reads to the machine, answers commands,
hands a finished message to the queue committer and answers when the commit
completes, and runs the STARTTLS and AUTH exchanges. Its base, connection.py's
InboundConnection, does flow control, writes, the deadline and ending. What to answer
(EHLO's extensions, AUTH refusals) and what to store (the Received: header, the
queue record) are functions over plain facts in decisions.py; SASL is sasl.py's.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from typing import TYPE_CHECKING

from engine.inbound import decisions, enqueue, tls
from engine.inbound.connection import InboundConnection
from engine.inbound.feedback_intake import rcpt_refusal
from engine.inbound.sasl import AuthExchange
from engine.observe import log
from engine.smtp.commands import Auth, Command, Ehlo, Helo, Mail, Rcpt, StartTls
from engine.smtp.events import (
    AuthResponse,
    AutoReply,
    CommandReceived,
    ConnectionClosed,
    MessageReceived,
    State,
    _Sentinel,
)
from engine.smtp.replies import (
    R220_READY_TLS,
    R250_RCPT_OK,
    R250_SENDER_OK,
    R421_AUTH_BLOCKED,
    R421_SHUTTING_DOWN,
    R421_TOO_MANY_CONNECTIONS,
    R451_LOCAL_ERROR,
    R454_TLS_UNAVAILABLE,
    R502_NOT_IMPLEMENTED,
    R554_TOO_MANY_HOPS,
    Reply,
)
from engine.smtp.server import ServerSession

if TYPE_CHECKING:
    from engine.config import ListenerConfig
    from engine.inbound.context import WorkerContext

R250_REPORT_READ = Reply(250, "2.0.0", "OK report read")
# Pause reading when this much unprocessed input piles up behind a pending decision.
_MAX_BUFFERED = 1 << 20
_CLOSED = State.CLOSED


class SmtpServerProtocol(InboundConnection):
    """One inbound SMTP connection: the conversation (InboundConnection does the
    flow control, writes, deadline and ending)."""

    def __init__(self, ctx: WorkerContext, listener: ListenerConfig, implicit_tls: bool) -> None:
        limits = ctx.cfg.limits
        super().__init__(ctx, ServerSession(
            max_message_size=int(limits.max_message_size),
            max_unknown_commands=limits.max_unknown_commands,
            max_junk_commands=limits.max_junk_commands,
            tls_active=implicit_tls,
        ))
        self.listener = listener
        self.may_relay = False
        self.auth_failures = 0
        self.auth_state: AuthExchange | None = None
        self.tls_version = ""
        self._received = decisions.ReceivedHeader()
        self._greeting_handle: asyncio.TimerHandle | None = None

    # --- connection lifecycle ------------------------------------------------------
    # A stream server's loop hands us a Transport; uvloop's are not asyncio.Transport
    # subclasses, hence the narrower parameter than BaseProtocol declares.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "unix"
        ctx = self.ctx
        if not ctx.admit(self):
            transport.write(R421_TOO_MANY_CONNECTIONS.to_bytes())
            transport.close()
            self.closing = True
            return
        self.may_relay = ctx.policy.in_relay_networks(self.client_ip)
        if self.session.tls_active:
            self.tls_version = tls.negotiated_version(transport)
        delay = float(ctx.cfg.limits.greeting_delay)
        if delay > 0:
            self._greeting_handle = ctx.loop.call_later(delay, self._greet)
            self.deadline = ctx.loop.time() + delay + float(ctx.cfg.limits.command_timeout)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greeting_handle = None
        if self.closing or self.transport is None:
            return
        if self.session.buffered:
            # Pregreet: the client talked before our banner (postscreen's test).
            self._process()
            return
        banner = Reply(220, "", f"{self.ctx.hostname} ESMTP Volley")
        self.transport.write(self.session.send(banner))
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._greeting_handle is not None:
            self._greeting_handle.cancel()
        self.ctx.release(self)

    def data_received(self, data: bytes) -> None:
        session = self.session
        session.receive_data(data)
        if self.busy:
            if session.buffered > _MAX_BUFFERED:
                self._pause_reading()
            return
        if self._greeting_handle is not None:
            # Pregreet: judged when the greeting timer fires; read no more until then,
            # or a flood during the delay is buffered without bound (P8).
            self._pause_reading()
            return
        self._run_and_write([])

    def eof_received(self) -> bool | None:
        self.session.receive_data(b"")
        if not self.busy:
            self._process()
        # Plain TCP: keep our side open until what was read before the half-close is
        # answered (the 250 of a commit in flight); _run closes at ConnectionClosed.
        return not self.session.tls_active

    # --- the event loop of one session ---------------------------------------------
    def _process(self) -> None:
        """Run the machine over everything buffered; one write for all replies."""
        self._run_and_write([])

    def _run_and_write(self, out: list[bytes]) -> None:
        try:
            self._run(out)
        except Exception as err:  # one session's bug must never take the worker down
            log.error("session_error", client=self.client_ip, error=repr(err))
            out.append(R451_LOCAL_ERROR.to_bytes())
            self._write(out)
            self.close()
            return
        self._write(out)

    def _run(self, out: list[bytes]) -> None:
        # Dispatch on `kind = type(event)`: one call per event where a chain of
        # isinstance() tests would cost several; mypy cannot narrow through `kind`,
        # hence the `type: ignore`s here and in _command.
        session = self.session
        next_event = session.next_event
        while not self.closing:
            event = next_event()
            kind = type(event)
            if kind is _Sentinel:  # NEED_DATA or PAUSED
                return
            if kind is CommandReceived:
                if not self._command(event.command, out):  # type: ignore[union-attr]
                    return
            elif kind is AutoReply:
                reply = event.reply  # type: ignore[union-attr]
                if reply.code >= 400 and session.envelope.mail is not None:
                    # The machine refused a step of an open transaction (DATA with no
                    # recipient, a message too big or malformed at its end, a RCPT it
                    # could not parse): before send(), which may reset the envelope.
                    self.ctx.stats.rejected += 1
                out.append(session.send(reply))
                if session.state is _CLOSED:
                    self._write(out)
                    self.close()
                    return
            elif kind is MessageReceived:
                self._enqueue(event)  # type: ignore[arg-type]
                return
            elif isinstance(event, AuthResponse):
                if not self._auth_step(event.line, out):
                    return
            elif isinstance(event, ConnectionClosed):
                self._write(out)
                self.close()
                return

    def _command(self, command: Command, out: list[bytes]) -> bool:
        """Answer a command; False when processing must stop (a pending decision)."""
        session, policy = self.session, self.ctx.policy
        kind = type(command)
        if kind is Rcpt:
            address = command.address  # type: ignore[attr-defined]
            reply = policy.check_rcpt(
                self.may_relay or session.auth_user is not None,
                command,  # type: ignore[arg-type]
                len(session.envelope.rcpts),
            ) or (None if policy.is_feedback(address) else rcpt_refusal(self.ctx.store, address))
            if reply is not None:
                self.ctx.stats.rejected += 1
            out.append(session.send(reply or R250_RCPT_OK))
        elif kind is Mail:
            reply = policy.check_mail(
                self.listener.auth == "required" and session.auth_user is None,
                command,  # type: ignore[arg-type]
            )
            if reply is not None:
                self.ctx.stats.rejected += 1
            out.append(session.send(reply or R250_SENDER_OK))
        elif isinstance(command, (Ehlo, Helo)):
            ctx = self.ctx
            reply = decisions.greeting_reply(
                command,
                hostname=ctx.hostname,
                max_message_size=policy.max_message_size,
                listener=self.listener,
                tls_active=session.tls_active,
                tls_available=ctx.ssl_context is not None,
            )
            out.append(session.send(reply))
        elif isinstance(command, StartTls):
            return self._starttls(out)
        elif isinstance(command, Auth):
            return self._auth_start(command, out)
        else:  # pragma: no cover - the machine auto-replies every other verb
            out.append(session.send(R502_NOT_IMPLEMENTED))
        return True

    # --- DATA → queue ----------------------------------------------------------------
    def _enqueue(self, event: MessageReceived) -> None:
        """Hand the message to group commit; its 250 waits for `_committed`."""
        self.busy = True
        self.deadline = math.inf  # our own commit time never counts against the client
        ctx = self.ctx
        content = event.content
        if decisions.hop_count(content) >= ctx.cfg.limits.max_hops:
            # RFC 5321 §6.3: a message that has passed this many relays is looping
            # somewhere our MX check cannot see (Postfix: hopcount_limit, 50).
            self._refused(R554_TOO_MANY_HOPS)
            return
        if content and not content.endswith(b"\r\n"):
            # BDAT content need not end in CRLF, but the relayed copy must (P5).
            content += b"\r\n"
        enqueue.start(
            ctx, self.session, content, client_ip=self.client_ip, received=self._received,
            tls_version=self.tls_version, trusted=self.may_relay or self.session.auth_user is not None,
            submit=self._submit, fail=self._refused,
        )

    def _submit(self, sub: enqueue.Submission) -> None:
        self.ctx.committer.submit(sub.op, lambda result: self._committed(result, sub))

    def _committed(self, result: object, sub: enqueue.Submission) -> None:
        """The commit of `_enqueue` completed (on the loop thread): answer the client."""
        if isinstance(result, BaseException):
            reply = getattr(result, "reply", R451_LOCAL_ERROR)
            log.warning("queue_refused", client=self.client_ip, error=repr(result))
            self._refused(reply)
            return
        ctx = self.ctx
        if sub.report is not None:
            sub.report.log(self.client_ip)
        if not sub.msg_id:  # a report only: read, nothing queued
            self._decided(R250_REPORT_READ)
            return
        stats = ctx.stats
        stats.received += 1
        stats.received_bytes += len(sub.body)
        if sub.deferred and ctx.on_deferred is not None and sub.record is not None:
            ctx.on_deferred(sub.record.id, sub.deferred)
        if ctx.on_new_mail is not None:
            ctx.on_new_mail()
        self._decided(Reply(250, "2.0.0", f"OK queued as {sub.msg_id}"))

    def _refused(self, reply: Reply) -> None:
        """A message refused at its end (looping, unroutable, the queue refused it)."""
        if reply.code >= 400:
            self.ctx.stats.rejected += 1
        self._decided(reply)

    def _decided(self, reply: Reply) -> None:
        """A slow decision came back: send it and carry on with what is buffered."""
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            self.session.send(reply)  # keep the machine consistent; nobody listens
            return
        out = [self.session.send(reply)]
        if self.ctx.draining and self.session.state is State.READY:
            out.append(R421_SHUTTING_DOWN.to_bytes())
            self._write(out)
            self.close()
            return
        if not self._write_paused:
            self._resume_reading()
        self._run_and_write(out)

    # --- STARTTLS (RFC 3207) ------------------------------------------------------------
    def _starttls(self, out: list[bytes]) -> bool:
        ctx = self.ctx.ssl_context
        if self.listener.tls != "starttls" or ctx is None:
            out.append(self.session.send(R502_NOT_IMPLEMENTED))
            return True
        if self.session.tls_active:
            out.append(self.session.send(R454_TLS_UNAVAILABLE.with_text("TLS already active")))
            return True
        out.append(self.session.send(R220_READY_TLS))  # also drops pipelined plaintext (P6)
        self._write(out)
        out.clear()
        assert self.transport is not None
        self.transport.pause_reading()
        self.busy = True
        self.ctx.loop.create_task(self._handshake(ctx))
        return False

    async def _handshake(self, ssl_context: ssl.SSLContext) -> None:
        assert self.transport is not None
        ctx = self.ctx
        transport = await tls.upgrade(
            ctx.loop, self.transport, self, ssl_context, ctx.command_timeout, self.client_ip
        )
        if transport is None or self.closing:
            # Closed mid-handshake (e.g. by the sweeper): uvloop's start_tls then
            # returns None and never calls connection_lost, so free the slot here.
            self.close()
            ctx.release(self)
            return
        self.transport = transport
        self._reading_paused = False
        self.session.tls_established()
        self.tls_version = tls.negotiated_version(transport)
        self.busy = False
        self._arm_deadline()

    # --- AUTH (RFC 4954) -------------------------------------------------------------
    def _auth_start(self, command: Auth, out: list[bytes]) -> bool:
        reply = decisions.auth_refusal(self.listener, self.session.tls_active, command.mechanism)
        if reply is not None:
            out.append(self.session.send(reply))
            return True
        if self.ctx.auth_failures.blocked(self.client_ip, self.ctx.loop.time()):
            # This address guessed too often lately: no password is even looked at.
            log.warning("auth_blocked", client=self.client_ip)
            out.append(self.session.send(R421_AUTH_BLOCKED))
            self._write(out)
            out.clear()
            self.close()
            return False
        self.auth_state = AuthExchange(command.mechanism)
        return self._auth_step(command.initial, out)

    def _auth_step(self, response: str | None, out: list[bytes]) -> bool:
        assert self.auth_state is not None
        outcome = self.auth_state.step(response)
        if isinstance(outcome, Reply):  # a challenge, or a syntax refusal
            out.append(self.session.send(outcome))
            if outcome.code != 334:
                self.auth_state = None
            return True
        user, password = outcome
        self.busy = True
        self._write(out)
        out.clear()
        self.ctx.loop.create_task(self._verify(user, password))
        return False

    async def _verify(self, user: str, password: str) -> None:
        ok = await self.ctx.check_password(user, password)
        self.auth_state = None
        if ok:
            self.session.authenticated(user)
        else:
            self.auth_failures += 1
            ctx = self.ctx
            ctx.auth_failures.failed(self.client_ip, ctx.loop.time())
            if ctx.auth_failure_delay > 0:  # a guesser waits for every wrong answer
                await asyncio.sleep(ctx.auth_failure_delay)
        reply = decisions.auth_result(ok, self.auth_failures, self.ctx.cfg.limits.max_auth_failures)
        if self.transport is None:
            return  # the client left while it waited
        if reply.code == 421:
            self.busy = False
            self._write([self.session.send(reply)])
            self.close()
            return
        self._decided(reply)
