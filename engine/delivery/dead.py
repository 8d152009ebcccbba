"""Group deferral of a dead destination's units (Postfix's dead-destination marking).

A site pool backs off when a connection attempt fails on every address while no
session is open, or the server says 421 (backoff.py): the destination is dead until
the backoff ends. Mail for it must wait; what waiting costs is the point here.
Answered one unit at a time, every (message, domain) unit would still be read,
dispatched, turned into a job, answered, committed in an op of its own and logged
recipient by recipient: receiving while one destination refused connections ran at
63% of receiving alone.

Instead the scheduler collects the units of dead sites, both those its scan finds
(`PoolManager.backing_off`: the unit is never read or dispatched) and the jobs a
pool hands back when it dies or while it backs off (`Scheduler._job_done`), and
defers them together, in ONE op per `GATHER` (`defer_op`, modelled on holds.park_op):

- Each unit's PENDING recipients of its domain are re-dated to the backoff's end
  (plus the jitter the scheduler drew, so a large group does not come due in one
  burst), never past the message's expiry (`delivery.max_age`), and their
  `last_reply` becomes the reply that killed the site: `volley ctl queue` and the
  message views show it as the last error, as after any deferral.
- No attempt is counted (`attempts` stays): nothing reached the remote. Postfix
  likewise logs such a message "delivery temporarily suspended" without a delivery
  attempt of its own; the retry schedule (retry.py) goes on from the attempts that
  did reach a server. The deferral itself is counted as one: every deferred
  recipient in volley_messages_deferred_total and volley_deferrals_total{class}, the
  campaign's `deferred`, and the delivery log's one line per domain and op
  (`outcome` "deferred", `group` true, with the counts and the message ids).
- A unit that owes a report right now goes back to the ordinary outcome path
  (`full`): failures held for the message's one report (onereport.py) or a
  NOTIFY=DELAY report that has come due (reports.due_delay_reports). A unit past
  `delivery.max_age` comes back in `expired`, to be expired as usual.

The op is re-runnable: it reads only the transaction it is given and the values
captured when it was built.

Mail received for a site already known dead skips all this: the intake dates it
(inbound/dead_intake.py, asking `Scheduler.dead_until`) and `IntakeDeferred` counts and
logs it like a group once it is durable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import msgspec

from engine.delivery.dsn import dsn_wanted
from engine.delivery.outcome import reply_summary
from engine.delivery.retry import deadline
from engine.mail import bounce_class
from engine.observe.delivery_log import DeliveryLog
from engine.observe.metrics import WorkerMetrics
from engine.queue import campaigns
from engine.queue.ids import id_text
from engine.queue.records import PENDING, MessageRecord, Recipient, domain_of
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply

Entry = tuple[bytes, str]  # (message id, domain)
# A unit to defer: (message id, domain, epoch until which it waits, last_reply text).
Unit = tuple[bytes, str, float, str]
JITTER_PART = 10.0  # a unit waits up to a tenth of the backoff's rest longer (spread)
# Units gather this long before their op: while mail arrives for a dead site every scan
# finds a few, and one op (one log line, one callback) per 50 ms instead of one per scan
# halves the ops' share; they are in flight meanwhile, so no scan takes them again.
GATHER = 0.05


class GroupDeferred(msgspec.Struct):
    """What one `defer_op` did. `deferred`: (entry, recipients re-dated); `full`: the
    units that owe a report (commit their outcome the ordinary way); `expired`: past
    max_age (expire them). Units whose message is gone, or has nothing pending for
    the domain any more, are in none of the lists."""

    deferred: list[tuple[Entry, int]] = msgspec.field(default_factory=list)
    full: list[Entry] = msgspec.field(default_factory=list)
    expired: list[Entry] = msgspec.field(default_factory=list)
    recipients: int = 0


def _delay_due(rec: MessageRecord, mine: list[Recipient], now: float, delay_warning: float) -> bool:
    """A NOTIFY=DELAY report (RFC 3461 §4.1) would be queued by this deferral."""
    if delay_warning <= 0 or now - rec.received_at < delay_warning:
        return False
    return any(not r.delay_warned and dsn_wanted(r, "delayed") for r in mine)


def defer_op(units: list[Unit], now: float, max_age: float,
             delay_warning: float) -> Callable[[WriteTxn], GroupDeferred]:
    """The committer op deferring `units` as a group (see the module doc)."""
    todo = list(units)

    def op(w: WriteTxn) -> GroupDeferred:
        out = GroupDeferred()
        for msg_id, domain, until, last in todo:
            rec = w.get(msg_id)
            if rec is None:
                continue
            ends = deadline(rec.received_at, max_age)
            if now >= ends:
                out.expired.append((msg_id, domain))
                continue
            mine = [i for i, r in enumerate(rec.recipients)
                    if r.state == PENDING and domain_of(r.address) == domain]
            if not mine:
                continue
            if rec.held_failures or _delay_due(rec, [rec.recipients[i] for i in mine],
                                               now, delay_warning):
                out.full.append((msg_id, domain))
                continue
            at = min(until, ends)
            recipients = list(rec.recipients)
            for i in mine:
                r = recipients[i]
                recipients[i] = msgspec.structs.replace(
                    r, next_attempt=max(r.next_attempt, at), last_reply=last)
            w.update_message(msgspec.structs.replace(rec, recipients=recipients), stored=rec)
            if rec.campaign or rec.tenant:
                campaigns.bump(w, rec.tenant, rec.campaign, now=now, deferred=len(mine))
            out.deferred.append(((msg_id, domain), len(mine)))
            out.recipients += len(mine)
        return out

    return op


class DeadBatch:
    """The units waiting for the next group op: filled by scans and by pools failing
    their queues, flushed `GATHER` seconds after the first one. Loop thread only."""

    __slots__ = ("loop", "_flush", "units", "replies", "_pending", "rng", "_said", "dead_until")

    def __init__(self, loop: asyncio.AbstractEventLoop, flush: Callable[[], None],
                 rng: random.Random) -> None:
        self.loop = loop
        self._flush = flush
        self.rng = rng
        self.units: list[Unit] = []
        self.replies: dict[str, Reply] = {}  # domain → the reply that killed its site
        self._pending = False
        self._said: tuple[Reply | None, str] = (None, "")  # the last reply and its summary
        # Epoch until which some site this worker deferred units of backs off: before it
        # none is known dead, and the intake need not ask (Scheduler.dead_until).
        self.dead_until = 0.0

    def add(self, msg_id: bytes, domain: str, wait: float, reply: Reply, now: float) -> None:
        """Defer (msg_id, domain) `wait` seconds (the backoff's rest) plus a jitter of
        up to a tenth of it, with `reply` as its last error."""
        wait = max(0.0, wait)  # a backoff that ended meanwhile: due again at once
        self.dead_until = max(self.dead_until, now + wait)
        until = now + wait + self.rng.uniform(0.0, wait / JITTER_PART)
        self.units.append((msg_id, domain, until, self.summary(reply)))
        self.replies[domain] = reply
        if not self._pending:
            self._pending = True
            self.loop.call_later(GATHER, self._flush)

    def summary(self, reply: Reply) -> str:
        """`reply` as a unit's `last_reply` (one site's units share the text)."""
        said = self._said
        if said[0] is not reply:
            said = self._said = (reply, reply_summary(reply))
        return said[1]

    def take(self) -> tuple[list[Unit], dict[str, Reply]]:
        units, replies = self.units, self.replies
        self.units, self.replies, self._pending = [], {}, False
        return units, replies


class IntakeDeferred:
    """Units dated at intake to their dead site's backoff end (inbound/dead_intake.py),
    already durable: counted and logged together `GATHER` seconds after the first, as a
    group op's are. Loop thread only."""

    __slots__ = ("loop", "_observe", "units", "replies", "res", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 observe: Callable[[GroupDeferred, dict[str, Reply], list[Unit]], None]) -> None:
        self.loop = loop
        self._observe = observe
        self.units: list[Unit] = []
        self.replies: dict[str, Reply] = {}
        self.res = GroupDeferred()
        self._pending = False

    def add(self, msg_id: bytes, domain: str, until: float, reply: Reply, recipients: int,
            summary: str) -> None:
        self.units.append((msg_id, domain, until, summary))
        self.replies[domain] = reply
        self.res.deferred.append(((msg_id, domain), recipients))
        self.res.recipients += recipients
        if not self._pending:
            self._pending = True
            self.loop.call_later(GATHER, self._flush)

    def _flush(self) -> None:
        units, replies, res = self.units, self.replies, self.res
        self.units, self.replies, self.res, self._pending = [], {}, GroupDeferred(), False
        if units:
            self._observe(res, replies, units)


def observe_group(res: GroupDeferred, replies: dict[str, Reply], units: list[Unit],
                  now: float, dlog: DeliveryLog, metrics: WorkerMetrics | None,
                  *, intake: bool = False) -> None:
    """One delivery-log line per domain of a committed group op (Postfix logs each
    message "delivery temporarily suspended"; one line with the count and the ids says
    the same for a group at the cost of one), and each deferred recipient counted by
    the class of the reply (volley_deferrals_total{class}). `intake`: the units were
    dated when received (the line says `"intake": true`)."""
    latest: dict[str, float] = {}
    for _, domain, until, _ in units:
        if until > latest.get(domain, 0.0):
            latest[domain] = until
    by_domain: dict[str, list[tuple[bytes, int]]] = {}
    for (msg_id, domain), n in res.deferred:
        by_domain.setdefault(domain, []).append((msg_id, n))
    policy = bounce_class.active()
    for domain, done in sorted(by_domain.items()):
        reply = replies[domain]
        cls = policy.classify(reply.code, reply.enhanced, " ".join(reply.lines))
        recipients = sum(n for _, n in done)
        if metrics is not None:
            counts = metrics.by_class["deferred"]
            counts[cls] = counts.get(cls, 0) + recipients
        dlog.write({
            # The keys every line has ("id", "recipient" empty: a group), then its own.
            "time": round(now, 3), "id": "", "sender": "", "recipient": "", "domain": domain,
            "outcome": "deferred", "group": True,
            "messages": len(done), "recipients": recipients,
            "ids": [id_text(m) for m, _ in done],
            "code": reply.code, "enhanced": reply.enhanced, "reply": "\n".join(reply.lines),
            "class": cls,
            "until": round(latest[domain], 3),
            **({"intake": True} if intake else {}),
        })
