"""[[egress]], [[egress_rules]] and [[warmup]]: what config check accepts, the
`path: problem` line for what it refuses, and the warm-up schedule parser."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import ConfigError, from_dict
from engine.config.egress import Step, allowance, parse_schedule

TWO = [{"name": "a", "source_address": "127.0.0.20", "ehlo_name": "a.example.com"},
       {"name": "b", "source_address": "127.0.0.21", "pool": "acme", "weight": 3}]


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return str(info.value)


def test_defaults_and_a_full_section():
    assert from_dict({}).egress == [] and from_dict({}).warmup == []
    cfg = from_dict({
        "egress": TWO,
        "egress_rules": [{"tenant": "acme", "pool": "acme"}, {"campaign": "spring*", "pool": "default"}],
        "routes": [{"domain": "*.corp.example", "egress_pool": "acme"}],
        "shaping": [{"name": "gmail", "mx_suffix": ".google.com"}],
        "warmup": [{"source": ["b"], "start": "2025-01-06", "providers": ["gmail", "*"],
                    "schedule": ["day 1: 50/h", "day 2-3: 100/h"]}],
    })
    assert [e.pool for e in cfg.egress] == ["default", "acme"]
    assert cfg.egress[1].weight == 3 and cfg.egress[0].ehlo_name == "a.example.com"
    assert cfg.egress_rules[0].matches("acme", "") and not cfg.egress_rules[0].matches("acme2", "")
    assert cfg.egress_rules[1].matches("", "spring-sale") and not cfg.egress_rules[1].matches("", "autumn")
    assert cfg.routes[0].egress_pool == "acme"
    assert cfg.warmup[0].sources == ["b"] and str(cfg.warmup[0].start_date) == "2025-01-06"


@pytest.mark.parametrize("data, line", [
    ({"egress": [{"name": "a", "source_address": "mta.example"}]},
     'egress[0].source_address: expected an IPv4 or IPv6 address, got "mta.example"'),
    ({"egress": [{"name": "a", "source_address": "127.0.0.20", "weight": 0}]},
     "egress[0].weight: must be at least 1, got 0"),
    ({"egress": [{"name": "a", "source_address": "127.0.0.20", "ehlo_name": "bad name"}]},
     'egress[0].ehlo_name: expected a host name such as "mta1.example.com", got "bad name"'),
    ({"egress": [{"name": "a", "source_address": "127.0.0.20"}, {"name": "a", "source_address": "127.0.0.21"}]},
     "egress[1].name: \"a\" is also egress[0]'s name"),
    ({"egress": [{"name": "a", "source_address": "127.0.0.20"}, {"name": "b", "source_address": "127.0.0.20"}]},
     'egress[1].source_address: 127.0.0.20 is already in pool "default"'),
    ({"egress": [{"name": "a", "source_address": "127.0.0.20"}], "routes": [{"domain": "*", "egress_pool": "x"}]},
     'routes[0].egress_pool: no [[egress]] entry is in pool "x"'),
    ({"egress": TWO, "egress_rules": [{"pool": "acme"}]},
     "egress_rules[0].tenant: give tenant, campaign or both"),
    ({"egress": TWO, "egress_rules": [{"tenant": "t", "pool": "nope"}]},
     'egress_rules[0].pool: no [[egress]] entry is in pool "nope"'),
    ({"egress": TWO, "warmup": [{"source": "c", "schedule": ["day 1: 5/h"]}]},
     'warmup[0].source: no [[egress]] entry is named "c"'),
    ({"egress": TWO, "warmup": [{"source": "a", "schedule": ["day 1: 5/h"]},
                                {"source": ["a"], "schedule": ["day 1: 5/h"]}]},
     "warmup[1].source: 127.0.0.20 (a) already has a schedule in warmup[0]"),
    ({"egress": TWO, "warmup": [{"source": "a", "schedule": ["day 1: 5/h"], "providers": ["gmail"]}]},
     'warmup[0].providers: no [[shaping]] entry is named "gmail" ("*" stands for mail no entry matches)'),
    ({"egress": TWO, "warmup": [{"source": "a", "schedule": ["day 2: 5/h"]}]},
     'warmup[0].schedule: line 1 "day 2: 5/h": expected day 1 (the first line is day 1; '
     "a line starts after the one before)"),
    ({"egress": TWO, "warmup": [{"source": "a", "schedule": ["day 1: 5/h"], "start": "Monday"}]},
     'warmup[0].start: expected a date such as "2025-01-31", got "Monday"'),
    ({"egress": TWO, "warmup": [{"source": "a", "schedule": ["day 1: 5/h"], "burst": 3}]},
     "warmup[0].burst: unknown key"),
])
def test_refused_with_the_path_and_the_problem(data, line):
    assert _error(data) == line


def test_schedule_steps_and_allowance_by_day():
    steps = parse_schedule(["day 1: 50/h", "day 3: 100/h", "Day 5-6 : 1000 / hour"])
    assert steps == (Step(1, 2, 50), Step(3, 4, 100), Step(5, 6, 1000))
    assert [allowance(steps, d) for d in range(0, 9)] == [0, 50, 50, 100, 100, 1000, 1000, None, None]
    forever = parse_schedule(["day 1: 50/h", "day 4: 500/h"])
    assert allowance(forever, 400) == 500  # an open last line holds for ever
    warmed = parse_schedule(["day 1-2: 50/h", "day 3: unlimited"])
    assert [allowance(warmed, d) for d in (1, 2, 3, 30)] == [50, 50, None, None]


@pytest.mark.parametrize("lines, problem", [
    ([], 'give at least one line, such as "day 1: 50/h"'),
    (["day 1: 50"], 'line 1 "day 1: 50": expected "day N: M/h", "day N-K: M/h" or "day N: unlimited"'),
    (["day 1-2: 5/h", "day 4: 6/h"], 'line 2 "day 4: 6/h": expected day 3 (the first line is day 1; '
                                      "a line starts after the one before)"),
    (["day 1: 5/h", "day 1: 6/h"], 'line 2 "day 1: 6/h": expected day 2 or later (the first line is '
                                    "day 1; a line starts after the one before)"),
    (["day 1: 0/h"], 'line 1 "day 1: 0/h": at least 1 message an hour (leave the source out of the '
                     "pool to send none)"),
    (["day 3-1: 5/h"], 'line 1 "day 3-1: 5/h": expected day 1 (the first line is day 1; a line starts '
                       "after the one before)"),
])
def test_schedule_errors_name_the_line(lines, problem):
    with pytest.raises(ValueError) as info:
        parse_schedule(lines)
    assert str(info.value) == problem
