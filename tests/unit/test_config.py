"""config: the retry schedule and nameservers are decoded at load, and errors stay one line."""

from __future__ import annotations

import pytest

from engine.config import (
    ConfigError,
    RetrySchedule,
    decode_json,
    dump_toml,
    encode_json,
    from_dict,
    load,
    parse_nameserver,
)


def test_retry_schedule_decoded_to_seconds() -> None:
    cfg = from_dict({"delivery": {"retry": "90s, 5m"}})
    assert cfg.delivery.retry.seconds == (90.0, 300.0)
    assert load(None).delivery.retry == RetrySchedule("1m, 5m, 15m, 30m, 1h, 2h, 4h")


def test_retry_schedule_written_back_as_given() -> None:
    # "60s" stays "60s": the dump and the worker handoff carry the operator's text.
    cfg = from_dict({"delivery": {"retry": "60s,  2h"}, "server": {"hostname": "h"}})
    assert 'retry = "60s,  2h"' in dump_toml(cfg)
    assert decode_json(encode_json(cfg)) == cfg


@pytest.mark.parametrize(
    "retry, line",
    [
        ("", "delivery.retry: retry schedule is empty; expected e.g. '1m, 5m, 15m, 30m, 1h, 2h, 4h'"),
        ("1m,,5m", "delivery.retry: retry schedule '1m,,5m': item 2 is empty"),
        ("0s", "delivery.retry: retry schedule '0s': item 1 '0s' must be greater than zero"),
        (5, "delivery.retry: expected `str`, got `int`"),
        (["1m"], "delivery.retry: expected `str`, got `array`"),
    ],
)
def test_bad_retry_schedule_is_one_line(retry: object, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"delivery": {"retry": retry}})
    assert str(err.value) == line


@pytest.mark.parametrize(
    "nameserver, expected",
    [
        ("192.0.2.1", ["192.0.2.1"]),
        ("[2001:db8::1]:5353", ["[2001:db8::1]:5353"]),
        ("[fe80::1%eth0]:53", ["[fe80::1%eth0]:53"]),
    ],
)
def test_nameservers_accepted(nameserver: str, expected: list[str]) -> None:
    assert from_dict({"dns": {"nameservers": [nameserver]}}).dns.nameservers == expected


@pytest.mark.parametrize("nameserver", ["ns.example:53", "192.0.2.1:99999", "192.0.2.1:0", "[::1]", "host"])
def test_bad_nameserver_names_its_index(nameserver: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"dns": {"nameservers": ["192.0.2.1", nameserver]}})
    assert str(err.value).startswith("dns.nameservers[1]: ")


def test_parse_nameserver() -> None:
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_nameserver("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert parse_nameserver("2001:db8::1") == ("2001:db8::1", 53)
    assert parse_nameserver("[2001:db8::1]:5353") == ("2001:db8::1", 5353)
    assert parse_nameserver("[fe80::1%eth0]:53") == ("fe80::1%eth0", 53)
    for bad in ("ns.example:53", "192.0.2.1:99999", "[::1]", "192.0.2.1:", "192.0.2.1:0", "::1:53:x"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
