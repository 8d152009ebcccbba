"""Queue records: the envelope of one message, as stored in LMDB.

Records are msgspec Structs encoded as msgpack arrays (`array_like=True`): compact,
length-prefixed binary, never newline-delimited text, so no address or parameter can
ever be parsed as record structure (P9). Addresses are stored exactly as received.

Versioning: each record carries a schema version `v` as the FIRST array element. It is
implemented as a msgspec tag (`tag_field="v"`, `tag=1`) rather than an ordinary field
with a default, because an ordinary defaulted field cannot precede the required ones
without making every field keyword-only, which would break the positional
constructors `Recipient(address)` and `MessageRecord(id, sender, ...)`. The version is
readable as the class attribute `rec.v`. To evolve a record: append fields with
defaults (old arrays decode, missing trailing fields take their defaults), or, for an
incompatible change, add `MessageRecordV2(tag=2)` and decode `MessageRecord |
MessageRecordV2`.

Mutability: `Recipient` and `MessageRecord` are mutable (not frozen) because delivery
updates recipient state in place before `WriteTxn.update_message(record)`; a record
read from the store is a private copy, so mutating it never changes the store until
it is written back. Use `msgspec.structs.replace` when a copy is wanted.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

PENDING = 0
DELIVERED = 1
BOUNCED = 2
EXPIRED = 3

RECORD_VERSION = 1


class Recipient(msgspec.Struct, array_like=True, tag_field="v", tag=RECORD_VERSION):
    """One envelope recipient and its delivery state."""

    v: ClassVar[int] = RECORD_VERSION
    address: str
    orcpt: str | None = None  # RFC 3461 ORCPT, stored as given ("rfc822;a@b")
    notify: tuple[str, ...] | None = None  # RFC 3461 NOTIFY keywords
    state: int = PENDING
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds; 0 = as soon as received
    last_reply: str = ""
    # RFC 3461 NOTIFY=DELAY: the one delay report has been queued (appended last, so
    # records written before it decode with the default).
    delay_warned: bool = False


class HeldFailure(msgspec.Struct, array_like=True):
    """A recipient's final failure kept for the message's one failure report (see
    engine/delivery/onereport.py): the reply it bounced with and the host that gave it."""

    index: int  # into MessageRecord.recipients
    code: int
    enhanced: str
    text: tuple[str, ...]
    remote_mta: str = ""


class MessageRecord(msgspec.Struct, array_like=True, tag_field="v", tag=RECORD_VERSION):
    """Envelope and session facts of one queued message (the body is stored apart)."""

    v: ClassVar[int] = RECORD_VERSION
    id: bytes
    sender: str  # "" is the null sender <>
    recipients: list[Recipient]
    received_at: float  # epoch seconds
    size: int
    body_type: str | None = None  # 7BIT / 8BITMIME / BINARYMIME
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 ENVID
    client_ip: str = ""
    helo: str = ""
    auth_user: str | None = None
    # Failures waiting to go out together in one report (appended last: older records
    # decode with the default).
    held_failures: list[HeldFailure] = []
    # Newsletter accounting (appended last, as above): the campaign and tenant the
    # message counts toward ("" = none), and its priority 0-9 (9 first).
    campaign: str = ""
    tenant: str = ""
    priority: int = 5
    # DKIM-sign at delivery (engine/mail/dkim.py): the message came from an
    # authenticated or relay-network client, or over the HTTP API.
    sign: bool = False
    # The [[egress]] pool the message leaves from, as the HTTP API was asked ("" = the
    # [[egress_rules]] / [[routes]] choice; engine/delivery/egress.py). Appended last.
    egress_pool: str = ""
    # Does a line of the stored body start with "."? The receiver knows while
    # unstuffing DATA (a ".." was seen), so sending by DATA needs no stuffing scan when
    # it is False (RFC 5321 §4.5.2). None: unknown (records written before this field,
    # bodies made here: DSNs, HTTP), the client scans. Appended last.
    dot_lines: bool | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(MessageRecord)


def encode_record(rec: MessageRecord) -> bytes:
    """Encode a record as a msgpack array (version first).

    Raises:
        TypeError: a field holds a value msgspec cannot encode.
    """
    return _encoder.encode(rec)


def decode_record(data: bytes) -> MessageRecord:
    """Decode bytes written by `encode_record`.

    Raises:
        msgspec.ValidationError: the bytes are msgpack but not a v1 MessageRecord.
        msgspec.DecodeError: the bytes are not msgpack at all.
    """
    return _decoder.decode(data)


def domain_of(address: str) -> str:
    """Lower-cased domain after the LAST "@"; "" for the null sender or no "@".

    The last "@" is the right one: a quoted local part may itself contain "@"
    ("a@b"@example.com), and nothing else in the address is interpreted (P7, P9).
    """
    at = address.rfind("@")
    if at < 0:
        return ""
    return address[at + 1 :].lower()


def pending_domains(rec: MessageRecord) -> dict[str, float]:
    """Domain → earliest due time (epoch seconds) over its PENDING recipients.

    A recipient is due at `max(received_at, next_attempt)`, so a freshly received
    message (next_attempt 0.0) is due at once. Used by the store's due index.
    """
    due: dict[str, float] = {}
    received = rec.received_at
    for r in rec.recipients:
        if r.state != PENDING:
            continue
        d = domain_of(r.address)
        t = r.next_attempt if r.next_attempt > received else received
        old = due.get(d)
        if old is None or t < old:
            due[d] = t
    return due
