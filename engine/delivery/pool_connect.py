"""How a site pool opens connections (pool.py has the theory of operation): the
connection token each attempt takes first (a slot of the worker's budget, budget.py,
the provider's server-wide count, provider_gate.py, and the site's server-wide count,
site_slots.py), the attempt itself, and what a failed attempt means (a concurrency
signal, or a dead destination: backoff), and what the queued jobs get when the pool
gives up on them.

The site's count makes the pool's `max_connections` a cap of the whole server: every
worker delivers a share of a hot domain (queue layout format 4), and each has its own
pool for the site. While another worker waits for the site, this pool's limit is its
share of the cap (`_max_connections`): busy sessions over it QUIT when they ask for the
next job, idle ones at the gate's next look (`yield_site`).

`PoolConnecting` is the part of `SitePool` that does this; the attributes it declares
are the pool's own, set up by `SitePool.__init__`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from engine.config import TimeoutsConfig
from engine.delivery.backoff import Backoff
from engine.delivery.budget import ConnectionBudget
from engine.delivery.changes import Changes
from engine.delivery.connect import connect_route
from engine.delivery.dialogue import SetupError
from engine.delivery.job import Job, JobResult, PoolSettings, safe_done, unsent
from engine.delivery.outcome import transient_failure
from engine.delivery.pool_queue import JobQueue
from engine.delivery.pool_react import PoolReacting
from engine.delivery.provider_gate import ProviderGate
from engine.delivery.session import DeliverySession
from engine.delivery.site_slots import SiteGate
from engine.dns.mx import Route
from engine.observe import log
from engine.smtp.replies import Reply

TlsContextFactory = Callable[[], ssl.SSLContext | None]


class PoolConnecting(PoolReacting):
    site_key: str
    settings: PoolSettings
    timeouts: TimeoutsConfig
    loop: asyncio.AbstractEventLoop
    budget: ConnectionBudget | None
    gate: ProviderGate | None
    site_gate: SiteGate | None
    _tls_factory: TlsContextFactory
    _slots: set[DeliverySession]
    _sessions: set[DeliverySession]
    _idle: list[DeliverySession]
    _queue: JobQueue
    _connecting: int
    _opened: int
    _limit: int
    _closing: bool
    _quiet_since: float
    _backoff: Backoff
    _plain_only: set[str]
    _changed: Changes

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _retire(self, session: DeliverySession) -> None:
        raise NotImplementedError

    def _adopt(self, session: DeliverySession) -> None:
        """Become the owner of a session just set up."""
        raise NotImplementedError

    async def _open(self, route: Route) -> None:
        try:
            context = self._tls_factory() if self.settings.tls != "none" else None
            session = await connect_route(route, self.settings, self.timeouts, context, self._plain_only)
        except SetupError as err:
            self._connecting -= 1
            log.info("connect_failed", site=self.site_key, reply=str(err))
            self._react_setup(err.reply, err.kind)
            self._connect_failed(err.reply)
            self._give_connection()
            return
        except Exception as err:  # our own trouble (a bad CA file...): defer, never hang
            self._connecting -= 1
            log.error("connect_error", site=self.site_key, error=repr(err))
            self._connect_failed(transient_failure("local", f"cannot connect: {err!r}"))
            self._give_connection()
            return
        except BaseException:  # cancelled by close()
            self._connecting -= 1
            self._give_connection()
            raise
        self._connecting -= 1
        if session.closed:  # lost before we owned it: session_closed will not come
            self._give_connection()
            self._dispatch()
            return
        self._slots.add(session)
        self._opened += 1
        self._backoff.restart(float(self.settings.backoff))
        self._adopt(session)
        self._sessions.add(session)
        self._changed.set()
        if self._closing:
            self._retire(session)
            return
        session.kick()
        self._dispatch()

    def _give_connection(self) -> None:
        """A token of `_take_connection` back: the attempt failed or the connection
        is gone."""
        if self.budget is not None:
            self.budget.give()
        if self.gate is not None:
            self.gate.release()
        if self.site_gate is not None:
            self.site_gate.release()

    def _connect_failed(self, reply: Reply) -> None:
        self._quiet_since = self.loop.time()
        if self._sessions:
            # Other connections work: a concurrency signal, not a dead destination.
            self._limit = max(1, min(self._limit, len(self._sessions)))
        elif not self._connecting:
            self._enter_backoff(reply)
            self._fail_queue(reply, failed=True)
        self._changed.set()

    def _enter_backoff(self, reply: Reply) -> None:
        if self._backoff.enter(reply, self.loop.time(), float(self.settings.backoff_max)):
            self._limit = min(2, self.settings.max_connections)  # slow start again after
            log.info("destination_backoff", site=self.site_key, until=self._backoff.until)

    def _take_connection(self) -> bool:
        """A connection token: a budget slot, the provider's server-wide count and the
        site's, all or none. False: this pool waits in the line of whichever had no
        room (the site's gate looks again every site_slots.RECHECK seconds)."""
        budget = self.budget
        if budget is not None and not budget.take(self):  # type: ignore[arg-type]  # a SitePool
            return False
        gate = self.gate
        if gate is not None and not gate.try_connect(self):  # type: ignore[arg-type]  # a SitePool
            if budget is not None:
                budget.give()
            return False
        site = self.site_gate
        if site is not None and not site.try_connect(super()._max_connections()):
            if gate is not None:
                gate.release()
            if budget is not None:
                budget.give()
            return False
        return True

    def _max_connections(self) -> int:
        """The pool's limit (PoolReacting's), or while another worker waits for the
        site, this worker's share of it (site_slots.SiteGate.share)."""
        limit = super()._max_connections()
        site = self.site_gate
        return limit if site is None else site.limit(limit)

    def yield_site(self, contended: bool) -> bool:
        """SiteUser: another worker waits for the site. An idle session goes when this
        worker holds more than its share (under a cap below the worker count: when its
        turn is over). One within the share stays, though it idles: the waiting worker
        has its own share free, and QUITting it only to open it again the next moment
        cost a relay of one domain 5 new connections per 1,000 messages."""
        site = self.site_gate
        if contended and self._idle and site is not None:
            if site.held > site.share(super()._max_connections()):
                self._retire(self._idle.pop(0))  # the coldest first
        return bool(self._idle)

    def _flat(self, job: Job, reply: Reply, *, failed: bool) -> JobResult:
        return JobResult({i: reply for i in job.indices}, destination_failed=failed,
                         retry_after=self._backoff.until if failed else 0.0,
                         attempt_started=self.loop.time())

    def _fail_queue(self, reply: Reply, *, failed: bool) -> None:
        if until := self._suspended():
            self._hold_all(until)  # the provider's suspension outlasts any backoff
            return
        while self._queue:
            job = self._queue.pop()
            safe_done(job, self._flat(job, reply, failed=failed))

    def _hand_back_queue(self) -> None:
        while self._queue:
            job = self._queue.pop()
            safe_done(job, unsent(job))
