"""This node's part of a fleet's provider limits, as the shared table holds it
(shared_limits.py): several Volley nodes with `[cluster]` share each provider's
connection cap and message rate through Redis (engine/cluster/), and the supervisor
writes the node's share here, where the workers' gates already look. The delivery hot
path reads these few bytes under the slot lock it takes anyway; it never waits on
Redis.

Per slot, `NODE` holds
    mode    i32  LEASED: the supervisor holds `share` leases of the cap in Redis and
                 Redis granted `credit` messages of the rate; LOCAL (0): no word from
                 Redis (degraded, or not yet): the local share, cap ÷ fleet and
                 rate ÷ fleet, from the header's count of live nodes last seen
    share   i32  connections this node may hold (LEASED)
    credit  f64  messages of the rate granted and not yet spent (LEASED)
    rwanted f64  when (CLOCK_MONOTONIC) a worker last found no credit left: demand
    granted f64  messages granted in all (the supervisor's status figure)

The header's fleet count is 0 on a node alone: then none of this applies and the
table behaves exactly as without a fleet.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

NODE = struct.Struct("<iiddd")  # mode, share, credit, rwanted, granted
LOCAL, LEASED = 0, 1
NODE_SHARE, NODE_CREDIT, NODE_WANTED, NODE_GRANTED = 4, 8, 16, 24
NO_ROOM = -1  # a cap of "none left": `total >= cap` holds for every total
FLEET_AT = 16  # the header's live node count (after magic, slot count, column count)
_I32 = struct.Struct("<i")


def fleet_cap(mm: mmap.mmap, at: int, cap: int, fleet: int) -> int:
    """The part of `cap` (0 = no cap) this node may use: its leases (NO_ROOM when it
    holds none), or without word from Redis cap ÷ fleet, at least 1 (a cap below the
    node count is then exceeded: delivery goes on while degraded, documented)."""
    if not cap:
        return 0
    mode, share = struct.unpack_from("<ii", mm, at)
    if mode == LEASED:
        return min(cap, share) if share > 0 else NO_ROOM
    return max(1, cap // max(1, fleet))


def fleet_rate(rate: float, fleet: int) -> float:
    """The local share of a rate: rate ÷ the live nodes last seen."""
    return rate / max(1, fleet)


def needs_credit(mm: mmap.mmap, at: int) -> bool:
    """Whether messages spend Redis-granted credit (LEASED) rather than a local share."""
    return bool(_I32.unpack_from(mm, at)[0] == LEASED)


@dataclass(frozen=True, slots=True)
class NodeView:
    """One slot's node fields with the figures the supervisor decides from."""

    leased: bool
    share: int
    credit: float
    rwanted: float  # CLOCK_MONOTONIC of the last worker out of credit (0: never)
    granted: float
    total: int  # connections open from this node's workers now
    wanted: float  # until when a worker waits for a connection (the cap reached)

    @classmethod
    def read(cls, mm: mmap.mmap, at: int, total: int, wanted: float) -> NodeView:
        mode, share, credit, rwanted, granted = NODE.unpack_from(mm, at)
        return cls(mode == LEASED, share, credit, rwanted, granted, total, wanted)

    @staticmethod
    def write(mm: mmap.mmap, at: int, share: int | None, credit: float) -> None:
        """Under the slot's lock (the caller's): set the share (None: LOCAL, the
        credit dropped) and add `credit`."""
        _mode, _share, left, rwanted, granted = NODE.unpack_from(mm, at)
        if share is None:
            NODE.pack_into(mm, at, LOCAL, 0, 0.0, rwanted, granted)
        else:
            NODE.pack_into(mm, at, LEASED, share, left + credit, rwanted, granted + credit)


class FleetSlots:
    """The fleet's part of LimitTable (shared_limits.py), which mixes it in and
    provides the map, the slot locks and where a slot's node part lies."""

    _mm: mmap.mmap

    def _lock(self, slot: int) -> None:
        raise NotImplementedError

    def _unlock(self, slot: int) -> None:
        raise NotImplementedError

    def _node_at(self, slot: int) -> int:
        """The offset of `slot`'s node part in the map."""
        raise NotImplementedError

    def _usage(self, slot: int) -> tuple[int, float]:
        """(connections open, wanted until) of `slot`."""
        raise NotImplementedError

    def fleet(self) -> int:
        """The live nodes this node last counted (0: not in a fleet); no lock: one
        aligned 4-byte load."""
        return int(_I32.unpack_from(self._mm, FLEET_AT)[0])

    def set_fleet(self, live: int) -> None:
        """Say how many nodes share the limits (0: this node is alone)."""
        _I32.pack_into(self._mm, FLEET_AT, max(0, live))

    def node_cap(self, slot: int, cap: int) -> int:
        """`cap` as this node may use it: the whole of it alone, its share in a fleet."""
        fleet = self.fleet()
        return fleet_cap(self._mm, self._node_at(slot), cap, fleet) if fleet else cap

    def node_view(self, slot: int) -> NodeView:
        return NodeView.read(self._mm, self._node_at(slot), *self._usage(slot))

    def set_share(self, slot: int, share: int | None, credit: float = 0.0) -> None:
        """This node's share of the slot's cap (the leases it may use) and `credit`
        messages more of its rate; share None: back to the local share (cap ÷ fleet),
        the credit dropped (Redis no longer vouches for it)."""
        self._lock(slot)
        try:
            NodeView.write(self._mm, self._node_at(slot), share, credit)
        finally:
            self._unlock(slot)
