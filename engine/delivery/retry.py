"""Retry and expiry maths for deferred recipients (pure: `now` is always an argument).

Config keys served here (decoded by `engine.config`, values passed in):

- ``delivery.retry`` — the schedule, default "1m, 5m, 15m, 30m, 1h, 2h, 4h", read by
  `engine.config.parse_schedule` into seconds (``cfg.delivery.retry.seconds``): the
  wait after the 1st, 2nd, ... failed attempt; the last interval repeats for ever
  (every 4h by default).
- ``delivery.max_age`` — default ``DEFAULT_MAX_AGE`` (5 days): a message older than
  this no longer retries; its deferred recipients bounce with 5.4.7 (RFC 3463
  "delivery time expired"; see `engine.delivery.outcome`).

Expiry boundary: a message is expired when ``now - received_at >= max_age`` (the
boundary instant itself counts as expired). `engine.delivery.outcome.apply` clamps a
retry that would land after the deadline to the deadline, so at that instant the
scheduler's `expire_pending` bounces it at once instead of up to one interval late.
"""

from __future__ import annotations

import random

DEFAULT_MAX_AGE = 5 * 86400.0

# ±10 %: enough to spread a large batch deferred in the same second over minutes
# (10 000 recipients deferred by one 421 do not all come back in the same second),
# small enough that the schedule the operator wrote still describes what happens.
JITTER = 0.10


def interval(attempts: int, schedule: tuple[float, ...]) -> float:
    """The un-jittered wait after `attempts` attempts (1 → schedule[0]; last repeats).

    Raises:
        ValueError: attempts < 1 or an empty schedule.
    """
    if attempts < 1:
        raise ValueError(f"attempts counts the attempt that just failed, so it is >= 1; got {attempts}")
    if not schedule:
        raise ValueError("retry schedule is empty")
    return schedule[min(attempts, len(schedule)) - 1]


def next_attempt(
    attempts: int,
    now: float,
    schedule: tuple[float, ...],
    rng: random.Random | None = None,
) -> float:
    """Epoch seconds of the next attempt after `attempts` attempts (incl. the one that just failed).

    Without `rng` the result is exactly ``now + interval``; with it, the interval is
    scaled by a uniform factor in [0.9, 1.1] so the retries of a big batch spread out.
    The result is always > now (every interval is > 0).

    Raises:
        ValueError: attempts < 1 or an empty schedule.
    """
    wait = interval(attempts, schedule)
    if rng is not None:
        wait *= rng.uniform(1.0 - JITTER, 1.0 + JITTER)
    return now + wait


def expired(received_at: float, now: float, max_age: float) -> bool:
    """True when the message is `max_age` seconds old or older (the boundary counts)."""
    return now - received_at >= max_age


def deadline(received_at: float, max_age: float) -> float:
    """The instant a message received at `received_at` expires."""
    return received_at + max_age
