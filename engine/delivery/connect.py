"""Opening an outbound SMTP connection for a Route: failover across its hosts and
addresses (RFC 5321 §5.1), the opportunistic-TLS fallback, and the client TLS context.
Each attempt is an `open_session`: TCP, the dialogue of dialogue.py, then a
DeliverySession that takes the connection over.

The setup policy (greeting, EHLO, STARTTLS, AUTH and the SetupError each failure
gives) is described in dialogue.py. Here: a failed *handshake* under tls="opportunistic"
leaves the connection unusable, so `connect_route` reconnects once to the same address
without TLS and remembers the address (Postfix does the same for its "may" level:
opportunistic TLS must never make mail less deliverable than plaintext would).

MTA-STS (RFC 8461; sts_policies.py sets `settings.mta_sts`): an enforced policy comes
as tls="required" with tls_verify, so none of those fallbacks happens and a failure
defers. Under a testing policy each address is first tried with a verifying context;
a certificate failure is logged ("mta_sts_testing") and the address reconnects with the
ordinary context at once (and skips the check for TESTING_RECHECK seconds).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time

from engine.config import TimeoutsConfig
from engine.delivery.dialogue import SetupConnection, SetupError, setup
from engine.delivery.job import PoolSettings
from engine.delivery.outcome import reply_summary, transient_failure
from engine.delivery.session import DeliverySession
from engine.dns.mx import Route, RouteHost
from engine.observe import log

# Bound on addresses tried per connection attempt (house rule 8). Postfix's
# smtp_mx_address_limit is 5; a little more, since a smarthost route may list several.
MAX_ADDRESSES = 10
# A testing MTA-STS policy's certificate failure at an address is checked again after
# this long; meanwhile that address gets the ordinary opportunistic handshake.
TESTING_RECHECK = 3600.0
_unverified: dict[tuple[str, str], float] = {}  # (MX host, address) -> monotonic time
_verifying: dict[str, ssl.SSLContext] = {}  # CA file -> verifying client context


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


async def open_session(mx_host: str, ip: str, port: int, settings: PoolSettings,
                       timeouts: TimeoutsConfig, tls_context: ssl.SSLContext | None,
                       loop: asyncio.AbstractEventLoop | None = None) -> DeliverySession:
    """TCP to ip:port (from `settings.source_address` if set), then the setup dialogue
    (STARTTLS only with a `tls_context`); returns a session ready for `run`.

    Raises SetupError (its `reply` is the 4xx every job would get, `kind` says what
    failed: "connect", "greeting", "ehlo", "tls_failed", "tls_required", "auth",
    "protocol"); the connection is closed then.
    """
    loop = loop or asyncio.get_running_loop()
    conn = SetupConnection(mx_host, ip, port, loop)
    local = (settings.source_address, 0) if settings.source_address else None
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: conn, ip, port, local_addr=local),
            float(timeouts.connect))
    except TimeoutError:
        raise SetupError(transient_failure(
            "timeout", f"connect to {conn.where}: timed out"), "connect") from None
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise SetupError(transient_failure(
            "refused", f"connect to {conn.where}: {reason}"), "connect") from None
    try:
        await setup(conn, settings, timeouts, tls_context)
    except BaseException:
        conn.abort()
        raise
    return DeliverySession(conn, settings, timeouts)


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
    last: SetupError | None = None
    tried = 0
    use_context = tls_context if settings.tls != "none" else None
    for host in _connection_order(route):
        for ip in host.addresses:
            if tried >= MAX_ADDRESSES:
                break
            tried += 1
            try:
                return await _connect_address(host.name, ip, settings, timeouts, use_context, plain_only)
            except SetupError as err:
                last = err
    if last is None:
        last = SetupError(transient_failure("route", f"no address to connect to for {route.domain}"), "connect")
    raise last


async def _connect_address(mx_host: str, ip: str, settings: PoolSettings, timeouts: TimeoutsConfig,
                           context: ssl.SSLContext | None, plain_only: set[str]) -> DeliverySession:
    """One address, with the retries opportunistic TLS and a testing MTA-STS policy make.

    Raises SetupError.
    """
    opportunistic = settings.tls == "opportunistic"
    if ip in plain_only and opportunistic:
        return await open_session(mx_host, ip, settings.port, settings, timeouts, None)
    if context is not None and settings.mta_sts == "testing" and _should_verify(mx_host, ip):
        # RFC 8461 §5: a testing policy delivers as usual; first see whether the
        # certificate would pass an enforced policy, and note it when it would not.
        try:
            return await open_session(mx_host, ip, settings.port, settings, timeouts,
                                      verifying_context(settings.tls_ca_file))
        except SetupError as err:
            if err.kind != "tls_failed":
                raise
            if len(_unverified) >= 10_000:
                _unverified.clear()  # a bound; at worst some addresses are checked again
            _unverified[(mx_host, ip)] = time.monotonic() + TESTING_RECHECK
            log.warning("mta_sts_testing", domain=settings.only_domain, mx=mx_host, ip=ip,
                        problem=reply_summary(err.reply))
    try:
        return await open_session(mx_host, ip, settings.port, settings, timeouts, context)
    except SetupError as err:
        if err.kind != "tls_failed" or not opportunistic or context is None:
            raise
    # Opportunistic TLS failed mid-handshake: once more, in plaintext.
    plain_only.add(ip)
    if settings.mta_sts == "testing":
        log.warning("mta_sts_testing", domain=settings.only_domain, mx=mx_host, ip=ip,
                    problem="TLS handshake failed; delivered in plaintext")
    return await open_session(mx_host, ip, settings.port, settings, timeouts, None)


def _should_verify(mx_host: str, ip: str) -> bool:
    """False while a testing-mode certificate failure at this address is recent (so
    each connection does not pay a failed handshake, nor log it again)."""
    until = _unverified.get((mx_host, ip))
    if until is None:
        return True
    if until > time.monotonic():
        return False
    del _unverified[(mx_host, ip)]
    return True


def verifying_context(ca_file: str) -> ssl.SSLContext:
    """A cached `client_tls_context(True, ca_file)`.

    Raises OSError / ssl.SSLError if `ca_file` cannot be loaded.
    """
    ctx = _verifying.get(ca_file)
    if ctx is None:
        ctx = _verifying[ca_file] = client_tls_context(True, ca_file)
    return ctx
