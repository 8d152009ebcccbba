"""The [[reactions]] part of the server-wide limits table (`shared_limits.py` has the
theory of operation, `reactions.py` what fires a reaction): a provider's suspension
and its halve_rate state (ramp.py), kept in the slot of the provider's name alone so
a reaction holds for every source address of the provider.

`ReactionSlots` is mixed into `LimitTable`, which provides the map and the slot locks.
"""

from __future__ import annotations

import mmap

from engine.delivery.ramp import Halving, halve
from engine.delivery.shared_limits_layout import F64, HEADER_SIZE, REACT, REACT0, SLOT_SIZE, SLOTS


class ReactionSlots:
    """The reaction fields of LimitTable's slots (LimitTable mixes it in)."""

    _mm: mmap.mmap

    def _lock(self, slot: int) -> None:
        raise NotImplementedError

    def _unlock(self, slot: int) -> None:
        raise NotImplementedError

    def suspended_until(self, slot: int) -> float:
        """CLOCK_MONOTONIC end of the provider's suspension (0 = none); no lock: one
        aligned 8-byte load, and every decision that writes takes the lock."""
        return float(F64.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE + REACT0)[0])

    def halving(self, slot: int) -> Halving:
        """The provider's halve_rate state (ramp.py), read without the lock."""
        _s, *h = REACT.unpack_from(self._mm, HEADER_SIZE + slot * SLOT_SIZE + REACT0)
        return Halving(*h)

    def suspend(self, slot: int, until: float, now: float) -> bool:
        """Suspend the provider until `until`; False (and nothing changes) when a
        suspension is in force already: two workers seeing the same reply fire once."""
        at = HEADER_SIZE + slot * SLOT_SIZE + REACT0
        self._lock(slot)
        try:
            if F64.unpack_from(self._mm, at)[0] > now:
                return False
            F64.pack_into(self._mm, at, until)
            return True
        finally:
            self._unlock(slot)

    def halve(self, slot: int, now: float, duration: float) -> Halving | None:
        """Halve the provider's rate factor (ramp.halve); None when too soon after the
        last halving."""
        off = HEADER_SIZE + slot * SLOT_SIZE + REACT0
        self._lock(slot)
        try:
            suspended, *old = REACT.unpack_from(self._mm, off)
            new = halve(Halving(*old), now, duration)
            if new is not None:
                REACT.pack_into(self._mm, off, suspended, *new)
            return new
        finally:
            self._unlock(slot)

    def set_reaction(self, slot: int, *, suspended_until: float | None = None,
                     halving: Halving | None = None) -> None:
        """Write a reaction's state as given (restored after a restart, or lifted with
        0 / ramp.NONE); a None part is left as it is."""
        off = HEADER_SIZE + slot * SLOT_SIZE + REACT0
        self._lock(slot)
        try:
            old_s, *old_h = REACT.unpack_from(self._mm, off)
            REACT.pack_into(self._mm, off,
                             old_s if suspended_until is None else suspended_until,
                             *(old_h if halving is None else halving))
        finally:
            self._unlock(slot)

    def clear_reactions(self) -> None:
        """Zero every slot's reaction fields (the supervisor at start, before it
        restores the reactions it saved: CLOCK_MONOTONIC restarts with the machine)."""
        for i in range(SLOTS):
            off = HEADER_SIZE + i * SLOT_SIZE
            if self._mm[off:off + 8] != b"\0" * 8:
                self.set_reaction(i, suspended_until=0.0, halving=Halving(0.0, 0.0, 0.0, 0.0))
