"""One injection request, from decoded JSON to one durable commit.

validate → compile the content once → check every recipient's address and the
suppression list (one read transaction) → render each remaining recipient, yielding
to the event loop every `RENDER_CHUNK` so the worker's SMTP sessions keep being served
→ ONE committer op storing every message and the campaign's counters → answer.

The op is all-or-nothing: the store rolls a failing op back alone (QueueFull
included), so either every accepted recipient's message is queued and counted, or
none is and the client is told so. The answer goes out only after the commit (and,
under "fsync", the flush): a 200 means the mail is on disk, like SMTP's 250.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import Config
from engine.config.egress import DEFAULT_POOL
from engine.errors import QueueFull
from engine.http.envelope import ReceivedHeader, injected_record, mailbox_problem
from engine.http.schema import (
    FailedRecipient,
    InjectRequest,
    InjectResponse,
    RecipientIn,
    RequestError,
)
from engine.mail import verp
from engine.mail.compose import CompiledContent, compile_content
from engine.mail.template import RenderError, TemplateError, merge_bindings
from engine.queue import campaigns
from engine.queue.committer import QueueCommitter
from engine.queue.ids import IdAllocator, id_text
from engine.queue.records import MessageRecord
from engine.queue.store import QueueStore
from engine.queue.suppression import check_tenant
from engine.queue.writetxn import WriteTxn

RENDER_CHUNK = 200  # recipients rendered between two yields to the loop


@dataclass
class Backend:
    """What the API needs of its worker: the queue, its writer, the id allocator
    (loop thread only) and the scheduler's wake-up (None without delivery)."""

    store: QueueStore
    committer: QueueCommitter
    ids: IdAllocator
    on_new_mail: Callable[[], None] | None = None


@dataclass
class Client:
    """Who asked: for the Received: header and the record."""

    ip: str
    tls: bool
    token_name: str


@dataclass
class Timings:
    """Seconds spent per phase of the last request (logged; the bench reads them)."""

    screen: float = 0.0  # address syntax and the suppression list
    render: float = 0.0
    commit: float = 0.0


@dataclass
class _Batch:
    items: list[tuple[MessageRecord, bytes]] = field(default_factory=list)
    failed: list[FailedRecipient] = field(default_factory=list)
    suppressed: int = 0


def check_request(req: InjectRequest, cfg: Config) -> None:
    """What makes the whole request unacceptable. Raises RequestError."""
    if not req.recipients:
        raise RequestError(400, "at least one recipient is required", "recipients")
    limit = cfg.http.max_recipients
    if len(req.recipients) > limit:
        raise RequestError(413, f"{len(req.recipients)} recipients, more than http.max_recipients"
                           f" ({limit}) in one request", "recipients")
    problem = mailbox_problem(req.envelope_sender)
    if problem:
        raise RequestError(400, problem, "envelope_sender")
    try:
        check_tenant(req.tenant)
        campaigns.campaign_key(req.tenant, req.campaign_id)
    except ValueError as err:
        name, _, text = str(err).partition(": ")
        raise RequestError(400, text, "campaign_id" if name == "campaign" else name) from None
    if req.egress_pool and req.egress_pool != DEFAULT_POOL and all(
            e.pool != req.egress_pool for e in cfg.egress):
        raise RequestError(400, f'no [[egress]] entry is in pool "{req.egress_pool}"', "egress_pool")


async def inject(req: InjectRequest, cfg: Config, backend: Backend, client: Client,
                 timings: Timings | None = None) -> InjectResponse:
    """Raises RequestError for a request refused as a whole (nothing stored)."""
    check_request(req, cfg)
    try:
        compiled = compile_content(req.content, list_unsubscribe=req.list_unsubscribe)
    except TemplateError as err:
        raise RequestError(400, str(err), err.field) from None
    batch = _Batch()
    started = time.perf_counter()
    candidates = _screen(req, backend.store, batch)
    screened = time.perf_counter()
    await _render_all(req, cfg, compiled, candidates, backend.ids, client, batch)
    rendered = time.perf_counter()
    if batch.items or batch.suppressed:
        await _commit(req, backend.committer, batch)
        if batch.items and backend.on_new_mail is not None:
            backend.on_new_mail()
    if timings is not None:
        timings.screen, timings.render = screened - started, rendered - screened
        timings.commit = time.perf_counter() - rendered
    reasons = list(dict.fromkeys(f.error for f in batch.failed))
    return InjectResponse(success_count=len(batch.items), fail_count=len(batch.failed),
                          failed_recipients=batch.failed, errors=reasons)


def _screen(req: InjectRequest, store: QueueStore, batch: _Batch) -> list[RecipientIn]:
    """The recipients whose address is good and not suppressed; the rest go to
    `batch.failed` with their reason. One read transaction for the whole list."""
    good: list[RecipientIn] = []
    for r in req.recipients:
        problem = mailbox_problem(r.email)
        if problem:
            batch.failed.append(FailedRecipient(r.email, problem))
        else:
            good.append(r)
    hits = store.suppressed_many([r.email for r in good], req.tenant)
    if not hits:
        return good
    kept = []
    for r in good:
        hit = hits.get(r.email)
        if hit is None:
            kept.append(r)
        else:
            batch.failed.append(FailedRecipient(r.email, f"suppressed ({hit.reason})"))
            batch.suppressed += 1
    return kept


async def _render_all(req: InjectRequest, cfg: Config, compiled: CompiledContent,
                      recipients: list[RecipientIn], ids: IdAllocator, client: Client,
                      batch: _Batch) -> None:
    hostname = cfg.server.hostname
    feedback = cfg.feedback.address
    use_verp = bool(feedback) and cfg.feedback.verp and req.envelope_sender.lower() == feedback.lower()
    max_size = int(cfg.limits.max_message_size)
    trace = ReceivedHeader(client.ip, hostname, client.tls, client.token_name)
    now = time.time()
    shared = req.substitutions
    for n, r in enumerate(recipients):
        if n and n % RENDER_CHUNK == 0:
            await asyncio.sleep(0)  # let the worker's SMTP sessions run
        token = verp.encode_token(r.email, req.campaign_id, req.tenant)
        bindings = merge_bindings(shared, r.substitutions, r.email, r.name)
        try:
            content = compiled.render(bindings, message_id=verp.message_id(token, hostname))
        except RenderError as err:
            batch.failed.append(FailedRecipient(r.email, str(err)))
            continue
        raw_id = ids.next()
        body = trace.render(id_text(raw_id), r.email) + content
        if len(body) > max_size:
            batch.failed.append(FailedRecipient(
                r.email, f"message of {len(body)} bytes is over limits.max_message_size"))
            continue
        sender = verp.verp_address(feedback, token) if use_verp else req.envelope_sender
        # Raw content may be 8-bit only through a substitution: look at this copy.
        eight_bit = compiled.body_8bit and not content.isascii()
        batch.items.append((injected_record(
            raw_id, sender, r.email, len(body), now=now, body_8bit=eight_bit,
            client_ip=client.ip, token_name=client.token_name, campaign=req.campaign_id,
            tenant=req.tenant, priority=req.priority, verp=use_verp,
            egress_pool=req.egress_pool), body))


async def _commit(req: InjectRequest, committer: QueueCommitter, batch: _Batch) -> None:
    """ONE op: every message and the campaign counters. Raises RequestError 507/503
    when it did not land (then nothing of it did)."""
    items, suppressed, now = batch.items, batch.suppressed, time.time()

    def op(w: WriteTxn) -> int:  # re-runnable: a pure function of `w`
        for record, body in items:
            w.put_message(record, body)
        campaigns.bump(w, req.tenant, req.campaign_id, now=now, injected=len(items),
                       suppressed=suppressed)
        return len(items)

    loop = asyncio.get_running_loop()
    done: asyncio.Future[object] = loop.create_future()

    def committed(result: object) -> None:
        if not done.done():
            done.set_result(result)

    try:
        committer.submit(op, committed)
    except RuntimeError:  # the committer stopped: the worker is going down
        raise RequestError(503, "the server is shutting down; nothing was stored") from None
    # A client that hangs up does not cancel the commit: it lands or fails all the same.
    result = await asyncio.shield(done)
    if isinstance(result, QueueFull):
        raise RequestError(507, "the queue is full (queue.high_water); nothing was stored,"
                           " retry later")
    if isinstance(result, BaseException):
        raise RequestError(503, "the queue could not store the messages; nothing was stored,"
                           " retry later")
