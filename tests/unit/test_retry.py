"""delivery/retry: schedule parsing, next attempt, jitter bounds, expiry boundary."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config import DEFAULT_SCHEDULE, parse_schedule
from engine.delivery.retry import expired, interval, next_attempt

DEFAULT = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        (DEFAULT_SCHEDULE, DEFAULT),
        ("1m,5m", (60.0, 300.0)),
        ("  90s ,  4h  ", (90.0, 14400.0)),
        ("250ms, 1d", (0.25, 86400.0)),
        ("1m, 1m, 2m", (60.0, 60.0, 120.0)),
    ],
)
def test_parse_schedule_good(text: str, expected: tuple[float, ...]) -> None:
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1m,,5m", "item 2 is empty"),
        ("1m, 5m,", "item 3 is empty"),
        ("1m, soon", "item 2 'soon'"),
        ("1m, 5x", "item 2 '5x'"),
        ("-1m", "item 1"),
        ("0s, 1m", "greater than zero"),
        ("1m 5m", "item 1 '1m 5m'"),
        ("30", "item 1 '30'"),  # a unit is required, as for every duration string
    ],
)
def test_parse_schedule_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_schedule(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_last_interval_repeats() -> None:
    assert [interval(a, DEFAULT) for a in range(1, 8)] == list(DEFAULT)
    assert all(interval(a, DEFAULT) == 14400.0 for a in range(7, 200))
    assert next_attempt(50, 1000.0, DEFAULT) == 1000.0 + 14400.0


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_counts_the_failed_one(attempts: int) -> None:
    with pytest.raises(ValueError):
        next_attempt(attempts, 0.0, DEFAULT)


def test_empty_schedule_rejected() -> None:
    with pytest.raises(ValueError):
        next_attempt(1, 0.0, ())


schedules = st.lists(st.floats(min_value=0.001, max_value=1e6), min_size=1, max_size=10).map(
    lambda xs: tuple(sorted(xs))
)


@given(schedules, st.integers(1, 50), st.floats(0, 2e9), st.floats(0, 1e6))
def test_next_attempt_monotonic(schedule: tuple[float, ...], attempts: int, now: float, later: float) -> None:
    t = next_attempt(attempts, now, schedule)
    assert t > now
    # later now → not earlier; more attempts (non-decreasing schedule) → not earlier
    assert next_attempt(attempts, now + later, schedule) >= t
    assert next_attempt(attempts + 1, now, schedule) >= t


@given(schedules, st.integers(1, 50), st.floats(0, 2e9), st.integers(0, 2**32))
def test_jitter_within_ten_percent(schedule: tuple[float, ...], attempts: int, now: float, seed: int) -> None:
    base = interval(attempts, schedule)
    t = next_attempt(attempts, now, schedule, random.Random(seed))
    assert now + base * 0.9 - 1e-6 <= t <= now + base * 1.1 + 1e-6
    assert t > now


def test_jitter_spreads_a_batch() -> None:
    rng = random.Random(7)
    times = {next_attempt(1, 0.0, DEFAULT, rng) for _ in range(1000)}
    assert len(times) > 900
    assert min(times) < 57.0 and max(times) > 63.0


@pytest.mark.parametrize(
    "received, now, max_age, result",
    [
        (0.0, 0.0, 100.0, False),
        (0.0, 99.9, 100.0, False),
        (0.0, 100.0, 100.0, True),  # the boundary counts as expired
        (0.0, 500.0, 100.0, True),
        (1000.0, 5 * 86400.0 + 999.0, 5 * 86400.0, False),
    ],
)
def test_expired(received: float, now: float, max_age: float, result: bool) -> None:
    assert expired(received, now, max_age) is result
