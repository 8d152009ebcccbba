"""MTA-STS, the pure part (engine/delivery/mta_sts.py): the TXT record (RFC 8461 §3.1),
the policy file (§3.2), MX pattern matching (§4.1) and restricting a route (§5)."""

from __future__ import annotations

import pytest

from engine.config import from_dict
from engine.config.loader import ConfigError
from engine.config.mta_sts import MtaStsConfig
from engine.delivery.mta_sts import (
    MAX_AGE_LIMIT,
    Policy,
    PolicyError,
    disallowed_hosts,
    mx_matches,
    parse_policy,
    record_id,
    restrict_route,
)
from engine.dns.mx import Route, RouteError, RouteHost

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.mail.example.net\r\nmax_age: 86400\r\n"


# --- the TXT record ------------------------------------------------------------------

@pytest.mark.parametrize("texts,expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1 ;  id=abc ; ext=x;"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # other records are discarded
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two: no available policy
    (["v=STSv1; ext=1"], None),  # no id
    (["v=STSv1; id=has-dash"], None),  # id is 1*32 ALPHA / DIGIT
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv2; id=abc"], None),
    (["id=abc; v=STSv1"], None),  # v= must come first
    (["v=STSv1; junk"], None),
    ([], None),
])
def test_record_id(texts: list[str], expected: str | None) -> None:
    assert record_id(texts) == expected


# --- the policy file -------------------------------------------------------------------

def test_parse_a_policy_with_crlf_and_lf_lines() -> None:
    policy = parse_policy(POLICY)
    assert policy == Policy("enforce", ("mx1.example.com", "*.mail.example.net"), 86400)
    assert parse_policy(POLICY.replace("\r\n", "\n")) == policy


def test_unknown_keys_are_ignored_and_the_first_of_a_repeated_key_counts() -> None:
    text = "version: STSv1\nmode: testing\nmode: enforce\nfuture_key: 1\nmx: MX.Example.COM.\nmax_age:604800\n"
    assert parse_policy(text) == Policy("testing", ("mx.example.com",), 604800)


def test_mode_none_needs_no_mx_and_max_age_is_capped_at_a_year() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n")
    assert policy.mode == "none" and policy.mx == () and policy.max_age == MAX_AGE_LIMIT


@pytest.mark.parametrize("text,problem", [
    ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
    ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmx: a.example\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "mx"),
    ("version: STSv1\nmode: enforce\nmx: mx.*.example\nmax_age: 1\n", "MX pattern"),
    ("version: STSv1\nmode: enforce\nmx: *example.com\nmax_age: 1\n", "MX pattern"),
    ("<html>not a policy</html>\n", "line 1"),
])
def test_bad_policies_are_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_policy(text)


# --- MX patterns --------------------------------------------------------------------

@pytest.mark.parametrize("pattern,host,expected", [
    ("mx1.example.com", "mx1.example.com", True),
    ("mx1.example.com", "MX1.Example.Com.", True),
    ("mx1.example.com", "mx2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),  # §4.1: the wildcard is one label
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mx1.example.com.evil.test", False),
    ("*.example.com", ".example.com", False),
])
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def _route(*names: str) -> Route:
    hosts = tuple(RouteHost(n, 10 * i, (f"127.0.0.{i + 2}",)) for i, n in enumerate(names))
    return Route("example.com", hosts, ",".join(sorted(names)), address_key="ip:x")


def test_restrict_route_keeps_only_allowed_hosts_and_rekeys_the_site() -> None:
    policy = Policy("enforce", ("*.example.com",), 86400)
    route = _route("mx1.example.com", "backup.other.test", "mx2.example.com")
    kept = restrict_route(policy, route)
    assert isinstance(kept, Route)
    assert [h.name for h in kept.hosts] == ["mx1.example.com", "mx2.example.com"]
    assert kept.site_key == "mx1.example.com,mx2.example.com"
    assert kept.address_key == "ip:127.0.0.2,127.0.0.4"
    assert disallowed_hosts(policy, route) == ["backup.other.test"]


def test_restrict_route_returns_the_same_route_when_all_hosts_are_allowed() -> None:
    route = _route("mx1.example.com")
    assert restrict_route(Policy("enforce", ("mx1.example.com",), 1), route) is route


def test_no_allowed_host_defers_4_7_5_naming_both_lists() -> None:
    err = restrict_route(Policy("enforce", ("mx.example.com",), 1), _route("evil.test"))
    assert isinstance(err, RouteError) and not err.permanent
    assert (err.reply.code, err.reply.enhanced) == (451, "4.7.5")
    text = " ".join(err.reply.lines)
    assert "MTA-STS" in text and "evil.test" in text and "mx.example.com" in text


# --- the [mta_sts] section ---------------------------------------------------------------

def test_config_defaults_and_checks(tmp_path) -> None:
    cfg = MtaStsConfig()
    assert (cfg.enabled, cfg.ca_file, cfg.port, float(cfg.fetch_timeout)) == (True, "", 443, 60.0)
    with pytest.raises(ValueError, match="port: out of range"):
        MtaStsConfig(port=0)
    with pytest.raises(ValueError, match="ca_file: cannot load"):
        MtaStsConfig(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="mta_sts.port: out of range"):
        from_dict({"mta_sts": {"port": 70000}})
    with pytest.raises(ConfigError, match="mta_sts.ca_file: cannot load"):
        from_dict({"mta_sts": {"ca_file": str(tmp_path / "missing.pem")}})
    with pytest.raises(ConfigError, match="mta_sts.fetch_timeout: must be positive"):
        from_dict({"mta_sts": {"fetch_timeout": "0s"}})
