"""The control socket's replies, one Struct per kind, as the server sends them.

Each encodes to one JSON object whose first field is "ok" (protocol.py): the field
names and their order are the wire format that `volley ctl --json` prints and the
README documents ("Control socket"), so they change only together with those. The
queue views (`queue_view`, `message_view`) build the parts defined here; what workers
report comes as engine/control/wire.py defines it.

The client does not decode into these types: it reads a reply as a plain object
with `.get` (engine/control/render.py), so a server of another version that adds
or drops a field still prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from engine.control.wire import Backoff, MxEntry
from engine.queue.campaigns import CampaignCounts
from engine.queue.suppression import Suppression


class Reply(msgspec.Struct, kw_only=True):
    """Base of every reply; `ok` comes first on the wire."""

    ok: bool = True


class Failure(Reply, kw_only=True):
    """A request that was refused or failed; `error` says why, for the operator."""

    ok: bool = False
    error: str


class Done(Reply, kw_only=True):
    """Success with nothing more to say (shutdown)."""


class Reload(Reply, kw_only=True):
    """A reload that took effect; a skipped or refused one is a Failure saying why."""

    config: str  # the file re-read
    kept: list[str] = []  # settings changed in the file that wait for a restart


# --- parts ------------------------------------------------------------------------------


class WorkerRow(msgspec.Struct, kw_only=True):
    slot: int
    pid: int | None
    age: float | None  # seconds since its start; None while it is not running
    restarts: int
    sessions_in: int
    sessions_out: int
    # Delivery units dispatched and not yet committed: what a crash of the worker may
    # deliver twice (P3), since a unit sent but not recorded as sent is sent again.
    inflight: int = 0
    out_limit: int | None  # the worker's share of delivery.max_connections
    out_waiting: int  # pools waiting for a connection slot


class SuspensionRow(msgspec.Struct, kw_only=True):
    domain: str
    by: str  # who: "user (pid N)" of the control client, or "backoff"
    reason: str
    since: float
    until: float | None  # None: until resumed


class ThrottleRow(msgspec.Struct, kw_only=True):
    domain: str
    max_connections: int | None
    rate: float | None  # messages per second


class QueueCounts(msgspec.Struct, kw_only=True):
    """queue_view.totals: the queue by state, in delivery units ((message, domain) pairs)."""

    messages: int
    units: int
    bytes: int  # of the bodies, approximate
    # ready + deferred + suspended == units: the units of suspended domains are counted
    # as suspended only (the suspension holds them, due or not).
    ready: int
    deferred: int
    suspended: int


class ShapeRow(msgspec.Struct, kw_only=True):
    """One domain's (or sender's) row of `queue`: see queue_view.summary."""

    key: str
    total: int
    ages: list[int]  # counts per bucket of Queue.buckets, youngest first
    oldest: int  # the earliest arrival, epoch seconds
    next_attempt: float | None  # the earliest due after now
    # ready + deferred + suspended == total: a unit of a suspended domain is counted
    # as suspended only, whatever its due time (the suspension holds it).
    ready: int
    deferred: int
    state: str  # "suspended" (all held) | "active" (some ready) | "deferred"
    suspended: int = 0
    # Only on the row of a suspended domain: its suspension.
    reason: str | UnsetType = UNSET
    until: float | None | UnsetType = UNSET
    by_who: str | UnsetType = UNSET


class AgeRow(msgspec.Struct, kw_only=True):
    """One age bucket's row of `queue --by age`."""

    key: str  # the bucket's label
    total: int
    ready: int
    deferred: int
    suspended: int = 0  # units of suspended domains (not in ready or deferred)


class ShapeTotals(msgspec.Struct, kw_only=True):
    units: int
    messages: int | UnsetType = UNSET  # by sender only: rows count messages there
    ready: int
    deferred: int
    suspended: int  # ready + deferred + suspended == units, in every view
    domains: int | None  # recipient domains with a unit queued


class MessageRow(msgspec.Struct, kw_only=True):
    """One message of `list`: see message_view.list_messages."""

    id: str
    sender: str
    received_at: float
    size: int
    recipients: int
    pending: int  # recipients still to deliver
    domains: list[str]  # of the pending recipients
    state: str  # "queued" | "deferred" | "suspended"
    attempts: int
    next_attempt: float | None
    last_reply: str


class RecipientRow(msgspec.Struct, kw_only=True):
    address: str
    orcpt: str | None
    notify: list[str] | None
    state: str  # "pending" | "delivered" | "bounced" | "expired"
    attempts: int
    next_attempt: float | None  # None unless pending
    last_reply: str
    delay_warned: bool


class MessageDetail(msgspec.Struct, kw_only=True):
    """Everything `show` tells of one message: a `MessageRow` with the recipients
    listed, the envelope's facts and the body's headers."""

    id: str
    sender: str
    received_at: float
    size: int
    recipients: list[RecipientRow]
    pending: int
    domains: list[str]
    state: str
    attempts: int
    next_attempt: float | None
    last_reply: str
    body_type: str | None
    smtputf8: bool
    ret: str | None
    envid: str | None
    client_ip: str
    helo: str
    auth_user: str | None
    headers: list[list[str]]  # [name, value] in order, unfolded


# --- per request ------------------------------------------------------------------------


class ReactionRow(msgspec.Struct, kw_only=True):
    """A [[reactions]] entry in force for a provider (engine/control/reactions_view.py)."""

    provider: str
    action: str  # "suspend" | "halve_rate"
    rule: int  # index into [[reactions]]
    since: float  # epoch seconds
    until: float  # the end of the suspension, or of the halved rate's ramp back
    factor: float  # the rate's multiplier now (halve_rate; 0.0 while suspended)
    reply: str  # what the provider said


class Status(Reply, kw_only=True):
    version: str
    pid: int
    uptime: float
    hostname: str
    listeners: list[str]
    draining: bool
    workers: list[WorkerRow]
    queue: QueueCounts  # from the last walk, with the exact "messages"
    rates: dict[str, dict[str, float]]  # window ("1m") → counter → per second
    suspensions: list[SuspensionRow]
    throttles: list[ThrottleRow]
    backoffs: list[Backoff]
    reactions: list[ReactionRow] = []
    pools: list[dict[str, Any]] = []  # each worker's live pool rows (busiest first), with "worker": slot
    # [cluster]: state, live nodes and this node's share of each limit (None: alone)
    cluster: dict[str, Any] | None = None


class Queue(Reply, kw_only=True):
    """queue_view.summary: the queue's shape."""

    by: str
    buckets: list[str]
    rows: Sequence[ShapeRow | AgeRow]  # biggest first
    rows_total: int  # rows before the limit
    totals: ShapeTotals


class List(Reply, kw_only=True):
    """message_view.list_messages: a page of messages."""

    messages: list[MessageRow]
    next: str  # pass as `after` for the next page; "" at the end
    scanned: int


class Show(Reply, kw_only=True):
    message: MessageDetail


class MxFlushed(Reply, kw_only=True):
    flushed: int  # cache entries removed, over all workers


class MxEntries(Reply, kw_only=True):
    # kind "route" | "error" (the reply that decides the mail: no MX, NXDOMAIN, ...) |
    # "not_cached" (never looked up, or expired: nothing is known, it does not mean "no MX")
    entries: list[MxEntry]


class ShapingLive(msgspec.Struct, kw_only=True):
    """The provider's figures in the server-wide table (engine/delivery/shared_limits.py)."""

    connections: int  # open or opening, all workers together
    by_worker: dict[str, int]  # worker slot → its connections (non-zero ones)
    next_message_in: float  # seconds until the rate lets the next message go; 0 = now
    next_connection_in: float  # likewise for connect_rate


class Shaping(Reply, kw_only=True):
    domain: str
    rule: str  # the [[shaping]] entry's name; "" = none applies
    why: str  # how it matched (or "no rule: delivery defaults")
    mx_hosts: list[str]  # the most-preferred MX hosts the match looked at
    mx_source: str  # "cache" (a worker's: each is asked), "dns" (asked now), "smarthost", "none"
    settings: dict[str, object]  # the effective limits, as a config file would write them
    set_by_rule: list[str]  # the keys of `settings` the entry gives (the rest: defaults)
    live: ShapingLive | None  # None: no figures yet (nothing sent since the start)


class Metrics(Reply, kw_only=True):
    text: str  # Prometheus text exposition


class Suspend(Reply, kw_only=True):
    suspension: SuspensionRow


class Resume(Reply, kw_only=True):
    resumed: bool  # False: neither a suspended domain nor a provider with a reaction
    released: int  # parked (or held) messages made due again
    lifted: list[ReactionRow] = []  # the provider's reactions that were lifted


class Throttle(Reply, kw_only=True):
    throttle: ThrottleRow | None  # None: cleared


class Flush(Reply, kw_only=True):
    messages: int  # messages made due now
    # The suspensions in force over what was flushed: the flushed domain's, or every one
    # for a flush of all; their mail stays held until `ctl resume` (or their end).
    held_by: list[SuspensionRow] = []


class Bulk(Reply, kw_only=True):
    """bounce and delete: engine.control.bulk.run_bulk's report."""

    matched: int
    done: int
    dry_run: bool
    chunks: int
    seconds: float


class Drain(Reply, kw_only=True):
    drained: bool  # the queue emptied in time; the CLI exits 1 when not
    remaining: int  # messages still queued
    seconds: float
    delivering: bool = True  # delivery enabled: the queue can still empty after a timeout


class Handover(Reply, kw_only=True):
    """`drain --to`: the run's progress, and at the end its summary
    (engine/control/drain_to.py). Messages, except `recipients`."""

    to: str  # HOST:PORT of the peer
    running: bool
    stage: str  # "settling" (waiting for delivery to stop) | "handing over" | "done" | "stopped"
    messages: int  # sent to the peer (each had a PENDING recipient)
    handed_over: int  # the peer took every PENDING recipient: gone from here
    partial: int  # the peer took some recipients; the others stay here
    refused: int  # the peer took none (4xx, 5xx, lost connection): they stay here
    recipients: int  # recipients the peer took (its 250), marked delivered here
    left: int | None  # messages still queued here (known at the end)
    seconds: float
    errors: list[str]  # the first refusals: "ID <address>: reply"
    error: str = ""  # why the run stopped early ("" when it walked the whole queue)


class BadValue(msgspec.Struct, kw_only=True):
    index: int  # into the request's `values`
    value: str
    error: str


class SuppressAdd(Reply, kw_only=True):
    added: int  # new entries
    present: int  # already on the list (for that tenant), kept as they were
    bad: list[BadValue]  # skipped: not an address or a domain


class SuppressRemove(Reply, kw_only=True):
    removed: bool  # False: the value was not on the list (for that tenant)


class SuppressList(Reply, kw_only=True):
    # Rows are engine/queue/suppression.py Suppression objects: value, kind, reason,
    # source, created, tenant.
    entries: list[Suppression]
    next: str  # pass as `after` for the next page; "" at the end
    next_tenant: str  # pass as `after_tenant` with it
    total: int  # entries on the whole list, every tenant counted


class Campaigns(Reply, kw_only=True):
    # Rows are engine/queue/campaigns.py CampaignCounts, the most recently active first.
    campaigns: list[CampaignCounts]


_encoder = msgspec.json.Encoder()


def encode_reply(reply: Reply) -> bytes:
    """One reply line."""
    return _encoder.encode(reply) + b"\n"
