"""TLS on inbound connections: the server context (for STARTTLS, RFC 3207, and
implicit TLS, RFC 8314), the in-place upgrade of a plaintext connection, and the
version name the Received: header reports."""

from __future__ import annotations

import asyncio
import ssl

from engine.config import Config
from engine.observe import log


def make_server_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """None when no certificate is configured: then neither kind of TLS is offered."""
    if not (cfg.tls.cert_file and cfg.tls.key_file):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # TLS 1.0 and 1.1 are deprecated (RFC 8996); the default cipher list of this context
    # is already forward-secret AEAD/SHA-2 only for TLS 1.2 (no NULL, EXPORT, RC4, 3DES).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation costs the server a handshake per request for
    # nothing (CVE-2011-1473). OpenSSL 3 refuses it by default; say so ourselves so an
    # older or differently built library does too.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    return ctx


async def upgrade(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    ssl_context: ssl.SSLContext,
    timeout: float,
    client_ip: str,
) -> asyncio.Transport | None:
    """The server side of the handshake after our 220 to STARTTLS.

    Returns the TLS transport, or None when the handshake failed (logged) or the
    connection was closed under it: uvloop's start_tls then returns None itself.
    """
    try:
        return await loop.start_tls(
            transport, protocol, ssl_context, server_side=True, ssl_handshake_timeout=timeout
        )
    except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as err:
        log.info("tls_failed", client=client_ip, error=repr(err))
        return None


def negotiated_version(transport: asyncio.BaseTransport) -> str:
    """"TLSv1.3" and the like; "TLS" when the transport does not say."""
    obj = transport.get_extra_info("ssl_object")
    return obj.version() if obj is not None else "TLS"
