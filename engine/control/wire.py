"""The pipe between the supervisor and each worker: typed messages, one JSON line each.

Both ends import this module (it sits below both, in control), so a message is
defined once and each side decodes with one typed decoder: a malformed or unknown
message is refused at the decoder (msgspec.ValidationError), never half-read.

Supervisor → worker (tagged on "cmd"): `Start` first, then any of `Reload`, `Stop`,
`Drain` (stop accepting, keep delivering), `SetHolds` (suspensions and throttles),
`Flush` (end backoffs, scan now) and the requests that are answered: `MxQuery`, and
`LiftReaction` (an operator lifted a provider's [[reactions]]).
Worker → supervisor (tagged on "event"): `Ready` once it accepts, `State` every
second (metrics and live figures, engine/control/fleet.py), `ReactionFired` when a
reaction of its pools goes in force (engine/delivery/reactions.py), and to a request
one of `MxFlushed`, `MxEntries`, `Lifted`, `Inflight` or `Refused` carrying its `ask`
number (`InflightQuery` asks for `Inflight`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.delivery.holds import Holds

# --- supervisor → worker ----------------------------------------------------------------


class ToWorker(msgspec.Struct, tag_field="cmd", kw_only=True):
    """Base of what the supervisor sends; `cmd` is the tag."""


class Start(ToWorker, tag="start"):
    slot: int
    workers: int
    # The configuration in its readable form (engine.config.to_builtins); the worker
    # validates it again with config.from_dict, as it would a file.
    config: dict[str, Any]


class Reload(ToWorker, tag="reload"):
    config: dict[str, Any]


class Stop(ToWorker, tag="stop"):
    pass


class Drain(ToWorker, tag="drain"):
    pass


class SetHolds(ToWorker, tag="holds"):
    holds: Holds  # the whole table; it replaces the worker's


class Flush(ToWorker, tag="flush"):
    domain: str | None = None  # None: every destination


class MxQuery(ToWorker, tag="mx"):
    """Read (or with `flush`, empty) the worker's MX cache; `ask` numbers the answer."""

    domain: str | None = None
    flush: bool = False
    ask: int = 0


class LiftReaction(ToWorker, tag="lift"):
    """The operator lifted `provider`'s reactions (the supervisor cleared the shared
    table): end its pools' backoffs; answered with the domains whose mail was held."""

    provider: str
    ask: int = 0


class InflightQuery(ToWorker, tag="inflight"):
    """How many units the worker's scheduler has in flight (a handover waits for 0
    after holding delivery, engine/control/drain_to.py); answered with `Inflight`."""

    ask: int = 0


AnyToWorker = Start | Reload | Stop | Drain | SetHolds | Flush | MxQuery | LiftReaction | InflightQuery
Query = MxQuery | LiftReaction | InflightQuery


# --- worker → supervisor ----------------------------------------------------------------


class FromWorker(msgspec.Struct, tag_field="event", kw_only=True):
    """Base of what a worker sends; `event` is the tag."""


class Ready(FromWorker, tag="ready"):
    slot: int
    pid: int


class Budget(msgspec.Struct, kw_only=True, frozen=True):
    """The worker's share of delivery.max_connections and who waits for a slot."""

    limit: int | None = None
    used: int = 0
    waiting: int = 0


class Backoff(msgspec.Struct, kw_only=True, frozen=True):
    """A destination a worker's pool is backing off: an automatic suspension."""

    site: str
    domains: list[str] = []
    until: float | None = None  # epoch seconds
    reply: str = ""


class Live(msgspec.Struct, kw_only=True, frozen=True):
    """A worker's live figures (engine.delivery.runtime.Delivery.live_state and its
    inbound sessions); everything but the sessions stays empty without delivery."""

    sessions_in: int = 0
    sessions_out: int = 0
    inflight: int = 0
    queued_jobs: int = 0
    pools: list[dict[str, Any]] = []
    pools_total: int = 0
    connection_budget: Budget | None = None
    backoffs: list[Backoff] = []


class State(FromWorker, tag="state"):
    slot: int
    metrics: dict[str, Any]  # engine.observe.metrics.WorkerMetrics.snapshot()
    live: Live


class ReactionFired(FromWorker, tag="reaction"):
    """A [[reactions]] entry went in force for a provider (engine.delivery.reactions.Fired;
    times are epoch seconds)."""

    slot: int
    provider: str
    action: str  # "suspend" | "halve_rate"
    rule: int  # index into [[reactions]]
    since: float
    until: float  # the end of the suspension, or of the halved rate's ramp back
    reply: str  # what the provider said
    factor: float = 1.0  # halve_rate: the factor the rate fell to
    hold_until: float = 0.0  # halve_rate: when the ramp back begins


class Answer(FromWorker):
    """Base of the answers to a request (`Query`): `ask` is the request's number."""

    ask: int


class MxFlushed(Answer, tag="mx_flushed"):
    flushed: int  # cache entries removed


class MxHost(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    preference: int
    addresses: list[str]


class MxEntry(msgspec.Struct, kw_only=True, frozen=True):
    """What a worker's MX cache holds for a domain (engine.delivery.runtime.Delivery.mx)."""

    domain: str
    kind: str  # "route" (hosts in the order tried) | "error" (reply) | "none" (not cached)
    hosts: list[MxHost]
    reply: str
    ttl: float  # seconds left


class MxEntries(Answer, tag="mx_entries"):
    entries: list[MxEntry]


class Lifted(Answer, tag="lifted"):
    domains: list[str]  # whose mail was deferred by the provider's suspension


class Refused(Answer, tag="refused"):
    """The query was not served: delivery is off, or the worker is down or silent."""

    error: str


class Inflight(Answer, tag="inflight"):
    units: int  # (message, domain) units dispatched and not yet committed


AnyAnswer = MxFlushed | MxEntries | Lifted | Inflight | Refused
AnyFromWorker = Ready | State | ReactionFired | MxFlushed | MxEntries | Lifted | Inflight | Refused

to_worker_decoder = msgspec.json.Decoder(AnyToWorker)
from_worker_decoder = msgspec.json.Decoder(AnyFromWorker)
_encoder = msgspec.json.Encoder()


def encode(message: ToWorker | FromWorker) -> bytes:
    """One line of the pipe."""
    return _encoder.encode(message) + b"\n"
