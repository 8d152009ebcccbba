"""SMTP servers on already-bound sockets (the supervisor's, or a test's)."""

from __future__ import annotations

import asyncio
import socket
from functools import partial

from engine.config import Config
from engine.inbound.context import WorkerContext
from engine.inbound.protocol import SmtpServerProtocol


async def start_listeners(
    ctx: WorkerContext, cfg: Config, sockets: list[socket.socket]
) -> list[asyncio.AbstractServer]:
    """One server per configured listener; `sockets[i]` serves `cfg.listeners[i]`.

    Implicit-TLS listeners (port 465 style, RFC 8314) wrap from the first byte; the
    handshake gets the command timeout as its deadline.
    """
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    for sock, listener in zip(sockets, cfg.listeners):
        implicit = listener.tls == "implicit"
        servers.append(
            await loop.create_server(
                partial(SmtpServerProtocol, ctx, listener, implicit),
                sock=sock,
                ssl=ctx.ssl_context if implicit else None,
                backlog=1024,
                ssl_handshake_timeout=float(cfg.limits.command_timeout) if implicit else None,
            )
        )
    return servers
