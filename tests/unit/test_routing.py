"""drop_self (RFC 5321 §5.1 loop detection by listener address) and address keys."""

from __future__ import annotations

from engine.delivery.routing import drop_self
from engine.dns.mx import Route, RouteError, RouteHost, address_key

HOSTS = (RouteHost("mx1.d.test", 10, ("127.0.0.2", "::2")), RouteHost("mx2.d.test", 20, ("127.0.0.3",)))
ROUTE = Route("d.test", HOSTS, "mx1.d.test,mx2.d.test", address_key=address_key(HOSTS))


def test_address_key_is_the_sorted_set_of_addresses() -> None:
    assert ROUTE.address_key == "ip:127.0.0.2,127.0.0.3,::2"
    swapped = (HOSTS[1], RouteHost("other.test", 5, ("::2", "127.0.0.2")))
    assert address_key(swapped) == ROUTE.address_key  # names and order do not matter


def test_nothing_of_ours_keeps_the_very_same_route() -> None:
    assert drop_self(ROUTE, 25, {("127.0.0.9", 25), ("127.0.0.2", 2525)}) is ROUTE
    assert drop_self(ROUTE, 25, set()) is ROUTE


def test_our_address_at_a_lower_preference_is_dropped_and_rekeyed() -> None:
    r = drop_self(ROUTE, 25, {("127.0.0.3", 25)})
    assert isinstance(r, Route) and [h.name for h in r.hosts] == ["mx1.d.test"]
    assert r.address_key == "ip:127.0.0.2,::2" and r.site_key == ROUTE.site_key


def test_our_address_as_the_best_mx_is_a_loop() -> None:
    r = drop_self(ROUTE, 25, {("::2", 25)})
    assert isinstance(r, RouteError) and (r.reply.code, r.reply.enhanced) == (554, "5.4.6")
