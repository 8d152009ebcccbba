"""The rate factor of a halve_rate reaction over time. Pure: no I/O, no clock.

A halving at `now` with duration D multiplies the provider's rate (or, without a rate,
its connection cap) by `factor` for D seconds (`hold_until`), then the factor climbs
back to 1 in a straight line over the next D seconds (`ramp_end`): a provider that
asked us to slow down gets the slow rate for as long as the operator said, then a
rate that grows by the same amount every second, rather than the full rate at once
(the step that may have caused the complaint). A matching reply while the factor is
below 1 halves the factor in force at that moment again, no lower than `FLOOR`, but
only `step_interval(D)` after the last halving: a burst of refusals seen on every open
connection at once is one signal, not five halvings.
"""

from __future__ import annotations

from typing import NamedTuple

FLOOR = 1 / 16  # four halvings at most: a rate never falls below a 16th of its setting
MAX_STEP_INTERVAL = 60.0  # seconds between halvings, at most


class Halving(NamedTuple):
    factor: float  # 0.0 = no halving in force
    hold_until: float
    ramp_end: float
    stepped_at: float


NONE = Halving(0.0, 0.0, 0.0, 0.0)


def factor_at(h: Halving, now: float) -> float:
    """The multiplier in force at `now`: `factor` until `hold_until`, then a straight
    line up to 1 at `ramp_end`, and 1 from then on (or with no halving)."""
    if h.factor <= 0.0 or now >= h.ramp_end:
        return 1.0
    if now < h.hold_until:
        return h.factor
    span = h.ramp_end - h.hold_until
    return h.factor + (1.0 - h.factor) * (now - h.hold_until) / span if span > 0 else 1.0


def step_interval(duration: float) -> float:
    """The least time between two halvings: a quarter of the duration, at most a minute."""
    return min(MAX_STEP_INTERVAL, duration / 4)


def halve(h: Halving, now: float, duration: float) -> Halving | None:
    """The halving after a matching reply at `now`; None when it is too soon after the
    last one (the reaction is in force and is not fired again)."""
    current = factor_at(h, now)
    if current < 1.0 and now - h.stepped_at < step_interval(duration):
        return None
    hold = now + duration
    return Halving(max(FLOOR, current / 2), hold, hold + duration, now)


def in_force(h: Halving, now: float) -> bool:
    return h.factor > 0.0 and now < h.ramp_end
