"""Queued messages one by one for the control socket: `list` pages, `show`, and the
filter semantics (`Selector`) that `volley ctl list`, `bounce` and `delete` share.

Called in a worker thread of the supervisor on its own QueueStore handle; records
are read in pages of short read transactions (finding 7) and decoded partially
(`MessageView`: the fields a row needs, not the session facts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple, TypeVar

import msgspec

from engine.control.replies import List, MessageDetail, MessageRow, RecipientRow
from engine.queue.ids import id_bytes, id_text
from engine.queue.records import (
    BOUNCED,
    DELIVERED,
    EXPIRED,
    PENDING,
    RECORD_VERSION,
    MessageRecord,
    pending_domains,
)
from engine.queue.store import QueueStore

RECORD_CHUNK = 1024  # records per read transaction
LIST_BUDGET = 20_000  # records one `list` call may examine ...
LIST_SECONDS = 0.2  # ... or seconds it may take, before it returns a partial page
HEADER_CAP = 64 * 1024  # bytes of the body searched for headers by `show`
STATE_NAMES = {PENDING: "pending", DELIVERED: "delivered", BOUNCED: "bounced", EXPIRED: "expired"}


# --- partial records: decode only what the views need ------------------------------------
# array_like Structs with the same tag as records.MessageRecord/Recipient; msgspec
# ignores the trailing array elements these leave out (body_type, client_ip, ...).
class RecipientView(msgspec.Struct, array_like=True, tag_field="v", tag=RECORD_VERSION):
    address: str
    orcpt: str | None = None
    notify: tuple[str, ...] | None = None
    state: int = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""


class MessageView(msgspec.Struct, array_like=True, tag_field="v", tag=RECORD_VERSION):
    id: bytes
    sender: str
    recipients: list[RecipientView]
    received_at: float
    size: int


decode_view: Callable[[bytes], MessageView] = msgspec.msgpack.Decoder(MessageView).decode
AnyRecord = MessageRecord | MessageView
_Record = TypeVar("_Record", MessageRecord, MessageView)


# --- per-message facts, shared by list, show and bulk selection --------------------------
def pending_of(rec: AnyRecord) -> dict[str, float]:
    """Domain → earliest due of its PENDING recipients: `records.pending_domains`, which
    reads only fields a partial view has too."""
    return pending_domains(rec)  # type: ignore[arg-type]


def message_state(rec: AnyRecord, pending: Mapping[str, float],
                  suspended: Mapping[str, object]) -> str:
    """"suspended": a pending domain is suspended; "deferred": a pending recipient was
    attempted; "queued": not attempted yet."""
    if any(d in suspended for d in pending):
        return "suspended"
    if any(r.state == PENDING and r.attempts for r in rec.recipients):
        return "deferred"
    return "queued"


class Facts(NamedTuple):
    """The per-message summary fields of `list` rows and `show` (replies.MessageRow)."""

    pending: int
    domains: list[str]
    state: str
    attempts: int
    next_attempt: float | None
    last_reply: str


def facts(rec: AnyRecord, suspended: Mapping[str, object]) -> Facts:
    """The summary of one message, for `list` rows and `show`."""
    pending = pending_of(rec)
    live = [r for r in rec.recipients if r.state == PENDING] or rec.recipients
    # No per-reply timestamps are kept: the recipient tried last is the one whose
    # retry lies furthest ahead, so its reply is taken as the most recent.
    replied = [r for r in live if r.last_reply] or [r for r in rec.recipients if r.last_reply]
    last = max(replied, key=lambda r: (r.next_attempt, r.attempts)).last_reply if replied else ""
    return Facts(
        pending=sum(r.state == PENDING for r in rec.recipients),
        domains=sorted(pending),
        state=message_state(rec, pending, suspended),
        attempts=max((r.attempts for r in live), default=0),
        next_attempt=min(pending.values()) if pending else None,
        last_reply=last,
    )


def domain_key(text: str) -> str:
    """A domain as compared and stored by the control code: lower case, no trailing dot."""
    return text.strip().lower().rstrip(".")


def sender_key(text: str) -> str:
    """A sender filter as compared: lower case, "<>" (or "<x>") unwrapped; "" = null."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.lower()


class Selector:
    """Which messages a filter (domain, sender, state; empty = any) selects.

    `before`: only messages received before this instant (bulk changes use it so the
    reports they queue themselves are never selected by the same run).
    """

    def __init__(self, *, domain: str = "", sender: str = "", state: str | None = None,
                 suspended: Mapping[str, object] | None = None,
                 before: float | None = None) -> None:
        self.domain = domain_key(domain)
        self.sender = sender_key(sender) if sender.strip() else None
        self.state = state
        self.suspended: Mapping[str, object] = suspended or {}
        self.before = before
        self.everything = not (self.domain or self.sender is not None or state or before)
        # Byte needles every matching raw record must contain (ASCII lower-cased, so a
        # test on raw.lower() can only pass over records that cannot match).
        needles = []
        if self.domain.isascii() and self.domain:
            needles.append(b"@" + self.domain.encode())
        if self.sender and self.sender.isascii():
            needles.append(self.sender.encode())
        self._needles = needles

    def match_raw(self, raw: bytes) -> MessageView | None:
        """The decoded record if it is selected, else None."""
        if self._needles:
            low = raw.lower()
            if not all(n in low for n in self._needles):
                return None
        return self.match(decode_view(raw))

    def match(self, view: _Record) -> _Record | None:
        if self.before is not None and view.received_at >= self.before:
            return None
        if self.sender is not None and view.sender.lower() != self.sender:
            return None
        if self.domain or self.state:
            pending = pending_of(view)
            if self.domain and self.domain not in pending:
                return None
            if self.state and message_state(view, pending, self.suspended) != self.state:
                return None
        return view


def record_pages(store: QueueStore, after: bytes = b"",
                 chunk: int = RECORD_CHUNK) -> Iterator[list[tuple[bytes, bytes]]]:
    """(id, encoded record) pages in id order after `after`, one read txn each."""
    while True:
        page = store.scan_records(after, chunk)
        if not page:
            return
        yield page
        after = page[-1][0]


# --- messages -----------------------------------------------------------------------------
def _list_row(view: AnyRecord, suspended: Mapping[str, object]) -> MessageRow:
    f = facts(view, suspended)
    return MessageRow(id=id_text(view.id), sender=view.sender, received_at=view.received_at,
                      size=view.size, recipients=len(view.recipients), pending=f.pending,
                      domains=f.domains, state=f.state, attempts=f.attempts,
                      next_attempt=f.next_attempt, last_reply=f.last_reply)


def list_messages(store: QueueStore, *, domain: str = "", sender: str = "",
                  state: str | None = None, limit: int = 50, after: str = "",
                  suspended: Mapping[str, object], budget: int = LIST_BUDGET,
                  seconds: float = LIST_SECONDS) -> List:
    """A page of queued messages in id order (oldest first) after id `after` (the
    `list` reply): "messages", "next" (the id to pass as `after` for more, "" at the
    end) and "scanned" (records examined).

    Filters as `Selector` (sender: case-insensitive, "<>" the null sender). The call
    stops after `budget` records or `seconds` even with fewer than `limit` rows, with
    "next" set so the client continues where it stopped.

    Raises:
        ValueError: `after` is not a queue id.
        StorageError: the store failed.
    """
    sel = Selector(domain=domain, sender=sender, state=state, suspended=suspended)
    cursor = id_bytes(after) if after else b""
    chunk = limit + 1 if sel.everything else RECORD_CHUNK
    deadline = time.monotonic() + seconds
    rows: list[MessageRow] = []
    scanned = 0
    for page in record_pages(store, cursor, chunk):
        for i, (mid, raw) in enumerate(page):
            scanned += 1
            cursor = mid
            view = sel.match_raw(raw)
            if view is None:
                continue
            rows.append(_list_row(view, suspended))
            if len(rows) >= limit:
                more = i < len(page) - 1 or len(page) == chunk
                return List(messages=rows, next=id_text(mid) if more else "", scanned=scanned)
        if len(page) < chunk:
            return List(messages=rows, next="", scanned=scanned)
        if scanned >= budget or time.monotonic() >= deadline:
            return List(messages=rows, next=id_text(cursor), scanned=scanned)
    return List(messages=rows, next="", scanned=scanned)


_LINE = re.compile(rb"\r?\n")
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


def parse_headers(body: bytes, cap: int = HEADER_CAP) -> list[list[str]]:
    """[[name, value], ...] of the header section (up to the first empty line) within
    the first `cap` bytes: folded lines unfolded (RFC 5322 §2.2.3: the line break
    before white space is removed), UTF-8 decoded with replacement characters. Lines
    that are neither a field nor a continuation are left out."""
    head = body[:cap]
    if head.startswith((b"\r\n", b"\n")):
        return []
    end = _END_OF_HEADERS.search(head)
    block = head[: end.start()] if end else head
    fields: list[list[bytes]] = []
    for line in _LINE.split(block):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += line
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append([name.strip(), value])
    return [[n.decode("utf-8", "replace"), v.strip().decode("utf-8", "replace")] for n, v in fields]


def show(store: QueueStore, msg_id: bytes, *,
         suspended: Mapping[str, object]) -> MessageDetail | None:
    """Everything about one message, or None when it is not queued: the envelope (id as
    text), recipients with state names, the summary fields of `list` rows and the
    body's headers ([[name, value], ...], see `parse_headers`).

    Raises:
        StorageError: the store failed.
    """
    rec = store.get(msg_id)
    if rec is None:
        return None
    body = store.get_body(msg_id) or b""
    f = facts(rec, suspended)
    recipients = [RecipientRow(
        address=r.address, orcpt=r.orcpt, notify=list(r.notify) if r.notify is not None else None,
        state=STATE_NAMES.get(r.state, str(r.state)), attempts=r.attempts,
        next_attempt=max(r.next_attempt, rec.received_at) if r.state == PENDING else None,
        last_reply=r.last_reply, delay_warned=r.delay_warned,
    ) for r in rec.recipients]
    return MessageDetail(
        id=id_text(rec.id), sender=rec.sender, received_at=rec.received_at, size=rec.size,
        recipients=recipients, pending=f.pending, domains=f.domains, state=f.state,
        attempts=f.attempts, next_attempt=f.next_attempt, last_reply=f.last_reply,
        body_type=rec.body_type, smtputf8=rec.smtputf8, ret=rec.ret, envid=rec.envid,
        client_ip=rec.client_ip, helo=rec.helo, auth_user=rec.auth_user,
        headers=parse_headers(body),
    )
