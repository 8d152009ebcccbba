"""One worker's delivery loop: due (message, domain) units → routes → pools → outcomes.

Theory of operation
-------------------
The due index holds one entry per (message, domain) with pending recipients, keyed by
owner shard (`layout.owner_of`: the domain's hash plus the message id, modulo the worker
count), so one hot domain is delivered by every worker, each a share; its connection
caps hold for the whole server through the site table (site_slots.py). Worker `owner`
scans its shard for entries due now and keeps each in `inflight` from dispatch until
the outcome is committed; an entry stays in the index meanwhile, so a crash at any
point leaves it due again (at-least-once, P2).

Scans read the due index's priority lanes highest first, each from its own resume
point, and units above the default priority have headroom over `delivery.max_ready`
(engine/delivery/scan_plan.py), so a priority message overtakes a queued newsletter.
The loop wakes when this worker queues new mail, when an outcome frees capacity, and
otherwise every `poll_interval` (mail received by another worker for our shard waits
at most that long).

Outcomes are applied inside the commit: the op re-reads the record in the write
transaction, so two workers delivering different domains of one message never
overwrite each other's recipient states. Delivered, bounced and expired recipients
are marked in the same group commit that follows the remote's final reply (P3);
bounces queue their DSN in that same transaction, with the null sender, or hold it in
the record while another domain of the message is in flight, so the sender gets one
report per message and pass (engine/delivery/onereport.py).

Holds (engine/delivery/holds.py): an entry of a suspended domain is not dispatched but
parked, all of one scan's in one op, and stays in `inflight` until that op commits. A
throttled domain gets pool settings of its own (`routing.throttled`), hence its own
pool. Jobs still queued in pools for a domain whose hold changed are handed back
unsent, so the hold applies to them too.
"""

from __future__ import annotations

import asyncio
import random
import time

from engine.config import Config
from engine.delivery.dead import JITTER_PART, DeadBatch, IntakeDeferred
from engine.delivery.holds import Holds, Parked, park_op
from engine.delivery.job import Job, JobResult, PoolSettings
from engine.delivery.planner import Plan, RoutePlanner
from engine.delivery.pool import SitePool
from engine.delivery.pool_manager import PoolManager
from engine.delivery.retry import expired
from engine.delivery.scan_plan import PassOver, ScanPlan, by_kind, destination_room
from engine.delivery.scheduler_outcomes import DeliveryStats, OutcomeCommitting
from engine.dns.cache import DnsCache
from engine.dns.mx import Route, RouteError
from engine.dns.resolver import Resolver
from engine.errors import VolleyError
from engine.mail.dkim import DkimSigner
from engine.observe import log
from engine.observe.delivery_log import DeliveryLog
from engine.observe.metrics import WorkerMetrics
from engine.queue.committer import QueueCommitter
from engine.queue.ids import IdAllocator, id_text
from engine.queue.layout import DEFAULT_LANE
from engine.queue.records import MessageRecord
from engine.queue.store import QueueStore
from engine.smtp.replies import Reply

_MIN_SCAN_GAP = 0.005
MAX_LOOKUPS = 100  # domains whose route one worker resolves at once (see _resolve)


class Scheduler(OutcomeCommitting):
    def __init__(self, cfg: Config, *, store: QueueStore, committer: QueueCommitter,
                 ids: IdAllocator, dns: DnsCache, resolver: Resolver, pools: PoolManager,
                 owner: int, dlog: DeliveryLog, local: set[tuple[str, int]]) -> None:
        self.cfg = cfg
        self.store = store
        self.committer = committer
        self.ids = ids
        self.pools = pools
        self.owner = owner
        self.dlog = dlog
        self.loop = asyncio.get_running_loop()
        self.inflight: set[tuple[bytes, str]] = set()
        # In-flight units per domain, held to `_room` each (scan_plan.PassOver); domains
        # that filled their room since their units were last all read.
        self._per_dest: dict[str, int] = {}
        self._capped: set[str] = set()
        self._room = destination_room(cfg.delivery.max_ready, cfg.delivery.max_ready_per_destination)
        self.stats = DeliveryStats()
        self.rng = random.Random()
        self.schedule = cfg.delivery.retry.seconds
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set by _release when stopping empties inflight
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._plan = ScanPlan()
        self.planner = RoutePlanner(cfg, dns, resolver, local, self.loop)
        self.holds = Holds()
        self._dead = DeadBatch(self.loop, self._flush_dead, self.rng)
        self._intake_deferred = IntakeDeferred(self.loop, self._observe_intake)
        self._lookups: dict[str, asyncio.Task[Plan]] = {}  # domain → its resolution
        self._lookup_slots = asyncio.Semaphore(MAX_LOOKUPS)
        self.metrics: WorkerMetrics | None = None  # when the worker wants histograms
        self.signer: DkimSigner | None = None  # [[dkim]] keys, when any are configured
        self._suppress_codes = (frozenset(cfg.suppression.codes) if cfg.suppression.auto_bounce
                                else frozenset[str]())

    def apply_config(self, cfg: Config) -> None:
        self.cfg = cfg
        self._room = destination_room(cfg.delivery.max_ready, cfg.delivery.max_ready_per_destination)
        self._plan.forget()  # a larger room takes units passed over before
        self.schedule = cfg.delivery.retry.seconds
        self.planner.configure(cfg)
        self._suppress_codes = (frozenset(cfg.suppression.codes) if cfg.suppression.auto_bounce
                                else frozenset[str]())

    def forget_routes(self) -> None:
        """Drop the route memo: the next entry of each domain asks the DNS cache again."""
        self.planner.forget()

    def set_holds(self, holds: Holds) -> None:
        """Adopt the operator's table. Jobs still queued in pools for a domain whose
        suspension or throttle changed are handed back unsent (they stay due, and the
        next scan parks them or sends them to the right pool)."""
        old, self.holds = self.holds, holds
        self.planner.throttles = holds.throttles
        if holds.delivery_held and not old.delivery_held:
            # A handover begins: hand back every job not yet on the wire.
            for domain in {d for _, d in self.inflight}:
                self.pools.withdraw(domain)
        now = time.time()
        changed = {d for d in holds.suspensions.keys() | old.suspensions.keys()
                   if holds.suspended(d, now) != old.suspended(d, now)}
        changed |= {d for d in holds.throttles.keys() | old.throttles.keys()
                    if holds.throttles.get(d) != old.throttles.get(d)}
        self.forget_routes()
        for domain in changed:
            self.pools.withdraw(domain)
        self._plan.forget()  # handed-back entries may lie before the resume points
        self.wake()

    # --- the loop ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = self.loop.create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    def rescan(self) -> None:
        """Scan the whole shard now: entries were re-dated to before the resume point
        (a flush moves them back to their arrival time)."""
        self._plan.forget()
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop dispatching; give jobs in flight `grace` seconds to finish."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self.inflight:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                pass

    def _release(self, entry: tuple[bytes, str]) -> None:
        """The one way out of `inflight`: the entry's outcome is committed, or it was
        never dispatched. Its due entry stays in the index (P2) until the commit."""
        inflight = self.inflight
        if entry in inflight:
            inflight.discard(entry)
            domain = entry[1]
            left = self._per_dest.get(domain, 1) - 1
            if left > 0:
                self._per_dest[domain] = left
            else:
                self._per_dest.pop(domain, None)
            if domain in self._capped and left <= self._room // 2:
                # It held its whole room, so the scans passed over its other units:
                # they lie before the resume points (scan_plan.py, "Per destination").
                self._capped.discard(domain)
                self._plan.forget()
        if not inflight and self._stopping:
            self._drained.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self._scan()
            except VolleyError as err:  # storage trouble: try again next tick
                log.error("delivery_scan_failed", error=str(err))
            try:
                await asyncio.wait_for(self._wake.wait(), float(self.cfg.delivery.poll_interval))
            except TimeoutError:
                continue
            # Every received message wakes us: coalesce a burst of wake-ups into one
            # scan per _MIN_SCAN_GAP instead of one per message.
            await asyncio.sleep(_MIN_SCAN_GAP)

    def _scan(self) -> None:
        if self.holds.delivery_held:  # a handover owns the queue (holds.py)
            return
        mono = self.loop.time()
        plan = self._plan.next(self.cfg.delivery.max_ready, len(self.inflight), mono)
        if plan is None:
            return
        caps, since = plan
        now = time.time()
        room, per = self._room, self._per_dest
        until_ms = int(now * 1000)
        high, low = by_kind(caps)
        entries = self.store.due_scan(self.owner, until_ms, high, since, exclude=self.inflight)
        more = len(entries) >= high[0]
        if low[-1] > 0:
            # PassOver costs a Python call per key walked: only while a domain is full.
            passing = PassOver(self.inflight, per, room) if self._capped else self.inflight
            bulk = self.store.due_scan(self.owner, until_ms, low, since, exclude=passing)
            more = more or len(bulk) >= low[-1]
            entries += bulk
        plan_now = self.planner.now
        held = self.holds.suspensions
        parks: list[tuple[bytes, str]] = []
        dead: dict[str, SitePool | None] = {}  # per domain: its pool if backing off
        for lane, due_ms, msg_id, domain in entries:
            n = per.get(domain, 0) + 1
            if n > room and lane >= DEFAULT_LANE:  # it filled its room during this scan
                continue
            if n == room:
                self._capped.add(domain)
            per[domain] = n
            self.inflight.add((msg_id, domain))
            self._plan.saw(lane, due_ms)
            if held and domain in held and held[domain].in_force(now):
                parks.append((msg_id, domain))
                continue
            try:
                planned = plan_now(domain, mono)  # None: a DNS query to wait for
                if planned is None:
                    self.loop.create_task(self._dispatch(msg_id, domain, now))
                    continue
                pool = dead[domain] if domain in dead else dead.setdefault(
                    domain, self._backing_off(*planned))
                if pool is not None:  # dead: not read, not dispatched (dead.py)
                    self._dead.add(msg_id, domain, pool.backoff_until - mono,
                                   pool.backoff_reply, now)
                else:
                    self._dispatch_now(msg_id, domain, now, *planned)
            except Exception as err:  # never lose track of an in-flight entry
                log.error("dispatch_failed", id=id_text(msg_id), domain=domain, error=repr(err))
                self._release((msg_id, domain))
        if parks:
            self._park(parks, now)
        if entries and more:
            self._wake.set()  # a lane stopped at its cap, more may be due: scan again

    # --- holds -------------------------------------------------------------------------
    def _park(self, entries: list[tuple[bytes, str]], now: float) -> None:
        """One op for the scan's held entries (see holds.park_op); they leave
        `inflight` when it has committed."""
        op = park_op(entries, now, float(self.cfg.delivery.max_age))
        self.committer.submit(op, lambda res: self._parked(entries, res, now))

    def _parked(self, entries: list[tuple[bytes, str]], res: object, now: float) -> None:
        if isinstance(res, BaseException):
            log.error("park_failed", entries=len(entries), error=repr(res))
            res = Parked()
        assert isinstance(res, Parked)
        self.stats.parked += res.parked
        keep = set(res.released) | set(res.expired)
        for entry in entries:
            if entry not in keep:
                self._release(entry)
        # Resumed between our scan and the commit: deliver as usual.
        for msg_id, domain in res.released:
            self.loop.create_task(self._dispatch(msg_id, domain, now))
        self._expire_units(res.expired)
        self._wake.set()

    # --- one (message, domain) unit ----------------------------------------------------
    async def _dispatch(self, msg_id: bytes, domain: str, now: float) -> None:
        """Resolve the domain's route (a DNS miss), then dispatch."""
        try:
            route, settings = await self._resolve(domain)
            self._dispatch_now(msg_id, domain, now, route, settings)
        except Exception as err:  # never lose track of an in-flight entry
            log.error("dispatch_failed", id=id_text(msg_id), domain=domain, error=repr(err))
            self._release((msg_id, domain))

    def _resolve(self, domain: str) -> asyncio.Future[Plan]:
        """One resolution per domain however many of its units wait for it, and at most
        `MAX_LOOKUPS` domains resolving at once: a scan that meets 1,000 new domains would
        otherwise send 2,000 queries in one burst, and each waits its DNS timeout from its
        send, so a slow resolver fails them all (451 4.4.3) instead of answering in turn.
        Postfix is bounded alike by its 100 smtp processes."""
        task = self._lookups.get(domain)
        if task is None:
            task = self._lookups[domain] = self.loop.create_task(self._resolve_one(domain))
            task.add_done_callback(lambda _: self._lookups.pop(domain, None))
        return asyncio.shield(task)

    async def _resolve_one(self, domain: str) -> Plan:
        async with self._lookup_slots:
            return await self.planner.resolve(domain)

    def _dispatch_now(self, msg_id: bytes, domain: str, now: float,
                      route: Route | RouteError, settings: PoolSettings) -> None:
        if (dead := self._backing_off(route, settings)) is not None:
            # A dead destination: not read, not dispatched; deferred with its group.
            wait = dead.backoff_until - self.loop.time()
            self._dead.add(msg_id, domain, wait, dead.backoff_reply, now)
            return
        unit = self._read_unit(msg_id, domain)
        if unit is None:
            return
        record, body, indices = unit
        # Age is enforced at every stage (issue: "no message can sit forever").
        if expired(record.received_at, now, float(self.cfg.delivery.max_age)):
            self._commit_outcome(msg_id, domain, body, JobResult(replies={}), expire=True)
            return
        if self._stopping or self.holds.delivery_held:
            self._release((msg_id, domain))
            return
        if self._refuse_suppressed(msg_id, domain, body, record, indices):
            return
        if isinstance(route, RouteError):
            self._commit_outcome(msg_id, domain, body,
                                 JobResult(replies={i: route.reply for i in indices}))
            return
        prefix = b""
        if record.sign and self.signer:
            # Signed per attempt, as it leaves (RFC 6376 §3.5 t= is the signing time);
            # the stored body and any DSN quoting it stay as they were received. The
            # header goes out in front of the body (Job.prefix), never joined to it.
            prefix = self.signer.sign(body)
        job = Job(record, body, indices, domain, route,
                  lambda result: self._job_done(msg_id, domain, body, result),
                  created=self.loop.time(), prefix=prefix)
        self.stats.dispatched += 1
        self.pools.submit(job, settings)

    def _refuse_suppressed(self, msg_id: bytes, domain: str, body: bytes, record: MessageRecord,
                           indices: list[int]) -> bool:
        """Check the suppression list again just before sending: an address added since
        the message was accepted is not mailed. Its recipients bounce with 550 5.7.1
        (RFC 3463 X.7.1 "delivery not authorized"); the others of this unit go out on
        the next scan."""
        hits = self.store.suppressed_many([record.recipients[i].address for i in indices],
                                          record.tenant)
        if not hits:
            return False
        refused: dict[int, Reply] = {}
        for i in indices:
            entry = hits.get(record.recipients[i].address)
            if entry is not None:
                refused[i] = Reply(550, "5.7.1", f"recipient is suppressed ({entry.reason})")
        self._plan.forget()  # the rest stays due at its old time: find it on the next scan
        self._commit_outcome(msg_id, domain, body, JobResult(replies=refused, suppressed=True))
        return True

    # --- dead destinations (dead.py) ----------------------------------------------------
    def dead_until(self, domain: str) -> tuple[float, Reply, str] | None:
        """For the intake (inbound/dead_intake.py): when the domain's site is known to be
        dead without waiting (a planned route, its pool backing off; asked only while some
        site this worker deferred units of still backs off), the epoch its mail
        waits until (the backoff's end plus the jitter a group deferral draws, within
        max_age), the reply that killed the site and its summary; else None."""
        now = time.time()
        if now >= self._dead.dead_until:  # no site known dead: one comparison per message
            return None
        mono = self.loop.time()
        planned = self.planner.now(domain, mono)
        pool = self._backing_off(*planned) if planned is not None else None
        if pool is None:
            return None
        wait = max(0.0, pool.backoff_until - mono)
        until = now + wait + self.rng.uniform(0.0, wait / JITTER_PART)
        until = min(until, now + float(self.cfg.delivery.max_age))
        return until, pool.backoff_reply, self._dead.summary(pool.backoff_reply)

    def _backing_off(self, route: Route | RouteError, settings: PoolSettings) -> SitePool | None:
        return self.pools.backing_off(route, settings) if isinstance(route, Route) else None
