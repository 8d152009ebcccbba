"""The control socket's replies, one Struct per kind, as the server sends them.

Each encodes to one JSON object whose first field is "ok" (protocol.py): the field
names and their order are the wire format that `volley ctl --json` prints and the
README documents ("Control socket"), so they change only together with those. Rows
that the queue views build (`queue_view`, `message_view`) and what workers report
(MX entries, pools) travel as the plain objects those modules document.

The client does not decode into these types: it reads a reply as a plain object
with `.get` (engine/control/render.py), so a server of another version that adds
or drops a field still prints.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.control.wire import Backoff


class Reply(msgspec.Struct, kw_only=True):
    """Base of every reply; `ok` comes first on the wire."""

    ok: bool = True


class Failure(Reply, kw_only=True):
    """A request that was refused or failed; `error` says why, for the operator."""

    ok: bool = False
    error: str


class Done(Reply, kw_only=True):
    """Success with nothing more to say (reload, shutdown)."""


# --- parts ------------------------------------------------------------------------------


class WorkerRow(msgspec.Struct, kw_only=True):
    slot: int
    pid: int | None
    age: float | None  # seconds since its start; None while it is not running
    restarts: int
    sessions_in: int
    sessions_out: int
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


# --- per request ------------------------------------------------------------------------


class Status(Reply, kw_only=True):
    version: str
    pid: int
    uptime: float
    hostname: str
    listeners: list[str]
    draining: bool
    workers: list[WorkerRow]
    queue: dict[str, int]  # queue_view.totals with the exact "messages"
    rates: dict[str, dict[str, float]]  # window ("1m") → counter → per second
    suspensions: list[SuspensionRow]
    throttles: list[ThrottleRow]
    backoffs: list[Backoff]


class Queue(Reply, kw_only=True):
    """queue_view.summary: the queue's shape."""

    by: str
    buckets: list[str]
    rows: list[dict[str, Any]]
    rows_total: int
    totals: dict[str, Any]


class List(Reply, kw_only=True):
    """message_view.list_messages: a page of messages."""

    messages: list[dict[str, Any]]
    next: str  # pass as `after` for the next page; "" at the end
    scanned: int


class Show(Reply, kw_only=True):
    message: dict[str, Any]  # message_view.show


class MxFlushed(Reply, kw_only=True):
    flushed: int  # cache entries removed, over all workers


class MxEntries(Reply, kw_only=True):
    entries: list[dict[str, Any]]  # engine.delivery.runtime.Delivery.mx


class Metrics(Reply, kw_only=True):
    text: str  # Prometheus text exposition


class Suspend(Reply, kw_only=True):
    suspension: SuspensionRow


class Resume(Reply, kw_only=True):
    resumed: bool  # False: the domain was not suspended
    released: int  # parked messages made due again


class Throttle(Reply, kw_only=True):
    throttle: ThrottleRow | None  # None: cleared


class Flush(Reply, kw_only=True):
    messages: int


class Bulk(Reply, kw_only=True):
    """bounce and delete: engine.control.bulk.run_bulk's report."""

    matched: int
    done: int
    dry_run: bool
    chunks: int
    seconds: float


class Drain(Reply, kw_only=True):
    drained: bool
    remaining: int  # messages still queued
    seconds: float


_encoder = msgspec.json.Encoder()


def encode_reply(reply: Reply) -> bytes:
    """One reply line."""
    return _encoder.encode(reply) + b"\n"
