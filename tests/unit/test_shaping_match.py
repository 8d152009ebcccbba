"""Which [[shaping]] entry applies (most specific wins) and what it does to the pool
settings."""

from __future__ import annotations

from typing import Any

from engine.config import ShapingConfig, from_dict
from engine.delivery.job import PoolSettings
from engine.delivery.shaping import match, most_preferred, shaped
from engine.dns.mx import RouteHost


def rules(*entries: dict[str, Any]) -> list[ShapingConfig]:
    return from_dict({"shaping": list(entries)}).shaping


RULES = rules(
    {"name": "google", "mx_suffix": ".google.com", "rate": "10/s"},
    {"name": "gmail-mx", "mx_suffix": ".mx.google.com"},
    {"name": "corp", "domain": "*.corp.test"},
    {"name": "deep", "domain": "*.eu.corp.test"},
    {"name": "exact", "domain": "paris.eu.corp.test"},
)


def name(domain: str, hosts: list[str] | None) -> str | None:
    rule, _why = match(RULES, domain, hosts)
    return rule.label if rule else None


def test_exact_domain_beats_patterns_and_mx() -> None:
    assert name("paris.eu.corp.test", ["a.mx.google.com"]) == "exact"
    rule, why = match(RULES, "PARIS.eu.corp.test.", None)
    assert rule is not None and why == 'domain "paris.eu.corp.test" matches paris.eu.corp.test exactly'


def test_longest_wildcard_beats_shorter_and_mx() -> None:
    assert name("lyon.eu.corp.test", ["a.mx.google.com"]) == "deep"
    assert name("x.corp.test", None) == "corp"
    assert name("corp.test", None) is None  # "*." is subdomains only, as for [[routes]]


def test_longest_mx_suffix_wins_and_why_names_the_host() -> None:
    rule, why = match(RULES, "example.org", ["aspmx.mx.google.com"])
    assert rule is not None and rule.label == "gmail-mx"
    assert why == 'mx_suffix ".mx.google.com" matches MX host aspmx.mx.google.com'
    assert name("example.org", ["smtp.google.com"]) == "google"


def test_every_most_preferred_host_must_end_so() -> None:
    assert name("mixed.test", ["a.mx.google.com", "mx.other.test"]) is None
    hosts = (RouteHost("mx.backup.test", 20, ("127.0.0.3",)),
             RouteHost("A.MX.google.com.", 10, ("127.0.0.2",)),
             RouteHost("b.mx.google.com", 10, ("127.0.0.4",)))
    assert most_preferred(hosts) == ["a.mx.google.com", "b.mx.google.com"]
    assert name("backup.test", most_preferred(hosts)) == "gmail-mx"


def test_no_rule_says_so() -> None:
    assert match(RULES, "example.net", ["mx.example.net"]) == (None, "no rule: delivery defaults")
    assert match(RULES, "example.net", None)[1].startswith("no rule: delivery defaults (MX hosts not known")
    assert match([], "a.test", []) == (None, "no rule: delivery defaults")


def test_suffix_without_leading_dot_matches_labels_only() -> None:
    got = rules({"mx_suffix": "google.com"})
    assert match(got, "d.test", ["mx.google.com"])[0] is not None
    assert match(got, "d.test", ["google.com"])[0] is not None
    assert match(got, "d.test", ["notgoogle.com"])[0] is None


def test_shaped_sets_what_the_entry_gives_and_keeps_the_rest() -> None:
    base = PoolSettings(max_connections=20, max_messages_per_connection=1000, idle_timeout=10.0,
                        tls="opportunistic", port=2525)
    (rule,) = rules({"name": "g", "mx_suffix": ".g.test", "max_connections": 4, "rate": "600/min",
                     "connect_rate": "2/s", "max_recipients_per_message": 50,
                     "idle_timeout": "3s", "tls": "required"})
    got = shaped(base, rule)
    assert (got.max_connections, got.provider_connections, got.provider) == (4, 4, "g")
    assert got.provider_rate == 10.0 and got.provider_connect_rate == 2.0
    assert (got.max_recipients, got.idle_timeout, got.tls, got.port) == (50, 3.0, "required", 2525)
    assert got.max_messages_per_connection == 1000
    (bare,) = rules({"domain": "x.test"})
    only_name = shaped(base, bare)
    assert only_name.provider == "x.test" and only_name.provider_connections == 0
    assert only_name.max_connections == 20 and only_name.rate == 0.0
    assert shaped(base, None) is base


def test_auth_routes_keep_tls_required() -> None:
    (rule,) = rules({"domain": "x.test", "tls": "none"})
    assert shaped(PoolSettings(auth_user="u", tls="required"), rule).tls == "required"
