"""`volley ctl drain --to HOST:PORT`: hand this node's whole queue to another Volley.

Run by the supervisor, on its own handle of the queue, in five steps:

1. **Stop receiving**, as `volley ctl drain` does (listeners and the HTTP API close).
2. **Hold local delivery**: `Holds.delivery_held` goes to every worker (and to the
   store, so a worker restarted meanwhile holds too). A scheduler that holds dispatches
   nothing and hands back the jobs its pools had not started; the run asks every worker
   (`wire.InflightQuery`) until none has a unit in flight, so no unit is ever both sent
   from here and handed over.
3. **Walk the queue** in id order, in short read transactions, and give each message
   with a PENDING recipient to one of `connections` SMTP sessions with the peer
   (handover_peer.py): MAIL FROM with the original sender, RET and ENVID, one RCPT per
   PENDING recipient with NOTIFY and ORCPT, and the stored body behind one
   `X-Volley-Handover:` field that carries the rest of the record
   (engine/inbound/handover.py). The peer believes that field only from a client it
   trusts: this node must be in the peer's relay.networks, or authenticate (`user`).
4. **Forget here only after the peer's 250**: the recipients it took are marked
   delivered with the note "handed-over to HOST:PORT", in write transactions of up to
   `BATCH` messages; a message with nothing left pending is deleted. A refusal (4xx,
   5xx) or a lost connection leaves the message as it was (listed in `errors`). The
   delivery log has one line per recipient handed over (outcome "handed-over", "to"),
   and `volley_messages_handed_over_total` counts them.
5. **Release the hold**: what is left is delivered from here as before (or handed over
   by running the command again).

Duplication window (at-least-once): the peer's 250 comes before our commit, so a crash
of this node between the two (at most `BATCH` messages or `COMMIT_EVERY` seconds of
them) leaves those messages here as well, and they are delivered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.control import protocol, replies, wire
from engine.control.handover_peer import PeerConnection, PeerError, envelope
from engine.control.supervisor_api import SupervisorHandle
from engine.delivery.connect import client_tls_context
from engine.delivery.job import PoolSettings
from engine.delivery.outcome import reply_summary
from engine.inbound import handover
from engine.observe import log
from engine.observe.delivery_log import DeliveryLog
from engine.queue.ids import id_text
from engine.queue.records import DELIVERED, PENDING, MessageRecord, decode_record, domain_of
from engine.queue.store import QueueStore
from engine.queue.writetxn import WriteTxn
from engine.smtp.replies import Reply

BATCH = 200  # messages marked per write transaction
COMMIT_EVERY = 0.05  # seconds a peer's 250 may wait for our commit
PAGE = 512  # records per read transaction of the walk
SETTLE = 120.0  # seconds to wait for the units in flight to finish
CONNECT_TRIES = 3  # a session that cannot (re)connect this often gives up
MAX_ERRORS = 20  # refusals listed in the reply

Thread = Callable[..., Awaitable[Any]]  # ControlPlane._thread: fn(*args) in a thread
# (message id, record indexes the peer took, its final reply)
Taken = tuple[bytes, list[int], Reply]


class HandoverRun:
    """One run of `drain --to`; `reply()` is its progress, then its summary."""

    def __init__(self, sup: SupervisorHandle, store: QueueStore, *, target: str, host: str,
                 port: int, connections: int, settings: PoolSettings,
                 set_held: Callable[[bool], Awaitable[None]], thread: Thread,
                 counted: Callable[[int], None]) -> None:
        self.sup, self.store = sup, store
        self.target, self.host, self.port = target, host, port
        self.connections = connections
        self.settings = settings
        self.set_held = set_held
        self.thread = thread
        self.counted = counted
        self.started = time.monotonic()
        self.ended: float | None = None
        self.stage = "settling"
        self.messages = self.handed_over = self.partial = self.refused = self.recipients = 0
        self.left: int | None = None
        self.errors: list[str] = []
        self.error = ""
        self._taken: list[Taken] = []
        self._senders_alive = connections
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.ended is None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    def reply(self) -> replies.Handover:
        end = self.ended if self.ended is not None else time.monotonic()
        return replies.Handover(
            to=self.target, running=self.running, stage=self.stage, messages=self.messages,
            handed_over=self.handed_over, partial=self.partial, refused=self.refused,
            recipients=self.recipients, left=self.left, seconds=round(end - self.started, 2),
            errors=list(self.errors), error=self.error)

    # --- the run -------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("handover_started", to=self.target, connections=self.connections)
        dlog = DeliveryLog(self.sup.cfg.log.delivery, asyncio.get_running_loop())
        try:
            self.sup.drain()
            await self.set_held(True)
            if await self._settle():
                self.stage = "handing over"
                await self._hand_over(dlog)
        except Exception as err:  # the hold must be released whatever went wrong
            log.error("handover_failed", to=self.target, error=repr(err))
            self.error = self.error or f"stopped by an internal error: {err!r}"
        finally:
            with contextlib.suppress(Exception):
                await self.set_held(False)
            await dlog.close()
            self.left = int(await self.thread(self.store.count))
            self.stage = "done" if not self.error else "stopped"
            self.ended = time.monotonic()
            log.info("handover_ended", to=self.target, handed_over=self.handed_over,
                     partial=self.partial, refused=self.refused, recipients=self.recipients,
                     left=self.left, error=self.error)

    async def _settle(self) -> bool:
        """Wait until no worker has a unit in flight (they hold now)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE
        while True:
            answers = await asyncio.gather(*[s.ask(wire.InflightQuery(), 5.0) for s in self.sup.slots])
            # A worker that is down has nothing in flight; one that is silent may have.
            busy = sum(a.units for a in answers if isinstance(a, wire.Inflight))
            silent = sum(1 for a in answers if isinstance(a, wire.Refused)
                         and a.error == "worker did not answer")
            if not busy and not silent:
                return True
            if loop.time() > deadline:
                self.error = f"delivery did not settle in {SETTLE:g}s ({busy} units in flight)"
                return False
            await asyncio.sleep(0.1)

    async def _hand_over(self, dlog: DeliveryLog) -> None:
        work: asyncio.Queue[tuple[MessageRecord, bytes] | None] = asyncio.Queue(self.connections * 4)
        senders = [asyncio.ensure_future(self._sender(work)) for _ in range(self.connections)]
        stop = asyncio.Event()
        committing = asyncio.ensure_future(self._committer(dlog, stop))
        try:
            await self._walk(work)
            for _ in senders:
                await work.put(None)
            await asyncio.gather(*senders)
        finally:
            for s in senders:
                s.cancel()
            # Never cancelled: a batch the peer took must be marked here, or it is sent
            # twice. The committer ends after its last batch, the last sessions' too.
            stop.set()
            await committing

    async def _walk(self, work: asyncio.Queue[tuple[MessageRecord, bytes] | None]) -> None:
        """Every message with a PENDING recipient, once; again from the start while a
        pass finds messages the last did not (one committed by a closing session)."""
        tried: set[bytes] = set()
        fresh = True
        while fresh and self._senders_alive:
            fresh = False
            after = b""
            while self._senders_alive:
                page: list[tuple[bytes, bytes]] = await self.thread(
                    self.store.scan_records, after, PAGE)
                if not page:
                    break
                after = page[-1][0]
                picks = [rec for mid, raw in page if mid not in tried
                         for rec in (decode_record(raw),)
                         if any(r.state == PENDING for r in rec.recipients)]
                if not picks:
                    continue
                fresh = True
                tried.update(rec.id for rec in picks)
                bodies: list[bytes | None] = await self.thread(
                    self.store.get_bodies, [rec.id for rec in picks])
                for rec, body in zip(picks, bodies, strict=True):
                    if body is not None and self._senders_alive:
                        await work.put((rec, body))

    async def _sender(self, work: asyncio.Queue[tuple[MessageRecord, bytes] | None]) -> None:
        peer = PeerConnection(self.host, self.port, self.settings, self.sup.cfg.delivery.timeouts,
                              _tls_context(self.settings))
        origin = self.sup.cfg.server.hostname
        failures = 0
        try:
            while (item := await work.get()) is not None:
                rec, body = item
                while failures < CONNECT_TRIES and not peer.usable:
                    try:
                        await peer.open()
                        failures = 0
                    except PeerError as err:
                        failures += 1
                        if failures == CONNECT_TRIES:  # this session gives up
                            self._senders_alive -= 1
                            if len(self.errors) < MAX_ERRORS:
                                self.errors.append(f"a session gave up: {err}")
                            if not self._senders_alive:
                                self.error = str(err)
                        else:
                            await asyncio.sleep(0.5 * failures)
                if failures >= CONNECT_TRIES:
                    continue  # consumed unsent (it stays here), so the walk never blocks
                self.messages += 1
                try:
                    field = handover.render(handover.from_record(rec, origin, id_text(rec.id)))
                    env, indices = envelope(rec, field + body)
                    outcomes = await peer.send(env)
                except Exception as err:  # one bad message must not end the session's run
                    log.error("handover_message_failed", id=id_text(rec.id), error=repr(err))
                    self._note(rec, f"not sent: {err!r}")
                    self.refused += 1
                    peer.close()  # its state is unknown: a fresh session for the next
                    continue
                took = [i for i, r in zip(indices, outcomes, strict=True) if r.code // 100 == 2]
                for i, r in zip(indices, outcomes, strict=True):
                    if r.code // 100 != 2:
                        self._note(rec, f"<{rec.recipients[i].address}>: {reply_summary(r)}")
                if took:
                    final = next(r for r in outcomes if r.code // 100 == 2)
                    self._taken.append((rec.id, took, final))
                    if len(took) < len(indices):
                        self.partial += 1
                else:
                    self.refused += 1
        finally:
            peer.close()

    def _note(self, rec: MessageRecord, what: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"{id_text(rec.id)} {what}")

    async def _committer(self, dlog: DeliveryLog, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), COMMIT_EVERY)
            await self._commit(dlog)

    async def _commit(self, dlog: DeliveryLog) -> None:
        while self._taken:
            batch, self._taken = self._taken[:BATCH], self._taken[BATCH:]
            marked: list[tuple[MessageRecord, list[int], Reply]] = await self.thread(
                self.store.write_one, _mark_op(batch, self.target))
            now = time.time()
            for rec, indices, reply in marked:
                self.recipients += len(indices)
                if not any(r.state == PENDING for r in rec.recipients):
                    self.handed_over += 1
                self._log(dlog, rec, indices, reply, now)
            self.counted(sum(len(i) for _, i, _ in marked))

    def _log(self, dlog: DeliveryLog, rec: MessageRecord, indices: list[int], reply: Reply,
             now: float) -> None:
        tags = {"campaign": rec.campaign, "tenant": rec.tenant} if rec.campaign or rec.tenant else {}
        for i in indices:
            r = rec.recipients[i]
            dlog.write({
                "time": round(now, 3), "id": id_text(rec.id), "sender": rec.sender,
                "recipient": r.address, "domain": domain_of(r.address), "mx": self.host,
                "ip": self.host, "tls": "", "code": reply.code, "enhanced": reply.enhanced,
                "reply": "\n".join(reply.lines), "outcome": "handed-over", "to": self.target,
                "class": "", "attempt": r.attempts,
                "queue_time": round(now - rec.received_at, 3), "latency": None, **tags,
            })


def _mark_op(batch: list[Taken], target: str) -> Callable[[WriteTxn], list[tuple[MessageRecord, list[int], Reply]]]:
    """One write transaction: each message's recipients the peer took become DELIVERED
    ("handed-over to TARGET: reply"); its held failures went along; a message with
    nothing left pending is deleted. Re-reads every record: one gone or changed since
    the walk keeps what it is now."""

    def op(w: WriteTxn) -> list[tuple[MessageRecord, list[int], Reply]]:
        out = []
        for msg_id, indices, reply in batch:
            rec = w.get(msg_id)
            if rec is None:
                continue
            mine = [i for i in indices if rec.recipients[i].state == PENDING]
            note = f"handed-over to {target}: {reply_summary(reply)}"
            for i in mine:
                rec.recipients[i].state = DELIVERED
                rec.recipients[i].last_reply = note
            if mine:
                rec.held_failures = []
            if any(r.state == PENDING for r in rec.recipients):
                w.update_message(rec)
            else:
                w.delete_message(msg_id)
            out.append((rec, mine, reply))
        return out

    return op


def _tls_context(settings: PoolSettings) -> ssl.SSLContext | None:
    return None if settings.tls == "none" else client_tls_context(settings.tls_verify)


def new_run(sup: SupervisorHandle, store: QueueStore, req: protocol.Drain, *,
            set_held: Callable[[bool], Awaitable[None]], thread: Thread,
            counted: Callable[[int], None]) -> HandoverRun:
    """Start a run for the request (checked by protocol._check: `to` is HOST:PORT)."""
    host, _, port = req.to.rpartition(":")
    host = host.strip("[]")
    cfg = sup.cfg
    settings = PoolSettings(port=int(port), tls=req.tls, auth_user=req.user,
                            auth_password=req.password,
                            helo_name=cfg.delivery.helo_name or cfg.server.hostname)
    run = HandoverRun(sup, store, target=req.to, host=host, port=int(port),
                      connections=req.connections, settings=settings, set_held=set_held,
                      thread=thread, counted=counted)
    run.start()
    return run


async def answer(run: HandoverRun | None, req: protocol.Drain) -> replies.Handover:
    """The run's progress after at most `req.wait` seconds (its summary once it ended)."""
    if run is None:
        raise protocol.RequestError("no handover has run on this server (give --to HOST:PORT)")
    if req.start and run.running and run.target != req.to:
        raise protocol.RequestError(f"a handover to {run.target} is running")
    if run.task is not None and req.wait > 0:
        await asyncio.wait([run.task], timeout=req.wait)
    return run.reply()
