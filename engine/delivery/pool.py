"""Per-site connection pools: how many sessions, which one gets the next job, when a
destination is dead.

Theory of operation
-------------------
A `SitePool` serves one destination site (an MX host set, `Route.site_key`, ARCHITECTURE
rule 10) for one (port, TLS policy, AUTH user). `submit` queues a job and dispatches:
an idle session is woken (LIFO: the most recently used one, so warm connections stay
warm and the rest age out through `idle_timeout`), and if jobs still wait and the
concurrency limit allows, new sessions are opened. Sessions *pull* jobs (`next_job`),
which is also how a busy session chains the next transaction onto its end of data.

Concurrency: Postfix-style slow start. The limit starts at min(2, max_connections),
grows by one per successful transaction up to max_connections, and drops by one
(to at least 1) when a session times out, is lost, or a connection attempt fails
while other sessions work.

Dead destinations are detected separately (backoff.py): while the pool backs off it
opens no connection and answers every job at once with the failure reply.

Retirement (rule 10): a session takes no new job after `max_messages_per_connection`
transactions or `max_connection_age` seconds, or while more sessions are open than
`max_connections` allows (lowered by `update_settings`); checked when it asks for work,
it then QUITs. No RSET before a session's first message (client.py).

Rate (an operator's throttle, `settings.rate` messages/s): a token bucket (rate.py) is
consulted where a job is handed to a session (`next_job`) and before idle sessions are
woken or new ones opened. With no token ready the session goes idle and the bucket's
timer re-dispatches when the next is due. With rate 0 (the default) the hot path pays
an attribute test per job.

Worker-wide cap (budget.py): each connection attempt first takes a connection token
(`_take_connection`): a budget slot, and for a pool serving a [[shaping]] provider its
count in the server-wide table (provider_gate.py, shared_limits.py). The token returns
when the attempt fails or the connection is closed (`_slots` holds the sessions that
own one). With no room the pool waits in the budget's or the gate's line and is
called back (`on_slot_free`, `on_gate_open`). The provider's message rate (GCRA, shared
by every worker) is consulted like the token bucket: before waking idle sessions and
where a job is handed to a session.

Queue order: by message priority (9 first), then arrival (pool_queue.py). A job with
more recipients than `max_recipients` is queued as several transactions.

Reactions (pool_react.py, reactions.py): every finished transaction's replies pass the
provider's [[reactions]] (`job_finished`), as do refused setups (pool_connect.py). While
the provider is suspended (the shared table says so) the pool opens nothing, hands no
job to a session and answers each job with a deferral until the suspension's end.

Every submitted job gets exactly one `job.done(result)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from engine.config import TimeoutsConfig
from engine.delivery.backoff import Backoff
from engine.delivery.budget import ConnectionBudget
from engine.delivery.changes import Changes
from engine.delivery.job import Job, JobResult, PoolSettings, safe_done, unsent
from engine.delivery.pool_connect import PoolConnecting, TlsContextFactory
from engine.delivery.pool_queue import JobQueue, split_job
from engine.delivery.provider_gate import ProviderGate, ProviderGates
from engine.delivery.rate import ONE, TokenBucket
from engine.delivery.session import DeliverySession
from engine.delivery.site_slots import SiteGate
from engine.observe import log
from engine.smtp.replies import Reply

_RECENT = 64  # distinct domains remembered per pool (shown with a backoff; flush by domain)


class PoolStats(msgspec.Struct):
    connections_opened: int = 0
    connections_open: int = 0
    messages_sent: int = 0  # transactions whose end of data got a 2xx
    jobs_queued: int = 0
    backoff_until: float = 0.0  # loop.time(); 0 = not backing off
    concurrency_limit: int = 0
    bytes_sent: int = 0  # message content of those transactions


class SitePool(PoolConnecting):
    """Sessions to one destination site. Loop thread only; `submit` never blocks or raises."""

    def __init__(self, site_key: str, settings: PoolSettings, timeouts: TimeoutsConfig,
                 tls_context_factory: TlsContextFactory,
                 loop: asyncio.AbstractEventLoop | None = None,
                 budget: ConnectionBudget | None = None,
                 gates: ProviderGates | None = None) -> None:
        self.site_key = site_key
        self.budget = budget
        # The provider's server-wide limits (provider_gate.py); None without [[shaping]].
        self.gate: ProviderGate | None = gates.gate_for(settings) if gates else None
        # The site's server-wide count (site_slots.py); set by the pool manager.
        self.site_gate: SiteGate | None = None
        # Sessions holding a connection token (a budget slot and the provider's count).
        self._slots: set[DeliverySession] = set()
        self.settings = settings
        self.timeouts = timeouts
        self.loop = loop or asyncio.get_running_loop()
        self._tls_factory = tls_context_factory
        self._queue = JobQueue()  # by priority, then arrival
        self._sessions: set[DeliverySession] = set()  # open, not retiring
        self._retiring: set[DeliverySession] = set()
        self._idle: list[DeliverySession] = []  # LIFO stack
        self._connecting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = min(2, settings.max_connections)
        self._backoff = Backoff(float(settings.backoff))
        self._plain_only: set[str] = set()  # opportunistic TLS failed at these addresses
        self._opened = 0
        self._sent = 0
        self._sent_bytes = 0
        self._closing = False
        self._quiet_since = self.loop.time()  # when the last session or attempt ended
        self._changed = Changes()
        self._domains: dict[str, None] = {}  # insertion-ordered set, see _RECENT
        self._bucket = TokenBucket(self.loop, self._dispatch)  # used when settings.rate > 0

    # --- public --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job (answered at once when closing or backing off). Never raises."""
        try:
            domains = self._domains
            if job.domain not in domains:
                if len(domains) >= _RECENT:
                    del domains[next(iter(domains))]
                domains[job.domain] = None
            if self._closing:
                safe_done(job, unsent(job))
            elif self.gate is not None and (until := self.gate.suspended()):
                self._hold(job, until)
            elif self.loop.time() < self._backoff.until:
                safe_done(job, self._flat(job, self._backoff.reply, failed=True))
            else:
                for part in split_job(job, self.settings.max_recipients):
                    self._queue.push(part)
                self._dispatch()
        except Exception as err:  # pragma: no cover - defensive: never raise to the scheduler
            log.error("pool_submit_error", site=self.site_key, error=repr(err))

    @property
    def stats(self) -> PoolStats:
        until = self._backoff.until if self.in_backoff else 0.0
        return PoolStats(self._opened, len(self._sessions) + len(self._retiring), self._sent,
                         len(self._queue), until, self._limit, self._sent_bytes)

    @property
    def recent_domains(self) -> list[str]:
        """Domains submitted here lately (the last 64 distinct ones), oldest first."""
        return list(self._domains)

    def serves(self, domain: str) -> bool:
        return domain in self._domains

    @property
    def backoff_reply(self) -> Reply:
        """The reply that started the current (or last) backoff."""
        return self._backoff.reply

    @property
    def backoff_until(self) -> float:
        """loop.time() when the current (or last) backoff ends."""
        return self._backoff.until

    @property
    def in_backoff(self) -> bool:
        return self.loop.time() < self._backoff.until

    async def wait_for(self, predicate: Callable[[SitePool], bool], timeout: float) -> None:
        """Wait until `predicate(self)` holds, re-checked at every pool state change.

        Raises TimeoutError after `timeout` seconds.
        """
        await self._changed.until(lambda: predicate(self), timeout)

    def update_settings(self, settings: PoolSettings) -> None:
        """Adopt new limits (a reload, an operator's throttle) without dropping work:
        the concurrency limit is clamped to the new maximum, idle sessions over it QUIT
        now and busy ones when they finish (`_worn_out`); a changed rate starts a fresh
        bucket holding one message."""
        old, self.settings = self.settings, settings
        self._limit = max(1, min(self._limit, settings.max_connections))
        if settings.rate != old.rate:
            self._bucket.reset()
        if self.gate is not None:
            self.gate.configure(settings)
        while len(self._sessions) > settings.max_connections and self._idle:
            self._retire(self._idle.pop(0))  # the coldest first (bottom of the LIFO stack)
        self._dispatch()
        self._changed.set()

    def withdraw(self, domain: str) -> int:
        """Hand back every queued job for `domain` unsent (it stays due in the queue,
        no attempt counted): its hold changed. Returns how many."""
        mine = self._queue.remove_domain(domain)
        if mine:
            for job in mine:
                safe_done(job, unsent(job))
            self._changed.set()
        return len(mine)

    def end_backoff(self) -> bool:
        """An operator's flush: connect again now; the next backoff starts over from
        `backoff`. True if the pool was backing off."""
        was = self.in_backoff
        self._backoff.restart(float(self.settings.backoff), end=True)
        self._dispatch()
        self._changed.set()
        return was

    def idle_since(self) -> float | None:
        """loop.time() since when the pool has had nothing at all (no session, job,
        connection attempt or backoff); None while it has anything."""
        if self._queue or self._connecting or self._sessions or self._retiring or self.in_backoff:
            return None
        return max(self._quiet_since, self._backoff.until)

    def drop(self) -> None:
        """The pool manager forgets this pool (idle, see `idle_since`): no timer or
        budget callback may reach it any more; a job submitted still gets its result."""
        self._closing = True
        if self.budget is not None:
            self.budget.forget(self)
        if self.gate is not None:
            self.gate.forget(self)
        if self.site_gate is not None:
            self.site_gate.forget()
        self._bucket.cancel()

    def on_slot_free(self) -> None:
        """The budget freed a slot while this pool waited in its line (BudgetUser)."""
        self._dispatch()

    def on_gate_open(self) -> None:
        """The provider may have room for a message or connection (GateUser)."""
        self._dispatch()

    def retire_coldest_idle(self) -> bool:
        """QUIT the idle session unused longest (the budget needs its slot)."""
        if not self._idle:
            return False
        self._retire(self._idle.pop(0))
        return True

    async def close(self, grace: float | None = None) -> None:
        """Stop: queued and later jobs get a 4.3.2 deferral; sessions finish what is in
        flight (up to `grace` seconds, default timeouts.quit), then QUIT; stragglers are
        aborted (their jobs get 4.4.2). Every job gets exactly one result."""
        self.drop()  # no more timer or budget callbacks
        self._hand_back_queue()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        limit = float(self.timeouts.quit) if grace is None else grace
        try:
            await self.wait_for(lambda p: not any(s.busy for s in p._sessions), limit)
        except TimeoutError:
            pass
        for session in list(self._sessions):
            self._retire(session)
        ending = list(self._retiring)
        try:
            await asyncio.wait_for(
                asyncio.gather(*[s.wait_closed() for s in ending]), float(self.timeouts.quit))
        except TimeoutError:
            for session in ending:
                session.close()

    # --- SessionOwner ----------------------------------------------------------------------
    def next_job(self, session: DeliverySession) -> Job | None:
        if not self._queue or self._closing or self._worn_out(session):
            return None
        if self.gate is not None and (until := self.gate.suspended()):
            self._hold_all(until)  # no new transaction while the provider is suspended
            return None
        rate = self.settings.rate
        if rate and self._bucket.ready(rate) < ONE:
            return None  # the session idles; the bucket's timer wakes it
        gate = self.gate
        if gate is not None and gate.rate and not gate.take_message(self):
            return None  # the session idles; the gate calls on_gate_open
        if rate:
            self._bucket.take()
        return self._queue.pop()

    def job_finished(self, session: DeliverySession, job: Job, result: JobResult) -> None:
        result = self._react(job, result)
        if session.saw_421:  # the result says so already (back_off)
            safe_done(job, result)
            self._fail_queue(self._backoff.reply, failed=True)
        else:
            if any(r.code // 100 == 2 for r in result.replies.values()):
                self._sent += 1
                self._sent_bytes += len(job.prefix) + len(job.body)
                if self._limit < self.settings.max_connections:
                    self._limit += 1  # slow start: one more per success
                    if self._queue:
                        self._dispatch()
            safe_done(job, result)
        self._changed.set()

    def back_off(self, said: Reply | None) -> float:
        self._enter_backoff(said or self._backoff.reply)
        return self._backoff.until

    def session_idle(self, session: DeliverySession) -> None:
        if session not in self._sessions:
            return
        if self._closing or self._worn_out(session):
            self._retire(session)
            self._dispatch()
        else:
            self._idle.append(session)
            if self.budget is not None:
                self.budget.note_idle(self)
            if self.gate is not None:
                self.gate.note_idle(self)
            if self.site_gate is not None:
                self.site_gate.note_idle()
        self._changed.set()

    def session_closed(self, session: DeliverySession) -> None:
        was_open = session in self._sessions
        self._sessions.discard(session)
        self._retiring.discard(session)
        if session in self._idle:
            self._idle.remove(session)
        if was_open and not session.saw_421 and session.messages and not session.quitting:
            self._limit = max(1, self._limit - 1)  # lost or timed out: feedback
        self._quiet_since = self.loop.time()
        self._changed.set()
        self._dispatch()
        if session in self._slots:
            self._slots.discard(session)
            self._give_connection()

    # --- internals -----------------------------------------------------------------------
    def _worn_out(self, session: DeliverySession) -> bool:
        s = self.settings
        return (session.messages >= s.max_messages_per_connection
                or self.loop.time() - session.created_at >= s.max_connection_age
                or len(self._sessions) > self._max_connections())

    def _retire(self, session: DeliverySession) -> None:
        self._sessions.discard(session)
        if session in self._idle:
            self._idle.remove(session)
        if not session.closed:
            self._retiring.add(session)
            session.begin_quit()

    def _dispatch(self) -> None:
        if self._closing:
            return
        rate = self.settings.rate
        gate = self.gate
        if gate is not None and (until := gate.suspended()):
            self._hold_all(until)
            return
        while self._queue and self._idle:
            if rate and self._bucket.ready(rate) < ONE:
                return  # nothing may go yet; the bucket's timer calls again
            if gate is not None and gate.rate and (wait := gate.message_wait()):
                gate.wait(self, wait)
                return  # the provider's rate: the gate calls on_gate_open
            session = self._idle.pop()  # LIFO: the warmest connection
            if not (session.quitting or session.closed):
                session.kick()
        if not self._queue or self.loop.time() < self._backoff.until:
            return
        # Each connecting session will take at least one queued job.
        room = min(self._limit, self._max_connections()) - len(self._sessions) - self._connecting
        want = min(room, len(self._queue) - self._connecting)
        if rate:  # and one token each, or it would only wait idle
            want = min(want, int(self._bucket.ready(rate) + 1e-9) - self._connecting)
        if want > 0 and gate is not None and gate.rate and (wait := gate.message_wait()):
            gate.wait(self, wait)  # a new session would only wait idle
            return
        for _ in range(max(0, want)):
            if not self._take_connection():
                break  # the budget or the gate calls back when there is room
            self._connecting += 1
            task = self.loop.create_task(self._open(self._queue.peek().route))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _adopt(self, session: DeliverySession) -> None:
        session.owner = self
