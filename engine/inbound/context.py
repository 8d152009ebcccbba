"""What every inbound session of one worker shares: config, policy, the committer,
id allocation, TLS context, the user database, connection accounting and the
deadline sweeper."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from engine.config import Config
from engine.inbound import users
from engine.inbound.auth_failures import AuthFailures
from engine.inbound.dead_intake import DeadWait, IntakeDeferral
from engine.inbound.policy import Policy
from engine.inbound.tls import make_server_tls_context
from engine.observe import log
from engine.queue.committer import QueueCommitter
from engine.queue.ids import IdAllocator
from engine.queue.store import QueueStore


class InboundSession(Protocol):
    """What the shared context needs of one connection (protocol.py's
    SmtpServerProtocol): its address for the per-IP cap, its deadline for the
    sweeper, and the ways to end it (sweeper, drain)."""

    client_ip: str
    deadline: float  # loop.time() after which the sweeper calls timed_out()

    def timed_out(self) -> None: ...

    def shutdown_if_idle(self) -> bool: ...

    def close(self) -> None: ...


class InboundStats:
    """Counters the worker reports (status, metrics)."""

    # rejected: refusals (4xx/5xx) of a MAIL, of a command inside a transaction (RCPT,
    # DATA, BDAT) and of a message at its end; volley_transactions_rejected_total.
    __slots__ = ("received", "received_bytes", "rejected", "connections", "refused_connections")

    def __init__(self) -> None:
        self.received = self.received_bytes = self.rejected = 0
        self.connections = 0
        self.refused_connections = 0


class WorkerContext:
    """One per worker process, handed to every inbound connection it accepts."""

    def __init__(
        self,
        cfg: Config,
        loop: asyncio.AbstractEventLoop,
        committer: QueueCommitter,
        ids: IdAllocator,
        *,
        workers: int,
    ) -> None:
        self.loop = loop
        self.committer = committer
        self.ids = ids
        self.workers = max(1, workers)
        self.sessions: set[InboundSession] = set()
        self.per_ip: dict[str, int] = {}
        self.stats = InboundStats()
        self.draining = False
        self.on_new_mail: Callable[[], None] | None = None  # wakes the delivery scheduler
        # Set by the worker when it delivers: new mail for a site delivery knows is dead
        # is dated to its backoff's end at intake, and counted once durable (dead_intake.py).
        self.dead_until: DeadWait | None = None
        self.on_deferred: Callable[[bytes, list[IntakeDeferral]], None] | None = None
        self.store: QueueStore | None = None  # reads (the suppression list); writes go to `committer`
        # scrypt is ~50 ms of CPU: a small pool keeps it off the loop (house rule 4).
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="volley-auth")
        self._sweeper: asyncio.TimerHandle | None = None
        self.auth_failures = AuthFailures(0, 0.0)  # limits set by apply_config
        self.apply_config(cfg)

    def apply_config(self, cfg: Config) -> None:
        """Reload: limits, relay rules, users and TLS; sessions keep their listener."""
        self.cfg = cfg
        self.hostname = cfg.server.hostname
        # Read once per command by each session's deadline: plain floats, not the config.
        self.command_timeout = float(cfg.limits.command_timeout)
        self.data_timeout = float(cfg.limits.data_timeout)
        self.policy = Policy(cfg)
        limits = cfg.limits
        # A reload keeps what was counted and changes only the limits.
        self.auth_failures.limit = limits.max_auth_failures_per_ip
        self.auth_failures.window = float(limits.auth_failure_window)
        self.auth_failure_delay = float(limits.auth_failure_delay)
        self.users = users.UserDb.load(cfg.auth.users_file)
        self.ssl_context = make_server_tls_context(cfg)
        # Each worker takes its share of the global caps (see README, "Limits").
        self.max_connections = max(1, math.ceil(cfg.limits.max_connections / self.workers))
        self.max_per_ip = max(1, math.ceil(cfg.limits.max_connections_per_ip / self.workers))

    # --- connection accounting ------------------------------------------------------
    def admit(self, proto: InboundSession) -> bool:
        ip = proto.client_ip
        if (
            self.draining
            or len(self.sessions) >= self.max_connections
            or self.per_ip.get(ip, 0) >= self.max_per_ip
        ):
            self.stats.refused_connections += 1
            return False
        self.sessions.add(proto)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.stats.connections += 1
        return True

    def release(self, proto: InboundSession) -> None:
        if proto in self.sessions:
            self.sessions.discard(proto)
            left = self.per_ip.get(proto.client_ip, 1) - 1
            if left:
                self.per_ip[proto.client_ip] = left
            else:
                self.per_ip.pop(proto.client_ip, None)

    # --- timeouts: one timer per worker, not one per session ---------------------------
    def start_sweeper(self, interval: float = 1.0) -> None:
        def sweep() -> None:
            now = self.loop.time()
            for proto in [p for p in self.sessions if p.deadline <= now]:
                try:
                    proto.timed_out()
                except Exception as err:  # a broken session must not stop the sweeper
                    log.error("sweep_error", error=repr(err))
            self._sweeper = self.loop.call_later(interval, sweep)

        self._sweeper = self.loop.call_later(interval, sweep)

    def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def check_password(self, user: str, password: str) -> bool:
        return await users.authenticate(self.users, user, password, self.executor)
