"""Connection setup for outbound SMTP: greeting, EHLO/HELO, STARTTLS, AUTH; failover
across a Route's hosts and addresses; the client TLS context.

Runs once per connection, one awaited reply at a time (the hot path is the
callback-driven transaction engine in session.py).

Policy decisions, each a `SetupError` whose `reply` is the 4xx the jobs would get:

- A 4xx greeting: that reply (with the host named); a 5xx greeting is *not* a bounce —
  receivers misbehave and a bounce needs a recipient-level 5xx — so it becomes 421 4.4.1.
  Either way the pool tries the next address, then the next host (RFC 5321 §5.1).
- EHLO refused with 5xx → HELO (RFC 5321 §3.2), with no extensions.
- STARTTLS (RFC 3207) when offered and tls != "none". tls="required": no STARTTLS offered
  → 454 4.7.4; refused or failed handshake → 454 4.7.5. tls="opportunistic": a refused
  STARTTLS continues in plaintext on the same connection; a failed *handshake* leaves
  the connection unusable, so `connect_route` reconnects once to the same address
  without TLS and remembers the address (Postfix does the same for its "may" level:
  opportunistic TLS must never make mail less deliverable than plaintext would).
- AUTH (RFC 4954) only when `settings.auth_user` is set, and only under TLS: credentials
  are never sent in plaintext (454 4.7.4 instead). PLAIN preferred, else LOGIN. A 535
  (or any non-235) defers with 454 4.7.0 quoting the server: a credentials problem is
  ours to fix, never a reason to bounce.
- Bytes buffered after the 220 to STARTTLS were injected in plaintext (CVE-2011-0411
  style "STARTTLS command injection"): refuse the connection (4.7.5).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from typing import TYPE_CHECKING

from engine.delivery.job import PoolSettings
from engine.delivery.outcome import reply_summary, transient_failure
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

if TYPE_CHECKING:
    from engine.config import TimeoutsConfig
    from engine.delivery.session import DeliverySession
    from engine.dns.mx import Route, RouteHost

# Bound on addresses tried per connection attempt (house rule 8). Postfix's
# smtp_mx_address_limit is 5; a little more, since a smarthost route may list several.
MAX_ADDRESSES = 10


class SetupError(Exception):
    """Opening a session failed. `reply` is a 4xx for the jobs; `kind` is one of
    "connect", "greeting", "ehlo", "tls_failed", "tls_required", "auth", "protocol"."""

    def __init__(self, reply: Reply, kind: str) -> None:
        super().__init__(reply_summary(reply))
        self.reply = reply
        self.kind = kind


class SetupIO:
    """The setup-time I/O of a DeliverySession (mixed into it): one awaited reply at a
    time. Uses the session's `loop`, `transport`, `_parser`, `_waiter`, `closed`."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    closed: bool
    mx_host: str
    tls_version: str
    _parser: ReplyParser
    _waiter: asyncio.Future[None] | None
    where: str  # a property of the session: "mx[ip]:port"

    def write_raw(self, data: bytes) -> None:
        """Write during setup (no deadline bookkeeping)."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    @property
    def buffered(self) -> int:
        return self._parser.buffered

    async def read_reply(self, timeout: float, what: str) -> RemoteReply:
        """The next reply during setup, within `timeout` seconds.

        Raises SetupError: timeout (4.4.1), connection lost (4.4.2), or a malformed reply
        (the parser's 451 4.5.0).
        """
        deadline = self.loop.time() + timeout
        while True:
            try:
                reply = self._parser.next_reply()
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
        server_name = self.mx_host or None
        new = await asyncio.wait_for(
            self.loop.start_tls(self.transport, self, context,  # type: ignore[arg-type]
                                server_hostname=server_name,
                                ssl_handshake_timeout=timeout),
            timeout + 1.0)
        if new is None or self.closed:
            raise ConnectionError("connection closed during the TLS handshake")
        self.transport = new  # type: ignore[assignment]
        self._parser = ReplyParser()
        obj = new.get_extra_info("ssl_object")
        self.tls_version = obj.version() if obj is not None else "TLS"


def client_tls_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """The client context for STARTTLS.

    verify=False (the default for MX delivery): no certificate or name check. RFC 7435
    opportunistic security: MX certificates are mostly self-signed or do not match the
    MX name, and an unauthenticated encrypted channel still beats plaintext; the MX name
    itself came from unauthenticated DNS, so checking it proves little (DANE/MTA-STS do
    that properly). verify=True: the system store plus `ca_file` if given, and the MX
    host name must match.

    Raises OSError / ssl.SSLError if `ca_file` cannot be loaded.
    """
    ctx = ssl.create_default_context()
    if verify:
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _said(session: DeliverySession, reply: Reply) -> str:
    return f"{session.where} said: {reply_summary(reply)}"


async def _ehlo(session: DeliverySession, settings: PoolSettings, timeouts: TimeoutsConfig) -> Capabilities:
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


async def setup(session: DeliverySession, settings: PoolSettings, timeouts: TimeoutsConfig,
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
                raise SetupError(transient_failure(
                    "tls_failed", f"{session.where} sent data after its 220 to STARTTLS"), "tls_failed")
            try:
                await session.start_tls(tls_context, float(timeouts.starttls))
            except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as err:
                raise SetupError(transient_failure(
                    "tls_failed", f"TLS handshake with {session.where} failed: {err}"), "tls_failed") from None
            # RFC 3207 §4.2: forget what was learnt in plaintext; ask again.
            caps = await _ehlo(session, settings, timeouts)
        elif required:
            raise SetupError(transient_failure(
                "tls_failed", f"STARTTLS refused: {_said(session, reply)}"), "tls_failed")
    elif required:
        raise SetupError(transient_failure(
            "tls_required", f"{session.where} does not offer STARTTLS, required by policy"), "tls_required")
    if settings.auth_user:
        await _auth(session, settings, timeouts, caps)
    session.caps = caps


async def _auth(session: DeliverySession, settings: PoolSettings, timeouts: TimeoutsConfig,
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


async def open_session(cls: type[DeliverySession], mx_host: str, ip: str, port: int,
                       settings: PoolSettings, timeouts: TimeoutsConfig,
                       tls_context: ssl.SSLContext | None,
                       loop: asyncio.AbstractEventLoop) -> DeliverySession:
    """TCP to ip:port (bound to `settings.source_address` if set), then `setup`; the body
    of `DeliverySession.connect`.

    Raises SetupError; the connection is closed then.
    """
    session = cls(mx_host, ip, port, settings, timeouts, loop)
    local = (settings.source_address, 0) if settings.source_address else None
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: session, ip, port, local_addr=local),
            float(timeouts.connect))
    except TimeoutError:
        raise SetupError(transient_failure(
            "timeout", f"connect to {session.where}: timed out"), "connect") from None
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise SetupError(transient_failure(
            "refused", f"connect to {session.where}: {reason}"), "connect") from None
    try:
        await setup(session, settings, timeouts, tls_context)
    except BaseException:
        session.close()
        raise
    session.ready = True
    session.created_at = session.last_used = loop.time()
    return session


def _connection_order(route: Route) -> list[RouteHost]:
    """The route's hosts with each run of equal preference shuffled afresh.

    RFC 5321 §5.1: equal-preference MX hosts are picked at random to spread the load.
    The route may be reused for many connections (the scheduler memoises routes), so
    the choice is made here, once per connection, not once per route."""
    hosts = list(route.hosts)
    out: list[RouteHost] = []
    i = 0
    while i < len(hosts):
        j = i + 1
        while j < len(hosts) and hosts[j].preference == hosts[i].preference:
            j += 1
        group = hosts[i:j]
        if len(group) > 1:
            random.shuffle(group)
        out += group
        i = j
    return out


async def connect_route(route: Route, settings: PoolSettings, timeouts: TimeoutsConfig,
                        tls_context: ssl.SSLContext | None, plain_only: set[str]) -> DeliverySession:
    """The first session that opens, trying hosts in preference order and each host's
    addresses in order (RFC 5321 §5.1), at most MAX_ADDRESSES attempts.

    `plain_only` holds addresses whose opportunistic TLS handshake failed; they are
    connected without STARTTLS, and a new failure adds the address.

    Raises SetupError: the last failure, when no address gave a session.
    """
    from engine.delivery.session import DeliverySession

    last: SetupError | None = None
    tried = 0
    use_context = tls_context if settings.tls != "none" else None
    for host in _connection_order(route):
        for ip in host.addresses:
            if tried >= MAX_ADDRESSES:
                break
            tried += 1
            plain = ip in plain_only and settings.tls == "opportunistic"
            try:
                return await DeliverySession.connect(
                    host.name, ip, settings.port, settings, timeouts,
                    None if plain else use_context)
            except SetupError as err:
                last = err
                if err.kind != "tls_failed" or settings.tls != "opportunistic" or plain:
                    continue
            # Opportunistic TLS failed mid-handshake: once more, in plaintext.
            plain_only.add(ip)
            try:
                return await DeliverySession.connect(
                    host.name, ip, settings.port, settings, timeouts, None)
            except SetupError as err:
                last = err
    if last is None:
        last = SetupError(transient_failure("route", f"no address to connect to for {route.domain}"), "connect")
    raise last
