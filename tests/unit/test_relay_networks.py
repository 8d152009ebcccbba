"""Policy.in_relay_networks (P7's first question): the same answers with its memo as
without, for each form of address a listener reports, and the memo stays bounded."""

from __future__ import annotations

from engine.config.loader import from_dict
from engine.inbound import policy as policy_mod
from engine.inbound.policy import Policy

CASES = {
    "127.0.0.1": True,
    "10.1.2.3": True,
    "192.0.2.7": False,
    "::1": True,
    "::ffff:10.9.9.9": True,  # IPv4-mapped: judged as the IPv4 address
    "2001:db8::1": False,
    "fe80::1%eth0": False,  # a zone index is not part of the address
    "unix": False,  # a Unix-socket listener's peer
}


def _policy() -> Policy:
    return Policy(from_dict({"relay": {"networks": ["127.0.0.0/8", "::1/128", "10.0.0.0/8"]}}))


def test_answers_are_the_same_asked_once_or_again() -> None:
    p = _policy()
    first = {ip: p.in_relay_networks(ip) for ip in CASES}
    again = {ip: p.in_relay_networks(ip) for ip in CASES}
    assert first == again == CASES


def test_the_memo_is_bounded() -> None:
    p = _policy()
    for i in range(policy_mod._RELAY_CACHE_MAX + 10):
        assert p.in_relay_networks(f"10.0.{i // 256 % 256}.{i % 256}") is True
    assert len(p._relay_cache) <= policy_mod._RELAY_CACHE_MAX
    assert p.in_relay_networks("192.0.2.7") is False
