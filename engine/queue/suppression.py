"""The suppression list: addresses and domains no mail is sent to.

One named DB, `supp`. Key: tenant utf-8 | 0x00 | kind byte (b"a" address, b"d" domain)
| 0x00 | lower-cased value; value: msgpack [reason, source, created], the rest of the
`Suppression` being its key (half the pages of storing it whole). A lookup is at most four
point gets in one read transaction ((tenant, address), (tenant, domain), ("", address),
("", domain)): B-tree descents, never a scan, so the cost does not grow with the list
beyond log n.

Case: the whole address is lower-cased, the local part included. RFC 5321 §2.4 lets a
receiver treat local parts case-sensitively, but no large mailbox provider does, and a
list that missed "Bob@x" after "bob@x" unsubscribed would mail someone who asked not to
be mailed. A domain entry matches exactly that domain (not its subdomains).

Tenant "" holds entries for every tenant; a tenant's own entries never reach another.

The read side is a mixin of `QueueStore` (`SuppressionViews`); writes are functions of a
`WriteTxn`, run inside a group-commit op like every other write.

In a cluster, `add` and `remove` also write each change into the outbox
(engine/queue/supp_outbox.py) in the same transaction, and `apply_remote` writes the
fleet's changes (from Redis) without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from engine.queue import supp_outbox
from engine.queue.records import domain_of
from engine.queue.supp_outbox import Change, OutboxViews
from engine.queue.writetxn import WriteTxn

if TYPE_CHECKING:
    import lmdb

_T = TypeVar("_T")
KINDS = ("address", "domain")
REASONS = ("bounce", "complaint", "unsubscribe", "manual", "import")
_KIND_BYTE = {"address": b"a", "domain": b"d"}
# LMDB's default maximum key size (mdb_env_get_maxkeysize).
MAX_KEY = 511
MAX_TENANT = 128


class Suppression(msgspec.Struct, frozen=True):
    """One entry of the list."""

    value: str  # lower-cased address "a@b.example" or domain "b.example"
    kind: str  # "address" | "domain"
    reason: str  # "bounce" | "complaint" | "unsubscribe" | "manual" | "import"
    source: str = ""  # what caused it: the reply ("550 5.1.1 ..."), "ctl", a file name
    created: float = 0.0
    tenant: str = ""  # "" = every tenant


class _Stored(msgspec.Struct, array_like=True):
    """What the value holds: the rest of an entry is its key. A msgpack array, so a
    1,000,000-entry list stays near 100 MB of pages; append fields with defaults."""

    reason: str
    source: str = ""
    created: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Stored)
_KIND_NAME = {b"a": "address", b"d": "domain"}


def _encode(e: Suppression) -> bytes:
    return _encoder.encode(_Stored(e.reason, e.source, e.created))


def _decode(key: bytes, data: bytes) -> Suppression:
    # Neither a tenant nor a value can hold NUL (check_tenant, normalize refuse control
    # characters), so the key splits back into its three fields.
    tenant, kind, value = key.split(b"\0", 2)
    st = _decoder.decode(data)
    return Suppression(value.decode("utf-8", "surrogatepass"), _KIND_NAME[kind], st.reason,
                       st.source, st.created, tenant.decode("utf-8", "surrogatepass"))


def _bad_text(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def check_tenant(tenant: str) -> str:
    """`tenant` if it is usable in a key, else ValueError("tenant: problem")."""
    if len(tenant.encode("utf-8", "surrogatepass")) > MAX_TENANT:
        raise ValueError(f"tenant: longer than {MAX_TENANT} bytes")
    if _bad_text(tenant) or any(c.isspace() for c in tenant):
        raise ValueError(f"tenant: {tenant!r} holds a space or control character")
    return tenant


def normalize(value: str) -> tuple[str, str]:
    """(kind, lower-cased value) of an address ("has an @") or a domain.

    Raises:
        ValueError: empty, a control character, an empty local part or domain, a
            domain with spaces or an "@", or too long for a key; the message says which.
    """
    v = value.strip().lower()
    if not v:
        raise ValueError("empty value")
    if _bad_text(v):
        raise ValueError(f"{value!r}: holds a control character")
    at = v.rfind("@")
    domain = v[at + 1:]
    kind = "address" if at >= 0 else "domain"
    if at == 0:
        raise ValueError(f"{value!r}: empty local part")
    if not domain:
        raise ValueError(f"{value!r}: empty domain")
    if "@" in domain or any(c.isspace() for c in domain) or domain.startswith("."):
        raise ValueError(f"{value!r}: not a domain after the @")
    local = v[:at]
    if at > 0 and any(c.isspace() for c in local) and not (
            len(local) > 1 and local[0] == local[-1] == '"'):
        # RFC 5321 §4.1.2: a space is only possible inside a quoted local part.
        raise ValueError(f"{value!r}: a space in the local part (unquoted)")
    if len(v.encode("utf-8", "surrogatepass")) > MAX_KEY - MAX_TENANT - 4:
        raise ValueError(f"{value!r}: longer than {MAX_KEY - MAX_TENANT - 4} bytes")
    return kind, v


def entry_key(tenant: str, kind: str, value: str) -> bytes:
    """The `supp` key of an entry (value already normalized)."""
    return b"".join((tenant.encode("utf-8", "surrogatepass"), b"\0", _KIND_BYTE[kind], b"\0",
                     value.encode("utf-8", "surrogatepass")))


def make(value: str, reason: str, *, source: str = "", created: float = 0.0,
         tenant: str = "") -> Suppression:
    """A checked, normalized entry. Raises ValueError naming what is wrong."""
    if reason not in REASONS:
        raise ValueError(f"reason: expected one of {', '.join(REASONS)}, got {reason!r}")
    kind, v = normalize(value)
    return Suppression(v, kind, reason, source, created, check_tenant(tenant))


def _candidate_keys(address: str, tenant: str) -> list[bytes]:
    """The keys a lookup of `address` reads, most specific first."""
    a = address.strip().lower()
    d = domain_of(a)
    out = []
    for t in ((tenant, "") if tenant else ("",)):
        out.append(entry_key(t, "address", a))
        if d:
            out.append(entry_key(t, "domain", d))
    return out


def _lookup(txn: lmdb.Transaction[bytes], db: lmdb._Database, address: str,
            tenant: str) -> Suppression | None:
    for k in _candidate_keys(address, tenant):
        data = txn.get(k, db=db)
        if data is not None:
            return _decode(k, data)
    return None


# ---- writes (inside a group-commit op) ----------------------------------------------


def add(w: WriteTxn, entries: Iterable[Suppression], *, headroom: bool = True) -> int:
    """Add entries (normalized here); returns how many were new. An entry already on
    the list keeps its first reason, source and time: the earliest cause is the one an
    operator asks about.

    `headroom`: the entries may use the space kept free of new mail (`queue.high_water`),
    as an automatic suppression riding on a delivery outcome must (P4). An operator's
    import passes False, so a full queue refuses it (QueueFull) instead.

    Raises:
        ValueError: an entry is not a valid address or domain, or has a bad kind,
            reason or tenant (nothing of this op is written: it is rolled back whole).
        QueueFull: not `headroom` and the queue is past its high-water mark.
    """
    added = _put(w, entries)
    # The fleet hears of what is new here; an entry already present was published by
    # whoever added it (or seeded when the node joined).
    supp_outbox.record(w, (Change("add", e.tenant, e.kind, e.value, e.reason, e.source, e.created)
                           for e in added))
    new = len(added)
    if new:
        # Measured ~110 bytes of pages per entry (1,000,000 in random order); the
        # high-water estimate is pessimistic (256 bytes), as for messages: the exact
        # count is taken when the estimate nears the mark.
        w._store._account_put(w.txn, 0, new // 16 + 1, headroom=headroom)
    return new


def _put(w: WriteTxn, entries: Iterable[Suppression]) -> list[Suppression]:
    """Check and write entries not yet on the list; returns the new ones, normalized."""
    txn, db = w.txn, w._store._supp
    added: list[Suppression] = []
    for e in entries:
        kind, v = normalize(e.value)
        if e.kind != kind:
            raise ValueError(f"{e.value!r}: kind {e.kind!r}, but it is an {kind}")
        if e.reason not in REASONS:
            raise ValueError(f"reason: expected one of {', '.join(REASONS)}, got {e.reason!r}")
        check_tenant(e.tenant)
        if txn.put(entry_key(e.tenant, kind, v), _encode(e), db=db, overwrite=False):
            added.append(e if e.value == v else msgspec.structs.replace(e, value=v))
    return added


def remove(w: WriteTxn, value: str, tenant: str = "") -> bool:
    """Remove one entry of `tenant` (exactly that tenant); False if it was not there.

    Raises:
        ValueError: `value` is not a valid address or domain, or a bad tenant.
    """
    kind, v = normalize(value)
    gone = bool(w.txn.delete(entry_key(check_tenant(tenant), kind, v), db=w._store._supp))
    if gone:
        supp_outbox.record(w, [Change("remove", tenant, kind, v)])
    return gone


def apply_remote(w: WriteTxn, changes: Iterable[Change], *, mark: bytes = b"",
                 position: bytes = b"") -> tuple[int, int]:
    """Write the fleet's changes (read from Redis) into this node's list, without the
    outbox (they came from it: no echo), and save `position` under the control-state
    name `mark` in the same transaction, so a restart resumes after the last change
    applied. A change that does not check (a newer engine's?) is skipped, not fatal:
    one bad entry must not stop the mirror. Returns (added, removed)."""
    added = removed = 0
    for c in changes:
        try:
            if c.op == "add":
                added += len(_put(w, [Suppression(c.value, c.kind, c.reason, c.source,
                                                  c.created, c.tenant)]))
            elif c.op == "remove":
                kind, v = normalize(c.value)
                removed += bool(w.txn.delete(entry_key(check_tenant(c.tenant), kind, v),
                                             db=w._store._supp))
        except ValueError:
            continue
    if added:
        w._store._account_put(w.txn, 0, added // 16 + 1, headroom=True)
    if mark:
        w.txn.put(mark, position, db=w._store._ctl)
    return added, removed


def seed_outbox(w: WriteTxn, after: bytes, limit: int) -> bytes:
    """Copy up to `limit` entries after key `after` into the outbox as adds (a node
    joining a cluster publishes the list it already had); returns the last key copied,
    b"" when the list is done."""
    last = b""
    changes: list[Change] = []
    with w.txn.cursor(db=w._store._supp) as cur:
        if not (cur.set_range(after) if after else cur.first()):
            return b""
        for k, data in cur:
            if k == after:
                continue
            if len(changes) >= limit:
                break
            e = _decode(k, data)
            changes.append(Change("add", e.tenant, e.kind, e.value, e.reason, e.source, e.created))
            last = bytes(k)
    supp_outbox.record(w, changes)
    return last


def lookup_in(w: WriteTxn, address: str, tenant: str = "") -> Suppression | None:
    """`QueueStore.suppressed` as seen inside a write transaction (this batch's
    writes included)."""
    return _lookup(w.txn, w._store._supp, address, tenant)


# ---- reads (mixin of QueueStore) ------------------------------------------------------


class SuppressionViews(OutboxViews):
    """The read side of the list (and of its outbox): methods of `QueueStore`."""

    _supp: lmdb._Database  # provided by QueueStore (store.py)

    def _read(self, fn: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        raise NotImplementedError

    def suppressed(self, address: str, tenant: str = "") -> Suppression | None:
        """The entry that suppresses `address` for `tenant`, or None: checks (tenant,
        address), (tenant, domain), ("", address), ("", domain). Raises StorageError."""
        return self._read(lambda t: _lookup(t, self._supp, address, tenant))

    def suppressed_many(self, addresses: Iterable[str],
                        tenant: str = "") -> dict[str, Suppression]:
        """{address as given: entry} for the suppressed ones among `addresses`, in ONE
        read transaction (a whole injection request). Raises StorageError."""

        def read(t: lmdb.Transaction[bytes]) -> dict[str, Suppression]:
            out: dict[str, Suppression] = {}
            for a in addresses:
                hit = _lookup(t, self._supp, a, tenant)
                if hit is not None:
                    out[a] = hit
            return out

        return self._read(read)

    def suppression_list(self, after: str = "", limit: int = 1000,
                         tenant: str | None = None, *,
                         after_tenant: str = "") -> list[Suppression]:
        """Up to `limit` entries in key order: by tenant, then addresses before domains,
        then value. `tenant` None lists every tenant's entries (and the shared ones,
        tenant ""); a string lists exactly that tenant's.

        Paging: `after` is the last value shown (entries after it follow), and with
        `tenant` None, `after_tenant` is that entry's tenant. Raises StorageError."""
        if after:
            kind, v = normalize(after)
            start = entry_key(after_tenant if tenant is None else tenant, kind, v)
        else:
            start = b"" if tenant is None else tenant.encode("utf-8", "surrogatepass") + b"\0"
        prefix = b"" if tenant is None else tenant.encode("utf-8", "surrogatepass") + b"\0"

        def scan(t: lmdb.Transaction[bytes]) -> list[Suppression]:
            out: list[Suppression] = []
            with t.cursor(db=self._supp) as cur:
                if not cur.set_range(start):
                    return out
                for k, data in cur:
                    if len(out) >= limit or not k.startswith(prefix):
                        break
                    if k != start or not after:
                        out.append(_decode(k, data))
            return out

        return self._read(scan)

    def suppression_count(self) -> int:
        """Entries on the list, every tenant counted. Raises StorageError."""
        return int(self._read(lambda t: t.stat(self._supp)["entries"]))
