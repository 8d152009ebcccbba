"""The setup dialogue of an outbound SMTP connection: greeting, EHLO/HELO, STARTTLS,
AUTH, up to a session ready for MAIL.

Runs once per connection, one awaited reply at a time, on a `SetupConnection` (the
transport's protocol until the dialogue is done); the hot path is the callback-driven
transaction engine in session.py, which takes the transport over afterwards.

Policy decisions, each a `SetupError` whose `reply` is the 4xx the jobs would get:

- A 4xx greeting: that reply (with the host named); a 5xx greeting is *not* a bounce —
  receivers misbehave and a bounce needs a recipient-level 5xx — so it becomes 421 4.4.1.
  Either way the pool tries the next address, then the next host (RFC 5321 §5.1).
- EHLO refused with 5xx → HELO (RFC 5321 §3.2), with no extensions.
- STARTTLS (RFC 3207) when offered and tls != "none". tls="required": no STARTTLS offered
  → 454 4.7.4; refused or failed handshake → 454 4.7.5. tls="opportunistic": a refused
  STARTTLS continues in plaintext on the same connection; a failed *handshake* leaves
  the connection unusable: `connect.connect_route` reconnects once in plaintext.
- MTA-STS (RFC 8461, `settings.mta_sts`, set by sts_policies.py): "enforce" comes with
  tls="required" and a verifying context, and the failure texts begin "MTA-STS
  policy:" (a certificate failure names the MX host, `SetupError.cert_failed`);
  "testing" logs what an enforced policy would have refused and carries on.
- AUTH (RFC 4954) only when `settings.auth_user` is set, and only under TLS: credentials
  are never sent in plaintext (454 4.7.4 instead). PLAIN preferred, else LOGIN. A 535
  (or any non-235) defers with 454 4.7.0 quoting the server: a credentials problem is
  ours to fix, never a reason to bounce.
- Bytes buffered after the 220 to STARTTLS were injected in plaintext (CVE-2011-0411
  style "STARTTLS command injection"): refuse the connection (4.7.5). Bytes buffered
  after the dialogue's last reply answer nothing and would be matched to MAIL: refuse
  the connection too (4.5.0 "protocol"); later unsolicited bytes close an idle session.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from engine.config import TimeoutsConfig
from engine.delivery.job import PoolSettings
from engine.delivery.outcome import reply_summary, transient_failure
from engine.observe import log
from engine.smtp.client import (
    STARTTLS,
    Capabilities,
    ClientProtocolError,
    RemoteReply,
    ReplyParser,
    auth_login,
    auth_plain,
    greeting_bytes,
    helo_bytes,
    parse_ehlo,
    starttls_ready,
)
from engine.smtp.replies import Reply


class SetupError(Exception):
    """Opening a session failed. `reply` is a 4xx for the jobs; `kind` is one of
    "connect", "greeting", "ehlo", "tls_failed", "tls_required", "auth", "protocol".
    `cert_failed`: a "tls_failed" whose cause is the certificate (chain or name)."""

    def __init__(self, reply: Reply, kind: str, cert_failed: bool = False) -> None:
        super().__init__(reply_summary(reply))
        self.reply = reply
        self.kind = kind
        self.cert_failed = cert_failed


class SetupConnection(asyncio.Protocol):
    """The connection while the dialogue runs: the transport's protocol from TCP
    connect to a session ready for MAIL, one awaited reply at a time. `connect`
    then hands the transport (and any bytes already buffered in `parser`) to a
    DeliverySession, which runs the transactions callback-driven."""

    def __init__(self, mx_host: str, ip: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.mx_host = mx_host
        self.ip = ip
        self.port = port
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = ReplyParser()
        self.caps = Capabilities()  # set by `setup` when the dialogue is done
        self.tls_version = ""  # ssl_object.version() after STARTTLS, "" for plaintext
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None  # a reply or the close

    @property
    def where(self) -> str:
        return f"{self.mx_host}[{self.ip}]:{self.port}"

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        self._wake()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- what the dialogue does with it ----------------------------------------------------
    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed into a reply."""
        return self.parser.buffered

    async def read_reply(self, timeout: float, what: str) -> RemoteReply:
        """The next reply, within `timeout` seconds.

        Raises SetupError: timeout (4.4.1), connection lost (4.4.2), or a malformed reply
        (the parser's 451 4.5.0).
        """
        deadline = self.loop.time() + timeout
        while True:
            try:
                reply = self.parser.next_reply()
            except ClientProtocolError as err:
                raise SetupError(err.reply, "protocol") from None
            if reply is not None:
                return reply
            if self.closed:
                raise SetupError(transient_failure(
                    "lost", f"connection to {self.where} lost while waiting for {what}"), "connect")
            fut = self._waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                raise SetupError(transient_failure(
                    "timeout", f"timeout waiting for {what} from {self.where}"), "connect") from None
            finally:
                self._waiter = None

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Upgrade the connection (RFC 3207 §4.2: a fresh parser; the caller re-sends EHLO).

        Raises ssl.SSLError, OSError, ConnectionError or TimeoutError on failure.
        """
        assert self.transport is not None
        new = await asyncio.wait_for(
            self.loop.start_tls(self.transport, self, context,
                                server_hostname=self.mx_host or None,
                                ssl_handshake_timeout=timeout),
            timeout + 1.0)
        if new is None or self.closed:
            raise ConnectionError("connection closed during the TLS handshake")
        self.transport = new
        self.parser = ReplyParser()
        obj = new.get_extra_info("ssl_object")
        self.tls_version = obj.version() if obj is not None else "TLS"

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _said(session: SetupConnection, reply: Reply) -> str:
    return f"{session.where} said: {reply_summary(reply)}"


def _tls_error(session: SetupConnection, settings: PoolSettings, kind: str, text: str,
               cert_failed: bool = False) -> SetupError:
    """A TLS failure; under an enforced MTA-STS policy the text says so (RFC 8461 §5)."""
    if settings.mta_sts == "enforce":
        text = f"MTA-STS policy: {text}"
    return SetupError(transient_failure(kind, text), kind, cert_failed)


def _handshake_error(session: SetupConnection, settings: PoolSettings, err: BaseException) -> SetupError:
    if isinstance(err, ssl.SSLCertVerificationError):
        # RFC 8461 §4.2: the chain must reach a trusted root and name the MX host.
        why = err.verify_message or str(err)
        return _tls_error(session, settings, "tls_failed",
                          f"certificate verification failed for {session.mx_host} "
                          f"[{session.ip}]:{session.port}: {why}", cert_failed=True)
    return _tls_error(session, settings, "tls_failed", f"TLS handshake with {session.where} failed: {err}")


def _testing_note(session: SetupConnection, settings: PoolSettings, problem: str) -> None:
    """A testing-mode MTA-STS policy (RFC 8461 §5): delivery goes on, the would-be
    failure is logged."""
    if settings.mta_sts == "testing":
        log.warning("mta_sts_testing", domain=settings.only_domain, mx=session.mx_host,
                    ip=session.ip, problem=problem)


async def _ehlo(session: SetupConnection, settings: PoolSettings, timeouts: TimeoutsConfig) -> Capabilities:
    session.write_raw(greeting_bytes(settings.helo_name))
    reply = await session.read_reply(float(timeouts.ehlo), "the EHLO reply")
    if reply.code == 250:
        return parse_ehlo(reply)
    if reply.code // 100 == 5:
        # RFC 5321 §3.2: an old server that does not know EHLO; HELO, and no extensions.
        session.write_raw(helo_bytes(settings.helo_name))
        reply = await session.read_reply(float(timeouts.ehlo), "the HELO reply")
        if reply.code == 250:
            return Capabilities()
    if reply.code == 421:
        raise SetupError(reply.with_text(_said(session, reply)), "ehlo")
    raise SetupError(transient_failure("refused", f"EHLO/HELO refused: {_said(session, reply)}"), "ehlo")


async def setup(session: SetupConnection, settings: PoolSettings, timeouts: TimeoutsConfig,
                tls_context: ssl.SSLContext | None) -> None:
    """The dialogue from the greeting to a session ready for MAIL; sets `session.caps`.

    `tls_context` None means "do not attempt STARTTLS" (tls="none", or the plaintext
    retry after a failed opportunistic handshake).

    Raises SetupError (the caller closes the connection).
    """
    greeting = await session.read_reply(float(timeouts.greeting), "the greeting")
    if greeting.code != 220:
        if greeting.code // 100 == 4:
            raise SetupError(greeting.with_text(_said(session, greeting)), "greeting")
        raise SetupError(transient_failure(
            "refused", f"greeting refused the session: {_said(session, greeting)}"), "greeting")
    caps = await _ehlo(session, settings, timeouts)
    required = settings.tls == "required"
    if caps.starttls and tls_context is not None and settings.tls != "none":
        session.write_raw(STARTTLS)
        reply = await session.read_reply(float(timeouts.starttls), "the STARTTLS reply")
        if starttls_ready(reply):
            if session.buffered:
                raise _tls_error(session, settings, "tls_failed",
                                 f"{session.where} sent data after its 220 to STARTTLS")
            try:
                await session.start_tls(tls_context, float(timeouts.starttls))
            except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as err:
                raise _handshake_error(session, settings, err) from None
            # RFC 3207 §4.2: forget what was learnt in plaintext; ask again.
            caps = await _ehlo(session, settings, timeouts)
        elif required:
            raise _tls_error(session, settings, "tls_failed", f"STARTTLS refused: {_said(session, reply)}")
        else:
            _testing_note(session, settings, f"STARTTLS refused: {reply_summary(reply)}")
    elif required:
        raise _tls_error(session, settings, "tls_required",
                         f"{session.where} does not offer STARTTLS, required by policy")
    elif not caps.starttls:
        _testing_note(session, settings, "no STARTTLS offered")
    elif settings.tls == "none":
        _testing_note(session, settings, "STARTTLS not used (tls = none for this destination)")
    if settings.auth_user:
        await _auth(session, settings, timeouts, caps)
    if session.buffered:
        # Nothing was asked that these bytes could answer: left in the parser they would
        # be taken as the reply to MAIL (RFC 2920 §3.1 matches replies by order alone).
        raise SetupError(Reply(451, "4.5.0",
                               f"{session.where} sent data nobody asked for after its EHLO reply"), "protocol")
    session.caps = caps


async def _auth(session: SetupConnection, settings: PoolSettings, timeouts: TimeoutsConfig,
                caps: Capabilities) -> None:
    if not session.tls_version:
        raise SetupError(transient_failure(
            "tls_required", f"not sending AUTH credentials to {session.where} without TLS"), "auth")
    limit = float(timeouts.auth)
    user, password = settings.auth_user, settings.auth_password
    if "PLAIN" in caps.auth:
        session.write_raw(auth_plain(user, password))
        reply = await session.read_reply(limit, "the AUTH reply")
    elif "LOGIN" in caps.auth:
        command, user_line, password_line = auth_login(user, password)
        session.write_raw(command)
        reply = await session.read_reply(limit, "the AUTH reply")
        for line in (user_line, password_line):
            if reply.code != 334:
                break
            session.write_raw(line)
            reply = await session.read_reply(limit, "the AUTH reply")
    else:
        raise SetupError(Reply(454, "4.7.0", f"{session.where} offers no AUTH PLAIN or LOGIN"), "auth")
    if reply.code != 235:
        raise SetupError(Reply(454, "4.7.0", f"authentication as {user} failed: {_said(session, reply)}"), "auth")


