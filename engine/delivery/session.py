"""One outbound SMTP connection: the asyncio adapter around `engine.smtp.client`.

Theory of operation
-------------------
`connect.open_session` opens TCP and runs the setup dialogue (greeting, EHLO,
STARTTLS, AUTH: `dialogue.setup`) on a `SetupConnection`, with one awaited reply at a
time: it happens once per connection, so clarity beats speed there. Then a
DeliverySession takes the transport over (`transport.set_protocol`) and is
callback-driven from there, like the inbound adapter: `data_received` parses every
reply buffered, feeds each to the transaction at the head of `_inflight` and writes
everything that produced in ONE write (house rule 5).

Work arrives by pull: whenever the session can start a transaction it asks `_pull()`
for one, from its own queue (`run`/`run_many`) or from its owner (the `SitePool`).
Chaining (RFC 2920 §3.1): when a reply makes the head
transaction send its body (after 354), so that only the end-of-data reply is still
awaited, the session pulls the next job at once and appends that transaction's
MAIL/RCPT.../DATA to the same write. Replies are matched in order: the head
transaction until it is done, then the next. Steady state is one write and one read
per message. With CHUNKING the body already left with MAIL/RCPT/BDAT in the first
write, so the next transaction starts when the BDAT reply arrives (also one write and
one read per message). If the head ends unclean (421, a bad reply, a refused BDAT) the
chained one is aborted and the connection closed, as client.py requires.
Writes are lists of parts (commands, DKIM prefix, stored body): see `_send`.

Deadlines (house rule 8): one per session, `_deadline`, set at every write to now + the
sum of the timeouts of every reply still awaited (RFC 5321 §4.5.3.2 per phase; the
end-of-data wait also gets one data-block allowance for sending the body). One
`loop.call_at` timer re-arms itself lazily (deadline.py), so a write costs no timer
churn. Idle, the same deadline enforces `idle_timeout` (then QUIT); quitting,
`timeouts.quit`.

Every job handed to the session gets exactly one result: a finished transaction's
outcomes, or on timeout / protocol error / lost connection the transaction's `abort`
outcomes (recipients already refused keep their refusal; the rest get the failure).
Writing, the deadline, QUIT and abort are session_transport.py's `SessionTransport`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from engine.config import TimeoutsConfig
from engine.delivery.deadline import Deadline
from engine.delivery.dialogue import SetupConnection
from engine.delivery.job import Job, JobResult, PoolSettings, build_envelope
from engine.delivery.outcome import transient_failure
from engine.delivery.session_transport import SessionTransport
from engine.observe import log
from engine.smtp.client import (
    ClientProtocolError,
    RemoteReply,
    Transaction,
)
from engine.smtp.replies import Reply

__all__ = ["Deliver", "DeliverySession", "SessionOwner"]

Deliver = Callable[["DeliverySession", Job, JobResult], None]
_DATA_END = "data_end"


class SessionOwner(Protocol):
    """What a session asks of whoever feeds it (the SitePool)."""

    def next_job(self, session: DeliverySession) -> Job | None: ...
    def job_finished(self, session: DeliverySession, job: Job, result: JobResult) -> None: ...
    def session_idle(self, session: DeliverySession) -> None: ...
    def session_closed(self, session: DeliverySession) -> None: ...
    def back_off(self, said: Reply | None) -> float:
        """The server said 421 (`said`, if a job got it): back the destination off;
        returns the end of the backoff (loop.time())."""


class _InFlight:
    __slots__ = ("deliver", "job", "started", "tx")

    def __init__(self, job: Job, tx: Transaction, deliver: Deliver, started: float) -> None:
        self.job = job
        self.tx = tx
        self.deliver = deliver
        self.started = started


class DeliverySession(SessionTransport, asyncio.Protocol):
    """One SMTP client connection to one MX address. Not thread-safe; loop thread only."""

    def __init__(self, conn: SetupConnection, settings: PoolSettings,
                 timeouts: TimeoutsConfig) -> None:
        """Take over `conn`'s transport (its dialogue is done) and whatever it buffered."""
        assert conn.transport is not None
        loop = conn.loop
        self.mx_host = conn.mx_host
        self.ip = conn.ip
        self.port = conn.port
        self.settings = settings
        self.timeouts = timeouts
        self.loop = loop
        self.owner: SessionOwner | None = None
        self.transport: asyncio.Transport = conn.transport
        self.caps = conn.caps
        self.tls_version = conn.tls_version  # ssl_object.version(), "" for plaintext
        self.messages = 0  # transactions started on this connection
        self.created_at = loop.time()
        self.last_used = self.created_at
        self.saw_421 = False  # the server said 421: the pool backs the site off
        self.closed = False
        self.ready = True  # transactions may start (False once aborted or lost)
        self.quitting = False
        self._rset_first = False  # quitting after an unclean end: RSET + QUIT were sent
        self._parser = conn.parser
        self._closed_fut: asyncio.Future[None] = loop.create_future()
        self._inflight: deque[_InFlight] = deque()
        self._local: deque[tuple[Job, Deliver]] = deque()
        self._last_clean = True
        self._idle_notified = False
        self._write_paused = False
        self._backlog: list[bytes] = []
        self._deadline = Deadline(loop, self._on_deadline)
        t = timeouts
        # RFC 5321 §4.5.3.2; RSET has no timeout of its own: the generic command one (MAIL).
        self._phase_timeout = {
            "rset": float(t.mail), "mail": float(t.mail), "rcpt": float(t.rcpt),
            "data": float(t.data), _DATA_END: float(t.data_end) + float(t.data_block),
        }
        self.transport.set_protocol(self)
        if conn.closed:  # lost before the hand-over: its connection_lost went to conn
            self.connection_lost(None)

    @property
    def where(self) -> str:
        return f"{self.mx_host}[{self.ip}]:{self.port}"

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    # --- asyncio.Protocol ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        if not self.ready:
            return  # aborted: nothing is waiting for it
        if self.quitting:
            if self._rset_first:  # RSET + QUIT: the reply after RSET's ends it
                try:
                    if self._parser.next_reply() is None:
                        return
                except ClientProtocolError:
                    pass
                self._rset_first = False
                if not self._parser.buffered:
                    return
            self._abort_transport()  # the 221 (or anything): done
            return
        out: list[bytes] = []
        try:
            while self._inflight:
                reply = self._parser.next_reply()
                if reply is None:
                    break
                self._on_reply(reply, out)
            if not self._inflight and not self.closed:
                extra = self._parser.next_reply()
                if extra is not None:
                    # Unsolicited (typically "421 idle timeout"): nothing to match it to.
                    self.saw_421 = self.saw_421 or extra.code == 421
                    self._abort_transport()
                    return
        except ClientProtocolError as err:
            self._fail_all(err.reply)
            self._abort_transport()
            return
        self._service(out)

    def eof_received(self) -> bool | None:
        return False  # close our side; connection_lost settles what is in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ready = False
        self._deadline.cancel()
        why = f"connection to {self.where} lost: {exc}" if exc else \
            f"connection to {self.where} closed by the remote server"
        self._fail_all(transient_failure("lost", why))
        self._fail_local(transient_failure("lost", why))
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)
        if self.owner is not None:
            try:
                self.owner.session_closed(self)
            except Exception as err:  # an owner bug must not escape into the loop
                log.error("pool_error", where=self.where, error=repr(err))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._backlog and not self.closed:
            self._send(self._backlog)
            self._backlog = []

    # --- running jobs --------------------------------------------------------------------
    async def run(self, job: Job) -> JobResult:
        """Deliver one job on this connection; resolves to its JobResult (never raises:
        a failure is a result with 4xx replies)."""
        fut: asyncio.Future[JobResult] = self.loop.create_future()

        def deliver(_session: DeliverySession, _job: Job, result: JobResult) -> None:
            if not fut.done():
                fut.set_result(result)

        self._local.append((job, deliver))
        self.kick()
        return await fut

    async def run_many(self, jobs: Iterable[Job]) -> list[JobResult]:
        """Deliver jobs in order, chained on this connection; one result per job."""
        return list(await asyncio.gather(*[self.run(j) for j in jobs]))

    def kick(self) -> None:
        """Start pulling work if idle (the owner took the session off its idle stack)."""
        self._idle_notified = False
        if self.closed:
            self._fail_local(transient_failure("lost", f"connection to {self.where} is closed"))
            return
        self._service([])

    def _pull(self) -> tuple[Job, Deliver] | None:
        if self._local:
            return self._local.popleft()
        owner = self.owner
        if owner is not None and not self.quitting:
            job = owner.next_job(self)
            if job is not None:
                return job, owner.job_finished
        return None

    def _begin(self, item: tuple[Job, Deliver], *, needs_rset: bool) -> _InFlight | None:
        """A Transaction for a pulled job, or None when it was decided without sending."""
        job, deliver = item
        now = self.loop.time()
        try:
            tx = Transaction(build_envelope(job), self.caps,
                             first_on_connection=self.messages == 0, needs_rset=needs_rset)
        except (ValueError, IndexError) as err:
            reply = transient_failure("local", f"cannot build the transaction: {err}")
            self._call(deliver, job, self._result(job, [reply] * len(job.indices), now))
            return None
        if tx.precheck() is not None:  # a permanent local refusal: nothing is sent
            self._call(deliver, job, self._result(job, tx.outcomes, now))
            return None
        self.messages += 1
        self.last_used = now
        return _InFlight(job, tx, deliver, now)

    def _service(self, out: list[bytes]) -> None:
        """Start the next transaction if idle, flush `out` in one write, report idleness."""
        while not self._inflight and self.ready and not self.quitting:
            item = self._pull()
            if item is None:
                break
            entry = self._begin(item, needs_rset=not self._last_clean)
            if entry is not None:
                self._inflight.append(entry)
                out += entry.tx.initial_parts()
        self._write(out)
        if not self._inflight and self.ready and not self.quitting and not self._idle_notified:
            self._idle_notified = True
            self._deadline.set(self.loop.time() + float(self.settings.idle_timeout))
            if self.owner is not None:
                self.owner.session_idle(self)

    def _on_reply(self, reply: RemoteReply, out: list[bytes]) -> None:
        entry = self._inflight[0]
        tx = entry.tx
        if reply.code == 421:
            self.saw_421 = True  # RFC 5321 §3.8: the server is closing the channel
        more = tx.on_reply_parts(reply)  # ClientProtocolError: tx finished; caller closes
        if more is not None:
            out += more
            if (tx.phase == _DATA_END and len(self._inflight) == 1 and self.caps.pipelining
                    and not self._write_paused):
                self._chain(out)
        if not tx.done:
            return
        self._inflight.popleft()
        self._last_clean = tx.clean
        self._deliver(entry)
        if self.saw_421 or (not tx.clean and self._inflight):
            # The server is going away, or the chained transaction was sent on a state
            # we cannot trust: settle the rest and close (client.py "Chaining").
            self._fail_all(transient_failure(
                "lost", f"not attempted: the previous transaction on {self.where} failed"))
            self._abort_transport()

    def _chain(self, out: list[bytes]) -> None:
        """Append the next transaction's first group to this write (RFC 2920 §3.1)."""
        while True:
            item = self._pull()
            if item is None:
                return
            entry = self._begin(item, needs_rset=False)
            if entry is not None:
                self._inflight.append(entry)
                out += entry.tx.initial_parts()
                return

    def _result(self, job: Job, outcomes: list[Reply], started: float) -> JobResult:
        """The job's complete result. After a 421 (RFC 5321 §3.8) the owner backs the
        destination off, and the result says until when."""
        failed, retry_after = False, 0.0
        if self.saw_421 and self.owner is not None:
            said = next((r for r in outcomes if r.code == 421), None)
            failed, retry_after = True, self.owner.back_off(said)
        return JobResult(
            dict(zip(job.indices, outcomes)), mx_host=self.mx_host, ip=self.ip,
            tls=self.tls_version, remote_dsn=self.caps.dsn, attempt_started=started,
            destination_failed=failed, retry_after=retry_after)

    def _deliver(self, entry: _InFlight) -> None:
        self._call(entry.deliver, entry.job, self._result(entry.job, entry.tx.outcomes, entry.started))

    def _call(self, deliver: Deliver, job: Job, result: JobResult) -> None:
        try:
            deliver(self, job, result)
        except Exception as err:  # a callback bug must not break the connection
            log.error("delivery_callback_error", where=self.where, error=repr(err))

    def _fail_all(self, reply: Reply) -> None:
        """Abort every transaction in flight with `reply` for its undecided recipients."""
        while self._inflight:
            entry = self._inflight.popleft()
            entry.tx.abort(reply)
            self._last_clean = False
            self._deliver(entry)

    def _fail_local(self, reply: Reply) -> None:
        now = self.loop.time()
        while self._local:
            job, deliver = self._local.popleft()
            self._call(deliver, job, self._result(job, [reply] * len(job.indices), now))
