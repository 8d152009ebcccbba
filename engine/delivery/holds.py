"""Operator holds on delivery: suspended domains and throttled domains.

The supervisor owns the table: it saves it in the queue store (`HOLDS_KEY`, msgpack)
whenever it changes and sends it to every worker over the control pipe (JSON, via
`holds_to_builtins`); a worker reads the stored copy when it starts, so a restarted
worker holds at once. Domains are lower-cased, without a trailing dot, and match
exactly (a suspension of example.com does not hold sub.example.com).

Suspended mail is *parked* rather than skipped: `park_op` re-dates the domain's
PENDING recipients to the end of the suspension (or `PARK` seconds ahead for an
open-ended one), so their due entries leave the scan's way and a million held
messages are looked at once per `PARK`, not at every scan. The op decides from the
table as stored in its own write transaction, not from the worker's copy: a resume
whose store flush committed just before would otherwise be undone by a park queued
just after. No message outlives `delivery.max_age` because it is held: a parked
recipient comes due again no later than its expiry, and is then expired as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from engine.delivery.retry import deadline
from engine.dns.mx import norm_domain
from engine.queue.records import PENDING, domain_of
from engine.queue.writetxn import WriteTxn

HOLDS_KEY = b"holds"  # QueueStore control-state name of the table
PARK = 3600.0  # an open-ended suspension re-parks its entries this far ahead; resume flushes them back


class Suspension(msgspec.Struct, frozen=True):
    """No delivery to `domain` from `since` until `until` (epoch; None = until resumed)."""

    domain: str
    since: float
    until: float | None
    reason: str
    by: str = "operator"

    def in_force(self, now: float) -> bool:
        return self.until is None or self.until > now


class Throttle(msgspec.Struct, frozen=True):
    """Limits for one domain's own connection pool; None leaves the configured value
    (connections) or means unlimited (rate, messages per second)."""

    domain: str
    max_connections: int | None
    rate: float | None
    since: float


class Holds(msgspec.Struct):
    """The whole table, keyed by normalised domain (keys are normalised on creation)."""

    suspensions: dict[str, Suspension] = msgspec.field(default_factory=dict)
    throttles: dict[str, Throttle] = msgspec.field(default_factory=dict)
    # `volley ctl drain --to` hands the queue to another node: no local dispatch at all
    # meanwhile, so no unit is both sent from here and handed over (drain_to.py).
    delivery_held: bool = False

    def __post_init__(self) -> None:
        if any(k != norm_domain(k) for k in self.suspensions):
            self.suspensions = {norm_domain(k): v for k, v in self.suspensions.items()}
        if any(k != norm_domain(k) for k in self.throttles):
            self.throttles = {norm_domain(k): v for k, v in self.throttles.items()}

    def suspended(self, domain: str, now: float) -> Suspension | None:
        """The suspension of `domain` in force at `now` (one whose `until` passed is not)."""
        s = self.suspensions.get(domain) or self.suspensions.get(norm_domain(domain))
        return s if s is not None and s.in_force(now) else None

    def expired(self, now: float) -> list[str]:
        """Domains whose timed suspension has ended (the supervisor drops them)."""
        return [d for d, s in self.suspensions.items() if not s.in_force(now)]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Holds)


def encode_holds(h: Holds) -> bytes:
    return _encoder.encode(h)


def decode_holds(b: bytes) -> Holds:
    """Raises msgspec.DecodeError / ValidationError on bytes that are not a table."""
    return _decoder.decode(b)


def holds_to_builtins(h: Holds) -> dict[str, Any]:
    """JSON-ready form for the control pipe."""
    return msgspec.to_builtins(h)  # type: ignore[no-any-return]


def holds_from_builtins(obj: Any) -> Holds:
    """Raises msgspec.ValidationError on a malformed table."""
    return msgspec.convert(obj, Holds)


# --- parking ---------------------------------------------------------------------------

Entry = tuple[bytes, str]  # (message id, domain)


class Parked(msgspec.Struct):
    """What one park op did: `released` entries are not suspended in the stored table
    (deliver them), `expired` ones are past max_age (expire them); the rest were parked
    or are gone."""

    parked: int = 0
    released: list[Entry] = msgspec.field(default_factory=list)
    expired: list[Entry] = msgspec.field(default_factory=list)


def park_op(entries: Iterable[Entry], now: float, max_age: float) -> Callable[[WriteTxn], Parked]:
    """A committer op re-dating the PENDING recipients of each (message, domain) to the
    end of the domain's suspension (see the module doc). Re-runnable: it only reads the
    transaction it is given."""
    todo = list(entries)

    def op(w: WriteTxn) -> Parked:
        raw = w.get_control(HOLDS_KEY)
        holds = decode_holds(raw) if raw else Holds()
        out = Parked()
        for msg_id, domain in todo:
            rec = w.get(msg_id)
            if rec is None:
                continue
            s = holds.suspended(domain, now)
            if s is None:
                out.released.append((msg_id, domain))
                continue
            ends = deadline(rec.received_at, max_age)
            if now >= ends:
                out.expired.append((msg_id, domain))
                continue
            until = min(s.until if s.until is not None else now + PARK, ends)
            changed = False
            for r in rec.recipients:
                if r.state == PENDING and r.next_attempt < until and domain_of(r.address) == domain:
                    r.next_attempt = until
                    changed = True
            if changed:
                w.update_message(rec)
            out.parked += 1
        return out

    return op
