"""`X-Volley-Handover:`: what SMTP cannot carry when one Volley hands its queue to another.

`volley ctl drain --to HOST:PORT` (engine/control/drain_to.py) sends each queued message
to a peer Volley as an ordinary transaction: MAIL FROM with the original sender, SIZE,
BODY, SMTPUTF8, RET and ENVID (RFC 3461 §4.3, §4.4), one RCPT per PENDING recipient with
its NOTIFY and ORCPT (RFC 3461 §4.1, §4.2), and the stored body. The rest of the queue
record rides in one header field placed first in the message:

    X-Volley-Handover: <base64 of a msgpack map, folded at 76 columns>

The map (`Handover`, below) holds the origin node and id, the original arrival time
(so `delivery.max_age` still counts from it), the session facts of the first hop
(client address, HELO, AUTH user), the campaign, tenant, priority, DKIM signing flag and
egress pool, per PENDING recipient its attempt history (attempts, next attempt, last
reply, delay report sent) matched to the RCPTs by address, and the recipients whose
failures wait for the message's one report (`HeldFailure`, engine/delivery/onereport.py)
with those failures.

Only a client we vouch for (relay.networks or authenticated, the same trust as the
campaign tags) is believed: its field is applied to the new record and removed. Anyone
else's field is removed and ignored (logged), so it never reaches the queue nor leaves
this host. A trusted field that does not decode is removed and ignored too (logged):
the message itself is still good mail.
"""

from __future__ import annotations

import base64
import binascii
from typing import NamedTuple

import msgspec

from engine.mail.headers import header_end, split_message, unfold
from engine.observe import log
from engine.queue.records import PENDING, HeldFailure, MessageRecord, Recipient

FIELD = "x-volley-handover"
FIELD_NAME = b"X-Volley-Handover"
FORMAT = 1
_MARK = b"x-volley-handover:"
_FOLD = 76  # base64 characters per header line (RFC 5322 §2.1.1: lines under 78)


class History(msgspec.Struct, array_like=True, frozen=True):
    """One PENDING recipient's delivery history on the origin."""

    address: str
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    delay_warned: bool = False


class Held(msgspec.Struct, array_like=True, frozen=True):
    """A recipient already failed whose failure waits for the message's one report."""

    recipient: Recipient
    failure: HeldFailure


class Handover(msgspec.Struct, kw_only=True, frozen=True):
    v: int = FORMAT
    origin: str = ""  # the handing node's server.hostname
    origin_id: str = ""  # the message's id there (for the logs)
    received_at: float
    client_ip: str = ""
    helo: str = ""
    auth_user: str | None = None
    campaign: str = ""
    tenant: str = ""
    priority: int = 5
    sign: bool = False
    egress_pool: str = ""
    history: list[History] = []
    held: list[Held] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Handover)


def from_record(rec: MessageRecord, origin: str, origin_id: str) -> Handover:
    """The field's value for `rec`: history of its PENDING recipients in record order,
    and its held failures with the recipients they name."""
    held = [Held(rec.recipients[f.index], msgspec.structs.replace(f, index=0))
            for f in rec.held_failures if 0 <= f.index < len(rec.recipients)]
    return Handover(
        origin=origin, origin_id=origin_id, received_at=rec.received_at,
        client_ip=rec.client_ip, helo=rec.helo, auth_user=rec.auth_user,
        campaign=rec.campaign, tenant=rec.tenant, priority=rec.priority, sign=rec.sign,
        egress_pool=rec.egress_pool,
        history=[History(r.address, r.attempts, r.next_attempt, r.last_reply, r.delay_warned)
                 for r in rec.recipients if r.state == PENDING],
        held=held)


def render(h: Handover) -> bytes:
    """The whole header field with its CRLF, folded so no line passes 78 octets."""
    text = base64.b64encode(_encoder.encode(h))
    lines = [text[i:i + _FOLD] for i in range(0, len(text), _FOLD)] or [b""]
    return FIELD_NAME + b":\r\n " + b"\r\n ".join(lines) + b"\r\n"


def decode(value: bytes) -> Handover:
    """The field's value (folding and spaces allowed).

    Raises:
        ValueError: not base64 of a handover map of a known format.
    """
    try:
        raw = base64.b64decode(b"".join(unfold(value).split()), validate=True)
        h = _decoder.decode(raw)
    except (binascii.Error, msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ValueError(f"not a handover field: {err}") from None
    if h.v != FORMAT:
        raise ValueError(f"handover format {h.v}; this Volley reads {FORMAT}")
    if not 0 <= h.priority <= 9:
        raise ValueError(f"priority {h.priority} out of 0-9")
    return h


class Taken(NamedTuple):
    handover: Handover | None  # None: no field, or not believed
    content: bytes  # the message without the field


def take(content: bytes, client_ip: str, *, trusted: bool) -> Taken:
    """The handover field of a message and the message without it. Of several fields
    the last counts (all are removed)."""
    end, _ = header_end(content)
    if _MARK not in content[:end].lower():  # the common case: one search, no split
        return Taken(None, content)
    fields, _ = split_message(content)
    kept = [f.raw for f in fields if f.name != FIELD]
    if len(kept) == len(fields):  # the mark was inside another field's text
        return Taken(None, content)
    value = [f.value for f in fields if f.name == FIELD][-1]
    rest = content[end:] if kept else content[end + 2:]  # see campaign_tags.take_fields
    stripped = b"\r\n".join(kept) + rest
    if not trusted:
        log.warning("handover_field_ignored", client=client_ip, reason="client not trusted")
        return Taken(None, stripped)
    try:
        return Taken(decode(value), stripped)
    except ValueError as err:
        log.warning("handover_field_ignored", client=client_ip, reason=str(err))
        return Taken(None, stripped)


def apply(rec: MessageRecord, h: Handover) -> None:
    """Give the record made from the peer's transaction what the origin knew: arrival,
    first-hop facts, tags, each recipient's history (matched by address, in order), and
    the held failures (their recipients appended after the RCPT ones, as already final)."""
    rec.received_at = h.received_at
    rec.client_ip, rec.helo, rec.auth_user = h.client_ip, h.helo, h.auth_user
    rec.campaign, rec.tenant, rec.priority = h.campaign, h.tenant, h.priority
    rec.sign, rec.egress_pool = h.sign, h.egress_pool
    by_address: dict[str, list[History]] = {}
    for entry in reversed(h.history):
        by_address.setdefault(entry.address, []).append(entry)
    for r in rec.recipients:
        found = by_address.get(r.address)
        if found:
            entry = found.pop()
            r.attempts, r.next_attempt = entry.attempts, entry.next_attempt
            r.last_reply, r.delay_warned = entry.last_reply, entry.delay_warned
    for held in h.held:
        if held.recipient.state == PENDING:  # a held failure is a final one: never resend
            continue
        rec.held_failures.append(msgspec.structs.replace(held.failure, index=len(rec.recipients)))
        rec.recipients.append(held.recipient)
