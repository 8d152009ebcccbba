"""queue.high_water: how much of max_size new mail may fill (the rest is headroom for
outcomes, deletions and bounce reports); bad values are one `queue.high_water: problem`."""

from __future__ import annotations

import pytest

from engine.config.loader import ConfigError, from_dict
from engine.config.tree import MIN_HEADROOM

MIB = 1024 * 1024


def headroom(mark: object, max_size: str = "100MiB") -> int:
    return from_dict({"queue": {"max_size": max_size, "high_water": mark}}).queue.headroom()


def test_default_keeps_a_tenth_free() -> None:
    cfg = from_dict({"queue": {"max_size": "100MiB"}})
    assert cfg.queue.high_water == "90%"
    assert cfg.queue.headroom() == 100 * MIB - int(100 * MIB * 0.9)


@pytest.mark.parametrize("mark", ["80%", 0.8, "80MiB", 80 * MIB])
def test_percent_fraction_and_size_agree(mark: object) -> None:
    assert abs(headroom(mark) - 20 * MIB) <= 1


def test_small_queue_keeps_the_floor() -> None:
    assert headroom("99%", "1MiB") == MIN_HEADROOM
    with pytest.raises(ConfigError, match="queue.max_size: 128KiB is too small"):
        headroom("100%", "128KiB")  # all headroom, no room for mail: refused at load


@pytest.mark.parametrize("mark, problem", [
    ("0%", "percentage"), ("101%", "percentage"), ("x%", "percentage"),
    (1.5, "fraction"), (0.0, "fraction"), ("200MiB", "within max_size"), ("lots", "size"),
])
def test_bad_marks_name_the_key(mark: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        headroom(mark)
    assert str(info.value).startswith("queue.high_water: ")
    assert problem in str(info.value)
