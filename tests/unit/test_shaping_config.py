"""[[shaping]] entries: what `volley config check` accepts and the one-line errors it
gives, the rate syntax, and the round trip through the written form."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import ConfigError, decode_json, encode_json, from_dict, parse_rate


def test_an_entry_decodes_with_unset_keys_left_none() -> None:
    cfg = from_dict({"shaping": [{"mx_suffix": ".mx.google.com", "rate": "600/min",
                                   "max_connections": 4, "idle_timeout": "5s"}]})
    (rule,) = cfg.shaping
    assert rule.label == "mx:.mx.google.com"
    assert rule.per_second == 10.0
    assert rule.max_connections == 4
    assert rule.idle_timeout == 5.0
    assert rule.tls is None and rule.connect_rate is None and rule.connects_per_second == 0.0


def test_written_form_loads_back_the_same() -> None:
    cfg = from_dict({"shaping": [
        {"name": "gmail", "mx_suffix": ".google.com", "rate": "20000/h", "tls": "required"},
        {"domain": "*.example.com", "max_recipients_per_message": 50, "idle_timeout": "90s"},
    ]})
    assert decode_json(encode_json(cfg)) == cfg


@pytest.mark.parametrize(("text", "per_second"), [
    ("300/min", 5.0), ("20000/h", 20000 / 3600), ("5/s", 5.0), ("1.5 / sec", 1.5),
    ("86400/day", 1.0), ("60/minute", 1.0),
])
def test_rate_syntax(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(("entries", "line"), [
    ([{"domain": "a.test"}, {"domain": "b.test", "rate": "3/fortnight"}],
     'shaping[1].rate: expected a rate such as "300/min", "20000/h" or "5/s", got "3/fortnight"'),
    ([{"domain": "a.test", "connect_rate": "0/s"}],
     'shaping[0].connect_rate: must be more than 0, got "0/s" (leave the key out for no limit)'),
    ([{"domain": "a.test", "mx_suffix": ".mx.test"}],
     "shaping[0].domain: give exactly one of domain or mx_suffix"),
    ([{"rate": "1/s"}], "shaping[0].domain: give exactly one of domain or mx_suffix"),
    ([{"domain": "a.*.test"}],
     'shaping[0].domain: expected "example.com" or "*.example.com", got "a.*.test"'),
    ([{"mx_suffix": "mx test"}],
     'shaping[0].mx_suffix: expected a host name suffix such as ".mx.google.com", got "mx test"'),
    ([{"domain": "a.test", "max_connections": 0}],
     "shaping[0].max_connections: must be at least 1, got 0"),
    ([{"domain": "a.test", "tls": "maybe"}], "shaping[0].tls: invalid enum value 'maybe',"
     ' expected one of "opportunistic", "required", "none"'),
    ([{"domain": "a.test", "idle_timeout": "soon"}],
     "shaping[0].idle_timeout: expected a duration such as \"90s\" or \"5m\", got 'soon'"),
    ([{"domain": "a.test", "burst": 3}], "shaping[0].burst: unknown key"),
    ([{"domain": "a.test"}, {"domain": "A.test"}],
     'shaping[1].name: "a.test" is also shaping[0]\'s name'),
    ([{"name": "x", "domain": "a.test"}, {"name": "y", "domain": "a.test"}],
     "shaping[1].domain: the same match as shaping[0]"),
])
def test_errors_name_the_entry_and_key(entries: list[dict[str, Any]], line: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"shaping": entries})
    assert str(err.value) == line
