"""The scan's room per destination (engine/delivery/scan_plan.py): how big it is, what a
scan passes over, and that priority lanes are read apart."""

from __future__ import annotations

from engine.delivery.scan_plan import PassOver, by_kind, destination_room
from engine.queue.layout import DEFAULT_LANE, PRIORITIES


def test_room_is_a_tenth_of_max_ready_unless_set() -> None:
    assert destination_room(20_000, 0) == 2_000
    assert destination_room(5, 0) == 1  # never none
    assert destination_room(20_000, 7) == 7


def test_pass_over_in_flight_units_and_every_unit_of_a_full_destination() -> None:
    inflight = {(b"m1", "a.test")}
    per = {"a.test": 1, "full.test": 3}
    passing = PassOver(inflight, per, room=3)
    assert passing  # due_scan tests its truth before asking
    assert (b"m1", "a.test") in passing  # in flight
    assert (b"m2", "a.test") not in passing  # a.test has room left
    assert (b"m3", "full.test") in passing  # full.test holds its room
    assert (b"m4", "new.test") not in passing
    per["full.test"] = 2  # one came back: its units are read again
    assert (b"m3", "full.test") not in passing


def test_priority_lanes_and_the_rest_are_two_scans() -> None:
    caps = [55] * DEFAULT_LANE + [50] * (PRIORITIES - DEFAULT_LANE)
    high, low = by_kind(caps)
    assert high[:DEFAULT_LANE] == caps[:DEFAULT_LANE] and not any(high[DEFAULT_LANE:])
    assert low[DEFAULT_LANE:] == caps[DEFAULT_LANE:] and not any(low[:DEFAULT_LANE])
