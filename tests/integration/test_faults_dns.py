"""DNS faults (issue 11) against the lab DNS server on loopback: each ends in the right
outcome class (P11: a DNS failure defers 4.4.3, a DNS fact bounces), never a crash, and
bounded work (queries counted by the server itself).

The routing choices these tests pin down:
- A CNAME chain (for the domain or an MX target) is followed by the resolver; a CNAME
  loop is answered SERVFAIL by resolvers (RFC 1034 §3.6.2 calls it an error, not a
  fact), so it defers 4.4.3 like any DNS failure, and expires if nobody mends the zone.
- An MX set of any size costs at most `max_mx_hosts` (16) address lookups of the most
  preferred hosts; connections are bounded separately per attempt (connect.MAX_ADDRESSES).
- Private and loopback MX addresses are used (internal relays, split-horizon DNS, a lab
  MX); an MX that is this relay bounces 5.4.6. Addresses no host can have (0.0.0.0,
  multicast, "::") are dropped; an MX left with none defers 4.4.4.
"""

from __future__ import annotations

from typing import Any

from engine.lab.dns import DnsServer
from tests.integration.test_dns import make_cache, names, reply, run

HOSTS = 100
ZONE: dict[str, Any] = {
    "many.test": {"MX": [(p, f"mx{p}.many.test") for p in range(1, HOSTS + 1)]},
    **{f"mx{p}.many.test": {"A": [f"127.0.1.{p}"]} for p in range(1, HOSTS + 1)},
    # MX target → c1 → c2 → c3 → an address.
    "chain.test": {"MX": [(10, "c1.chain.test")]},
    "c1.chain.test": {"CNAME": "c2.chain.test"},
    "c2.chain.test": {"CNAME": "c3.chain.test"},
    "c3.chain.test": {"CNAME": "real.chain.test"},
    "real.chain.test": {"A": ["127.0.0.7"]},
    # The domain itself an alias through two CNAMEs.
    "alias.test": {"CNAME": "alias2.test"},
    "alias2.test": {"CNAME": "chain.test"},
    # Loops: the domain itself, and an MX target.
    "loop1.test": {"CNAME": "loop2.test"},
    "loop2.test": {"CNAME": "loop1.test"},
    "looptarget.test": {"MX": [(10, "loop1.test")]},
    "loopsome.test": {"MX": [(10, "loop1.test"), (20, "real.chain.test")]},
    # Where the MX points.
    "private.test": {"MX": [(10, "inside.private.test")]},
    "inside.private.test": {"A": ["10.1.2.3"], "AAAA": ["fd00::25"]},
    "loopback.test": {"MX": [(10, "lo.loopback.test")]},
    "lo.loopback.test": {"A": ["127.0.0.9"]},
    "zero.test": {"MX": [(10, "z.zero.test")]},
    "z.zero.test": {"A": ["0.0.0.0", "224.0.0.1", "255.255.255.255"], "AAAA": ["::", "ff02::1"]},
    "mixed.test": {"MX": [(10, "m.mixed.test")]},
    "m.mixed.test": {"A": ["0.0.0.0", "127.0.0.8"]},
    "parked.test": {"A": ["0.0.0.0"]},
    # Failures.
    "dead.test": "DROP",
    "deadmx.test": {"MX": [(10, "gone.deadmx.test")]},
    "gone.deadmx.test": "DROP",
    "failaddr.test": {"MX": [(10, "f.failaddr.test")]},
    "f.failaddr.test": {"A": "SERVFAIL", "AAAA": "SERVFAIL"},
    "tcaddr.test": {"MX": [(10, "wide.tcaddr.test")]},
    "wide.tcaddr.test": {"TC": True, "A": [f"127.0.2.{n}" for n in range(1, 61)]},
}


def test_mx_set_of_100_hosts_is_bounded() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("many.test")
        # The 16 most preferred hosts, in order; none of the others is even looked up.
        assert names(r) == [f"mx{p}.many.test" for p in range(1, 17)]
        assert server.count("mx17.many.test", "A") == server.count("mx100.many.test", "A") == 0
        # The MX RRset (over UDP, and over TCP when it did not fit) + A/AAAA for 16 hosts.
        assert server.count("many.test", "MX") <= 2
        assert server.total() <= 2 + 2 * 16

    run(body, ZONE)


def test_cname_chains_are_followed() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        for domain in ("chain.test", "alias.test"):
            r = await cache.route(domain)
            assert not isinstance(r, Exception)
            assert [(h.name, h.addresses) for h in r.hosts] == [("c1.chain.test", ("127.0.0.7",))], r

    run(body, ZONE)


def test_cname_loop_defers_4_4_3() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        assert reply(await cache.route("loop1.test")) == (451, "4.4.3")  # the domain
        assert reply(await cache.route("looptarget.test")) == (451, "4.4.3")  # its only MX
        # A looping MX among good ones is skipped; the others carry the mail.
        assert names(await cache.route("loopsome.test")) == ["real.chain.test"]

    run(body, ZONE)


def test_private_and_loopback_mx_are_used_unless_they_are_us() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("private.test")
        assert not isinstance(r, Exception)
        assert r.hosts[0].addresses == ("10.1.2.3", "fd00::25")  # routed, never connected here
        assert names(await cache.route("loopback.test")) == ["lo.loopback.test"]
        ours, _ = make_cache(server, local=frozenset({"127.0.0.9"}))
        assert reply(await ours.route("loopback.test")) == (554, "5.4.6")

    run(body, ZONE)


def test_addresses_no_host_can_have_are_dropped() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        assert reply(await cache.route("zero.test")) == (451, "4.4.4")
        assert reply(await cache.route("parked.test")) == (451, "4.4.4")  # implicit MX
        r = await cache.route("mixed.test")
        assert not isinstance(r, Exception)
        assert r.hosts[0].addresses == ("127.0.0.8",)

    run(body, ZONE)


def test_dead_server_and_failing_lookups_defer_4_4_3() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server, timeout=0.5)
        assert reply(await cache.route("dead.test")) == (451, "4.4.3")
        assert reply(await cache.route("deadmx.test")) == (451, "4.4.3")
        assert reply(await cache.route("failaddr.test")) == (451, "4.4.3")
        assert server.count("dead.test", "A") == 0  # a failed MX lookup never falls back to A

    run(body, ZONE)


def test_truncated_address_answer_is_retried_over_tcp() -> None:
    async def body(server: DnsServer) -> None:
        cache, _ = make_cache(server)
        r = await cache.route("tcaddr.test")
        assert not isinstance(r, Exception)
        assert sorted(r.hosts[0].addresses) == sorted(f"127.0.2.{n}" for n in range(1, 61))
        assert server.count("wide.tcaddr.test", "A") == 2  # UDP (TC), then TCP

    run(body, ZONE)
