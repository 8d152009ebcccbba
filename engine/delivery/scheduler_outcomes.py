"""How the scheduler commits what delivery found (scheduler.py has the theory of
operation): one outcome op per attempted unit, re-run after a transient storage error
rather than released (a release would send the message again), and the group deferral
of a dead destination's units (dead.py), one op for all of them.

`OutcomeCommitting` is the part of `Scheduler` that does this; the attributes it declares
are the scheduler's own, set up by `Scheduler.__init__`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import cast

from engine.config import Config
from engine.delivery import outcome as outcome_mod
from engine.delivery.bounce import write_outcome
from engine.delivery.dead import DeadBatch, GroupDeferred, IntakeDeferred, defer_op, observe_group
from engine.delivery.job import JobResult
from engine.delivery.ledger import Ledger
from engine.delivery.outcome_lines import log_outcome, observe_outcome
from engine.delivery.reports import due_delay_reports
from engine.errors import StorageError, StoragePanic
from engine.observe import log
from engine.observe.delivery_log import DeliveryLog
from engine.observe.metrics import WorkerMetrics
from engine.queue.committer import QueueCommitter
from engine.queue.ids import IdAllocator, id_text
from engine.queue.records import EXPIRED, PENDING, MessageRecord, domain_of
from engine.queue.store import QueueStore, WriteTxn
from engine.smtp.replies import Reply

# Wait before committing an outcome again after its commit failed (see _committed).
_COMMIT_RETRY = 0.5


class DeliveryStats:
    """Counters since start; outcomes count recipients (`bounced` includes `expired`)."""

    __slots__ = ("dispatched", "delivered", "deferred", "bounced", "expired", "dsns",
                 "attempts", "parked", "grouped", "group_ops")

    def __init__(self) -> None:
        self.dispatched = self.delivered = self.deferred = self.bounced = self.expired = 0
        self.dsns = self.attempts = self.parked = 0
        # Units of dead destinations deferred as a group, and the ops that did it (dead.py).
        self.grouped = self.group_ops = 0


class OutcomeCommitting:
    cfg: Config
    store: QueueStore
    committer: QueueCommitter
    ids: IdAllocator
    dlog: DeliveryLog
    loop: asyncio.AbstractEventLoop
    stats: DeliveryStats
    rng: random.Random
    schedule: tuple[float, ...]
    metrics: WorkerMetrics | None
    _wake: asyncio.Event
    _stopping: bool
    _dead: DeadBatch
    _intake_deferred: IntakeDeferred
    _suppress_codes: frozenset[str]

    def _release(self, entry: tuple[bytes, str]) -> None:
        raise NotImplementedError

    def _read_unit(self, msg_id: bytes, domain: str) -> tuple[MessageRecord, bytes, list[int]] | None:
        """The unit's record, body and pending recipients for `domain`; None (and the
        unit released) when the message is gone or nothing of it is pending there."""
        record = self.store.get(msg_id)
        body = self.store.get_body(msg_id) if record is not None else None
        if record is None or body is None:
            self._release((msg_id, domain))
            return None
        indices = [i for i, r in enumerate(record.recipients)
                   if r.state == PENDING and domain_of(r.address) == domain]
        if not indices:
            self._release((msg_id, domain))
            return None
        return record, body, indices

    def _job_done(self, msg_id: bytes, domain: str, body: bytes, result: JobResult) -> None:
        """A job's result. One its pool answered without reaching the remote because
        the destination is dead (its queue failed, or it was submitted during the
        backoff) joins the group deferral; anything else is an outcome of its own."""
        if (result.destination_failed and result.retry_after and not result.mx_host
                and result.attempted and result.replies):
            reply = next(iter(result.replies.values()))
            self._dead.add(msg_id, domain, result.retry_after - self.loop.time(), reply,
                           time.time())
            return
        self._commit_outcome(msg_id, domain, body, result)

    def _flush_dead(self) -> None:
        """One op for every unit of a dead destination gathered (dead.GATHER)."""
        units, replies = self._dead.take()
        if not units:
            return
        now = time.time()
        op = defer_op(units, now, float(self.cfg.delivery.max_age),
                      float(self.cfg.delivery.delay_warning))
        try:
            self.committer.submit(op, lambda res: self._deferred_group(units, replies, res, now))
        except RuntimeError:  # the committer stopped (shutdown): the entries stay due (P2)
            for msg_id, domain, _, _ in units:
                self._release((msg_id, domain))

    def deferred_at_intake(self, msg_id: bytes, deferrals: Sequence[tuple[str, float, Reply, int]]) -> None:
        """Recipients the intake dated to a dead site's backoff end (`dead_until`), now
        durable: counted and logged as a group's are (dead.IntakeDeferred)."""
        for domain, until, reply, recipients in deferrals:
            self._intake_deferred.add(msg_id, domain, until, reply, recipients, self._dead.summary(reply))

    def _observe_intake(self, res: GroupDeferred, replies: dict[str, Reply],
                        units: list[tuple[bytes, str, float, str]]) -> None:
        self.stats.deferred += res.recipients
        self.stats.grouped += len(res.deferred)
        observe_group(res, replies, units, time.time(), self.dlog, self.metrics, intake=True)

    def _deferred_group(self, units: list[tuple[bytes, str, float, str]],
                        replies: dict[str, Reply], res: object, now: float) -> None:
        if isinstance(res, BaseException):
            # Nothing was sent: releasing leaves each unit due as it was (P2).
            log.error("group_defer_failed", units=len(units), error=repr(res))
            for msg_id, domain, _, _ in units:
                self._release((msg_id, domain))
            return
        assert isinstance(res, GroupDeferred)
        special = set(res.full) | set(res.expired)
        for msg_id, domain, _, _ in units:
            if (msg_id, domain) not in special:
                self._release((msg_id, domain))
        st = self.stats
        st.deferred += res.recipients
        st.grouped += len(res.deferred)
        st.group_ops += 1
        observe_group(res, replies, units, now, self.dlog, self.metrics)
        self._expire_units(res.expired)
        until = {(u[0], u[1]): u[2] for u in units}
        for msg_id, domain in res.full:  # owes a report: the ordinary outcome path
            self._outcome_of_dead(msg_id, domain, replies[domain], until[(msg_id, domain)], now)
        self._wake.set()

    def _expire_units(self, entries: list[tuple[bytes, str]]) -> None:
        """Expire units an op found past delivery.max_age (their message still there)."""
        for msg_id, domain in entries:
            body = self.store.get_body(msg_id)
            if body is None:
                self._release((msg_id, domain))
            else:
                self._commit_outcome(msg_id, domain, body, JobResult(replies={}), expire=True)

    def _outcome_of_dead(self, msg_id: bytes, domain: str, reply: Reply, until: float,
                         now: float) -> None:
        unit = self._read_unit(msg_id, domain)
        if unit is None:
            return
        _, body, indices = unit
        result = JobResult({i: reply for i in indices}, destination_failed=True,
                           retry_after=self.loop.time() + max(0.0, until - now))
        self._commit_outcome(msg_id, domain, body, result)

    # --- outcomes ----------------------------------------------------------------------
    def _commit_outcome(self, msg_id: bytes, domain: str, body: bytes, result: JobResult,
                        *, expire: bool = False) -> None:
        if not result.attempted:
            # Never attempted: leave it due; the next start picks it up unchanged.
            self._release((msg_id, domain))
            return
        now = time.time()
        cfg = self.cfg
        # DSN ids (failed, relayed, delayed) are allocated here: ids come from the loop thread.
        dsn_ids = (self.ids.next(), self.ids.next(), self.ids.next())
        schedule, max_age = self.schedule, float(cfg.delivery.max_age)
        delay_warning = float(cfg.delivery.delay_warning)
        reporting = cfg.server.hostname
        rng = self.rng
        mono_now = self.loop.time()
        ledger = Ledger(self._suppress_codes, suppressed=result.suppressed)

        def op(w: WriteTxn) -> tuple[MessageRecord, outcome_mod.Applied, int] | None:
            current = w.get(msg_id)
            if current is None:
                return None
            if expire:
                mine = [i for i, r in enumerate(current.recipients)
                        if r.state == PENDING and domain_of(r.address) == domain]
                applied = outcome_mod.expire_pending(current, now, max_age, mine)
            else:
                applied = outcome_mod.apply(current, result.replies, now, schedule=schedule,
                                            max_age=max_age, rng=rng,
                                            destination_failed=result.destination_failed)
                if result.retry_after and applied.deferred:
                    _not_before(applied.record, applied.deferred, now, result, mono_now)
            delayed = due_delay_reports(applied, now, delay_warning)
            dsns = write_outcome(w, current, applied, body, report_ids=dsn_ids,
                                 reporting_mta=reporting, now=now,
                                 retry_until=current.received_at + max_age,
                                 remote_mta=result.mx_host, remote_dsn=result.remote_dsn,
                                 delayed=delayed, ledger=ledger)
            return current, applied, dsns

        self._submit_outcome(op, msg_id, domain, result, now)

    def _submit_outcome(self, op: Callable[[WriteTxn], object], msg_id: bytes, domain: str,
                        result: JobResult, now: float) -> None:
        try:
            self.committer.submit(
                op, lambda res: self._committed(op, msg_id, domain, result, res, now))
        except RuntimeError:  # the committer stopped (shutdown): the entry stays due (P2)
            self._release((msg_id, domain))

    def _committed(self, op: Callable[[WriteTxn], object], msg_id: bytes, domain: str,
                   result: JobResult, res: object, now: float) -> None:
        if (isinstance(res, StorageError) and not isinstance(res, StoragePanic)
                and not self._stopping):
            # The attempt happened (maybe a remote 250) but its outcome did not commit
            # (QueueFull, a transient storage error). Releasing the entry would send the
            # message again at once, and again for as long as the queue stays full: a
            # duplicate each time and no progress. Keep it in flight and commit the same
            # outcome again shortly (ops are re-runnable); the headroom kept by
            # queue.high_water makes this rare.
            log.error("outcome_commit_failed", id=id_text(msg_id), domain=domain,
                      error=repr(res), retry_in=_COMMIT_RETRY)
            self.loop.call_later(_COMMIT_RETRY, self._submit_outcome, op, msg_id, domain,
                                 result, now)
            return
        self._release((msg_id, domain))
        self._wake.set()  # capacity freed
        if isinstance(res, BaseException):
            log.error("outcome_commit_failed", id=id_text(msg_id), domain=domain, error=repr(res))
            return
        if res is None:
            return
        before, applied, dsns = cast(tuple[MessageRecord, outcome_mod.Applied, int], res)
        st = self.stats
        st.dsns += dsns  # counted once the reports are committed, as the outcome is
        st.delivered += len(applied.delivered)
        st.deferred += len(applied.deferred)
        st.bounced += len(applied.bounced)
        if applied.bounced:
            recipients = applied.record.recipients
            st.expired += sum(1 for i in applied.bounced if recipients[i].state == EXPIRED)
        mono = self.loop.time()
        if self.metrics is not None:
            observe_outcome(self.metrics, before, applied, result, now, mono)
        log_outcome(self.dlog, before, applied, domain, result, now, mono)


def _not_before(record: MessageRecord, indices: list[int], now: float, result: JobResult,
                mono_now: float) -> None:
    """A destination in backoff: its deferred recipients wait at least until it ends."""
    wall = now + max(0.0, result.retry_after - mono_now)
    for i in indices:
        rcpt = record.recipients[i]
        if rcpt.next_attempt < wall:
            rcpt.next_attempt = wall
