"""Campaign counters: what happened to the mail of each (tenant, campaign).

One named DB, `camp`. Key: tenant utf-8 | 0x00 | campaign utf-8; value: the msgpack
`CampaignCounts`. Counters change only inside a group-commit op (`bump`, a
read-modify-write in the op's own write transaction), so an injection and its outcomes
count in the same commit as the messages they describe, every worker's included, and a
later op of the same batch sees an earlier one's counts.

The read side is a mixin of `QueueStore` (`CampaignViews`). Listing reads every entry
and sorts by last activity: an operator command and a metrics scrape, not a hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import msgspec

from engine.queue.writetxn import WriteTxn

if TYPE_CHECKING:
    import lmdb

_T = TypeVar("_T")
MAX_NAME = 200  # bytes of a tenant or a campaign; two of them stay under LMDB's 511-byte key
OUTCOMES = ("injected", "delivered", "deferred", "bounced", "suppressed", "complained")


class CampaignCounts(msgspec.Struct):
    """The counters of one campaign. `bounced` is the sum of `bounced_by_class`
    (classes from engine/mail/bounce_class.py)."""

    tenant: str
    campaign: str
    injected: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    bounced_by_class: dict[str, int] = {}
    suppressed: int = 0
    complained: int = 0
    first_at: float = 0.0
    last_at: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CampaignCounts)


def campaign_key(tenant: str, campaign: str) -> bytes:
    """The `camp` key of (tenant, campaign).

    Raises:
        ValueError: a name holds NUL (the separator) or is longer than MAX_NAME bytes.
    """
    parts = []
    for field, name in (("tenant", tenant), ("campaign", campaign)):
        raw = name.encode("utf-8", "surrogatepass")
        if b"\0" in raw or len(raw) > MAX_NAME:
            raise ValueError(f"{field}: {name[:40]!r} holds NUL or is longer than {MAX_NAME} bytes")
        parts.append(raw)
    return parts[0] + b"\0" + parts[1]


def bump(w: WriteTxn, tenant: str, campaign: str, *, now: float, injected: int = 0,
         delivered: int = 0, deferred: int = 0, bounced: Mapping[str, int] | None = None,
         suppressed: int = 0, complained: int = 0) -> None:
    """Add to the counters of (tenant, campaign), creating them at `now`; a no-op for
    mail of no campaign and no tenant. `bounced` maps bounce class -> count.

    Raises:
        ValueError: a bad name (see `campaign_key`).
    """
    if not campaign and not tenant:
        return
    key = campaign_key(tenant, campaign)
    txn, db = w.txn, w._store._camp
    old = txn.get(key, db=db)
    c = CampaignCounts(tenant, campaign, first_at=now) if old is None else _decoder.decode(old)
    c.injected += injected
    c.delivered += delivered
    c.deferred += deferred
    if bounced:
        by_class = dict(c.bounced_by_class)
        for cls, n in bounced.items():
            by_class[cls] = by_class.get(cls, 0) + n
            c.bounced += n
        c.bounced_by_class = by_class
    c.suppressed += suppressed
    c.complained += complained
    c.last_at = max(c.last_at, now)
    txn.put(key, _encoder.encode(c), db=db)
    if old is None:
        # A new campaign is one small key: count it as new mail would be (pessimistic),
        # but within the headroom, since it rides on an op that must commit.
        w._store._account_put(txn, 0, 0, headroom=True)


def summarize(counts: list[CampaignCounts], top: int) -> list[CampaignCounts]:
    """The `top` most recently active campaigns, then one entry campaign="other"
    (tenant "") summing the rest, when there is a rest: bounded metric cardinality."""
    ranked = sorted(counts, key=lambda c: c.last_at, reverse=True)
    head, rest = ranked[:top], ranked[top:]
    if not rest:
        return head
    other = CampaignCounts("", "other")
    by_class: dict[str, int] = {}
    for c in rest:
        for name in OUTCOMES:
            setattr(other, name, getattr(other, name) + getattr(c, name))
        for cls, n in c.bounced_by_class.items():
            by_class[cls] = by_class.get(cls, 0) + n
        other.last_at = max(other.last_at, c.last_at)
    other.bounced_by_class = by_class
    return [*head, other]


class CampaignViews:
    """The read side of the counters: methods of `QueueStore`."""

    _camp: lmdb._Database  # provided by QueueStore (store.py)

    def _read(self, fn: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        raise NotImplementedError

    def campaign(self, tenant: str, campaign: str) -> CampaignCounts | None:
        """The counters of (tenant, campaign), or None. Raises StorageError, or
        ValueError for a bad name."""
        key = campaign_key(tenant, campaign)
        data = self._read(lambda t: t.get(key, db=self._camp))
        return None if data is None else _decoder.decode(data)

    def campaigns(self, limit: int = 100, tenant: str | None = None) -> list[CampaignCounts]:
        """Up to `limit` campaigns (of `tenant`, or of all with None), the most recently
        active first. Raises StorageError."""
        prefix = b"" if tenant is None else tenant.encode("utf-8", "surrogatepass") + b"\0"

        def scan(t: lmdb.Transaction[bytes]) -> list[bytes]:
            with t.cursor(db=self._camp) as cur:
                if not cur.set_range(prefix):
                    return []
                out = []
                for k, data in cur:
                    if not k.startswith(prefix):
                        break
                    out.append(data)
                return out

        found = [_decoder.decode(d) for d in self._read(scan)]
        found.sort(key=lambda c: c.last_at, reverse=True)
        return found[:limit]
