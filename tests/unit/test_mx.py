"""engine/dns/mx.py: the MX plan as a pure function (RFC 5321 §5.1, RFC 7505, P11)."""

from __future__ import annotations

import random

import pytest

from engine.dns.mx import (
    Answer,
    MxRecord,
    Route,
    RouteError,
    Status,
    build_route,
    hosts_to_resolve,
    is_null_mx,
    order_mx,
)

MX = MxRecord
FAILURES = [Status.SERVFAIL, Status.TIMEOUT]


def ok(*records: object, ttl: int = 300) -> Answer:
    return Answer(Status.OK, tuple(records), ttl)


def neg(status: Status, ttl: int = 120) -> Answer:
    return Answer(status, (), ttl)


def route(domain: str, mx: Answer, addrs: dict[str, Answer], seed: int = 0, **kw: object) -> Route | RouteError:
    return build_route(domain, mx, addrs, random.Random(seed), **kw)  # type: ignore[arg-type]


def error(result: Route | RouteError) -> tuple[int, str]:
    assert isinstance(result, RouteError), result
    return result.reply.code, result.reply.enhanced


# --- ordering ------------------------------------------------------------------------


def test_order_by_preference_lowest_first() -> None:
    records = [MX(30, "c"), MX(10, "a"), MX(20, "b")]
    groups = order_mx(records, random.Random(1))
    assert [[r.host for r in g] for g in groups] == [["a"], ["b"], ["c"]]


def test_equal_preferences_are_shuffled_and_both_orders_occur() -> None:
    records = [MX(10, "a"), MX(10, "b"), MX(20, "z")]
    seen = set()
    for seed in range(200):
        groups = order_mx(records, random.Random(seed))
        assert [r.host for r in groups[1]] == ["z"]  # never crosses a preference
        seen.add(tuple(r.host for r in groups[0]))
    assert seen == {("a", "b"), ("b", "a")}


def test_route_hosts_follow_preference_with_shuffled_ties() -> None:
    mx = ok(MX(20, "backup.test"), MX(10, "a.test"), MX(10, "b.test"))
    addrs = {h: ok("192.0.2.1") for h in ("backup.test", "a.test", "b.test")}
    firsts = set()
    for seed in range(100):
        r = route("d.test", mx, addrs, seed)
        assert isinstance(r, Route)
        assert [h.preference for h in r.hosts] == [10, 10, 20]
        assert r.hosts[-1].name == "backup.test"
        firsts.add(r.hosts[0].name)
    assert firsts == {"a.test", "b.test"}


def test_addresses_ipv4_then_ipv6_each_shuffled() -> None:
    mx = ok(MX(10, "mx.test"))
    addrs = {"mx.test": ok("192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2")}
    orders = set()
    for seed in range(100):
        r = route("d.test", mx, addrs, seed)
        assert isinstance(r, Route)
        got = r.hosts[0].addresses
        assert {a for a in got[:2]} == {"192.0.2.1", "192.0.2.2"}
        assert {a for a in got[2:]} == {"2001:db8::1", "2001:db8::2"}
        orders.add(got)
    assert len(orders) == 4


# --- null MX (RFC 7505) -------------------------------------------------------------


def test_is_null_mx_only_the_exact_form() -> None:
    assert is_null_mx([MX(0, "")])
    assert not is_null_mx([MX(10, "")])  # not preference 0
    assert not is_null_mx([MX(0, ""), MX(10, "mx.test")])  # not alone
    assert not is_null_mx([MX(0, "mx.test")])
    assert not is_null_mx([])


def test_null_mx_bounces_556_5_1_10_without_address_lookups() -> None:
    mx = ok(MX(0, ""))
    assert hosts_to_resolve("nullmx.test", mx) == []
    assert error(route("nullmx.test", mx, {})) == (556, "5.1.10")


def test_null_mx_mixed_with_others_is_ignored() -> None:
    mx = ok(MX(0, ""), MX(10, "mx.test"))
    assert hosts_to_resolve("d.test", mx) == ["mx.test"]
    r = route("d.test", mx, {"mx.test": ok("192.0.2.1")})
    assert isinstance(r, Route)
    assert [h.name for h in r.hosts] == ["mx.test"]
    assert r.site_key == "mx.test"


def test_root_exchange_alone_at_other_preference_defers() -> None:
    # Not a null MX (RFC 7505 §3 requires preference 0) and names no host.
    assert error(route("d.test", ok(MX(10, "")), {})) == (451, "4.4.4")


# --- implicit MX (RFC 5321 §5.1) ------------------------------------------------------


def test_no_mx_means_implicit_mx_on_the_domain() -> None:
    mx = neg(Status.NODATA)
    assert hosts_to_resolve("Plain.Test.", mx) == ["plain.test"]
    r = route("plain.test", mx, {"plain.test": ok("192.0.2.7", "2001:db8::7")})
    assert isinstance(r, Route)
    assert r.implicit
    assert r.site_key == "plain.test"
    assert r.hosts == (r.hosts[0],)
    assert (r.hosts[0].name, r.hosts[0].preference) == ("plain.test", 0)
    assert r.hosts[0].addresses == ("192.0.2.7", "2001:db8::7")


@pytest.mark.parametrize("status", [Status.NODATA, Status.NXDOMAIN])
def test_implicit_mx_without_addresses_bounces(status: Status) -> None:
    assert error(route("plain.test", neg(Status.NODATA), {"plain.test": neg(status)})) == (550, "5.1.2")


@pytest.mark.parametrize("status", FAILURES)
def test_implicit_mx_address_failure_defers(status: Status) -> None:
    assert error(route("plain.test", neg(Status.NODATA), {"plain.test": neg(status, 0)})) == (451, "4.4.3")


# --- facts bounce, failures defer (P11) ---------------------------------------------


def test_nxdomain_bounces_550_5_1_2() -> None:
    mx = neg(Status.NXDOMAIN)
    assert hosts_to_resolve("nope.test", mx) == []
    assert error(route("nope.test", mx, {})) == (550, "5.1.2")


@pytest.mark.parametrize("status", FAILURES)
def test_mx_failure_defers_4_4_3_and_never_falls_back_to_a(status: Status) -> None:
    mx = neg(status, 0)
    # No address lookup is even asked for: the MX records may exist (finding 10) ...
    assert hosts_to_resolve("d.test", mx) == []
    # ... and addresses offered anyway are not used.
    result = route("d.test", mx, {"d.test": ok("192.0.2.1")})
    assert error(result) == (451, "4.4.3")


@pytest.mark.parametrize("mx_status", list(Status))
@pytest.mark.parametrize("addr_status", list(Status))
def test_failures_never_bounce(mx_status: Status, addr_status: Status) -> None:
    """Table over every pair: a failure on a lookup the route depends on gives 4.4.3,
    never 5xx; the only bounces are facts (NXDOMAIN of the domain, implicit MX without
    addresses)."""
    records = (MX(10, "mx.test"),) if mx_status is Status.OK else ()
    mx = Answer(mx_status, records, 60)
    addr = Answer(addr_status, ("192.0.2.1",) if addr_status is Status.OK else (), 60)
    result = route("d.test", mx, {"mx.test": addr, "d.test": addr})
    if mx_status.is_failure or (mx_status is not Status.NXDOMAIN and addr_status.is_failure):
        assert error(result) == (451, "4.4.3")
    elif mx_status is Status.NXDOMAIN:
        assert error(result) == (550, "5.1.2")
    elif addr_status is Status.OK:
        assert isinstance(result, Route)
    elif mx_status is Status.NODATA:
        assert error(result) == (550, "5.1.2")  # no MX, no address: a fact
    else:
        assert error(result) == (451, "4.4.4")  # the MX names a host without addresses


def test_mx_hosts_without_addresses_are_skipped() -> None:
    mx = ok(MX(10, "gone.test"), MX(20, "empty.test"), MX(30, "good.test"))
    addrs = {"gone.test": neg(Status.NXDOMAIN), "empty.test": neg(Status.NODATA), "good.test": ok("192.0.2.9")}
    r = route("d.test", mx, addrs)
    assert isinstance(r, Route)
    assert [h.name for h in r.hosts] == ["good.test"]
    assert r.site_key == "empty.test,gone.test,good.test"  # the MX set, not the usable part


def test_no_mx_host_with_addresses_defers_4_4_4() -> None:
    mx = ok(MX(10, "gone.test"), MX(20, "empty.test"))
    addrs = {"gone.test": neg(Status.NXDOMAIN), "empty.test": neg(Status.NODATA)}
    assert error(route("d.test", mx, addrs)) == (451, "4.4.4")


@pytest.mark.parametrize("status", FAILURES)
def test_unusable_hosts_with_a_failed_lookup_defer_4_4_3(status: Status) -> None:
    mx = ok(MX(10, "gone.test"), MX(20, "flaky.test"))
    addrs = {"gone.test": neg(Status.NXDOMAIN), "flaky.test": neg(status, 0)}
    assert error(route("d.test", mx, addrs)) == (451, "4.4.3")


def test_a_failed_host_is_skipped_when_another_works() -> None:
    mx = ok(MX(10, "flaky.test"), MX(20, "good.test"))
    r = route("d.test", mx, {"flaky.test": neg(Status.SERVFAIL, 0), "good.test": ok("192.0.2.1")})
    assert isinstance(r, Route)
    assert [h.name for h in r.hosts] == ["good.test"]


# --- loops (RFC 5321 §5.1) ----------------------------------------------------------


def test_self_as_best_mx_is_a_loop_5_4_6() -> None:
    mx = ok(MX(10, "me.test"), MX(20, "other.test"))
    addrs = {"me.test": ok("192.0.2.1"), "other.test": ok("192.0.2.2")}
    assert error(route("d.test", mx, addrs, local=frozenset({"me.test"}))) == (554, "5.4.6")
    assert error(route("d.test", mx, addrs, local=frozenset({"192.0.2.1"}))) == (554, "5.4.6")


def test_self_as_backup_mx_keeps_only_better_hosts() -> None:
    mx = ok(MX(10, "primary.test"), MX(20, "me.test"), MX(30, "worse.test"))
    addrs = {h: ok(f"192.0.2.{i}") for i, h in enumerate(("primary.test", "me.test", "worse.test"))}
    r = route("d.test", mx, addrs, local=frozenset({"me.test"}))
    assert isinstance(r, Route)
    assert [h.name for h in r.hosts] == ["primary.test"]
    # ... and when the better MX has no address, defer rather than deliver to ourselves.
    addrs["primary.test"] = neg(Status.NXDOMAIN)
    assert error(route("d.test", mx, addrs, local=frozenset({"me.test"}))) == (451, "4.4.4")


# --- site key and hosts to resolve ---------------------------------------------------


def test_site_key_is_sorted_host_set_shared_across_domains() -> None:
    addrs = {"mx1.p.test": ok("192.0.2.1"), "mx2.p.test": ok("192.0.2.2")}
    a = route("a.test", ok(MX(10, "mx2.p.test"), MX(20, "mx1.p.test")), addrs)
    b = route("b.test", ok(MX(5, "mx1.p.test"), MX(5, "mx2.p.test")), addrs, seed=7)
    assert isinstance(a, Route) and isinstance(b, Route)
    assert a.site_key == b.site_key == "mx1.p.test,mx2.p.test"
    assert not a.implicit


def test_hosts_to_resolve_most_preferred_first_with_limit() -> None:
    mx = ok(*(MX(p, f"mx{p}.test") for p in (50, 10, 30, 20, 40)), MX(60, "mx10.test"))
    assert hosts_to_resolve("d.test", mx) == ["mx10.test", "mx20.test", "mx30.test", "mx40.test", "mx50.test"]
    assert hosts_to_resolve("d.test", mx, limit=2) == ["mx10.test", "mx20.test"]


def test_host_not_looked_up_is_left_out() -> None:
    mx = ok(MX(10, "a.test"), MX(20, "b.test"))
    r = route("d.test", mx, {"a.test": ok("192.0.2.1")})
    assert isinstance(r, Route)
    assert [h.name for h in r.hosts] == ["a.test"]
