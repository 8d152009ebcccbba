"""A fleet's message rate as batched GCRA grants in a real Redis (rates.py): however
much several nodes ask, what Redis grants over a span never exceeds the rate over
that span plus one heartbeat's booking; a node asking alone gets a heartbeat's worth
in one call; busy nodes split the horizon. And the node's side in the shared table
(fleet_share.py): credit spent one per message, local shares while degraded, and a
node alone exactly as before."""

from __future__ import annotations

import asyncio
import time

from engine.cluster.rates import RateGrants, batch_want
from engine.delivery.shared_limits import CREDIT_WAIT, FULL, LimitTable
from tests.cluster.conftest import RedisServer
from tests.cluster.fleet_helpers import started_links

KEY = "provider"


def test_grants_never_exceed_the_rate_over_the_span(redis_server: RedisServer) -> None:
    rate, heartbeat = 200.0, 0.2

    async def main() -> None:
        async with started_links(redis_server.url, "abc", heartbeat=heartbeat, lease_ttl=1.0) as links:
            await check([RateGrants(link) for link in links])

    async def check(grants: list[RateGrants]) -> None:
        # Alone, one call grants a heartbeat's worth (rate × heartbeat = 40). The span
        # starts before it: that first grant is part of what the bound below counts.
        started = time.monotonic()
        first = await grants[0].grant(KEY, rate, 1000)
        assert first.granted == 40, first
        total = first.granted
        by_node = [first.granted, 0, 0]
        while time.monotonic() - started < 1.5:
            for i, g in enumerate(grants):
                got = (await g.grant(KEY, rate, 1000)).granted
                total += got
                by_node[i] += got
            await asyncio.sleep(0.01)
        span = time.monotonic() - started
        # Never more than the rate over the span plus the horizon booked ahead (+1
        # for rounding at each end).
        assert total <= rate * (span + heartbeat) + 2, (total, span)
        assert total >= rate * span * 0.5  # the rate is used, not starved (loose)
        assert min(by_node[1:]) > 0, by_node  # the others got their part too

    asyncio.run(main())


def test_batch_want() -> None:
    # Out of credit: a heartbeat's worth plus one, less what is left.
    assert batch_want(100.0, 1.0, 0.0, 0.0, starved=True) == 101
    assert batch_want(100.0, 1.0, 30.4, 0.0, starved=True) == 71
    # Demand seen: twice the last heartbeat's spending, capped at a heartbeat's worth.
    assert batch_want(100.0, 1.0, 0.0, 20.0, starved=False) == 40
    assert batch_want(100.0, 1.0, 0.0, 90.0, starved=False) == 101
    assert batch_want(100.0, 1.0, 50.0, 10.0, starved=False) == 0  # enough credit
    assert batch_want(100.0, 1.0, 0.0, 0.0, starved=False) == 0  # idle: nothing


def test_table_fleet_shares() -> None:
    table = LimitTable.private()
    slot = table.slot_of("provider")
    assert slot is not None
    # Alone (fleet 0): the whole cap and rate, as before a fleet existed.
    assert [table.acquire_connection(slot, 0, 4, 0.0, 1.0) for _ in range(5)][-1] is FULL
    table.reset_columns([0])
    # In a fleet of 3, no word from Redis: cap 4 ÷ 3 = 1, rate 30 ÷ 3 = 10/s.
    table.set_fleet(3)
    assert table.acquire_connection(slot, 0, 4, 0.0, 1.0) == 0.0
    assert table.acquire_connection(slot, 0, 4, 0.0, 1.0) is FULL
    assert table.node_cap(slot, 4) == 1
    assert table.take_message(slot, 30.0, 10.0) == 0.0
    assert abs(table.take_message(slot, 30.0, 10.0) - 0.1) < 1e-6  # 1/10 s, not 1/30
    table.reset_columns([0])
    # Leased: two leases, then FULL; no lease at all: FULL at once.
    table.set_share(slot, 2)
    assert [table.acquire_connection(slot, 0, 4, 0.0, 2.0) for _ in range(3)] == [0.0, 0.0, FULL]
    table.reset_columns([0])
    table.set_share(slot, 0)
    assert table.acquire_connection(slot, 0, 4, 0.0, 2.0) is FULL
    assert table.node_cap(slot, 4) < 1
    # Rate: no credit → wait and say so (rwanted), whether a pool only looks
    # (message_wait) or asks (take_message); two granted → two go, then wait.
    assert table.message_wait(slot, 30.0, 19.0) == CREDIT_WAIT
    assert table.node_view(slot).rwanted == 19.0
    assert table.take_message(slot, 30.0, 20.0) == CREDIT_WAIT
    assert table.node_view(slot).rwanted == 20.0
    table.set_share(slot, 0, credit=2.0)
    assert table.message_wait(slot, 30.0, 21.0) == 0.0
    assert table.take_message(slot, 1000.0, 21.0) == 0.0
    assert table.take_message(slot, 1000.0, 22.0) == 0.0
    assert table.take_message(slot, 1000.0, 23.0) == CREDIT_WAIT
    view = table.node_view(slot)
    assert view.leased and view.credit == 0.0 and view.granted == 2.0
    # Back to the local share: the credit is dropped, rate ÷ fleet again.
    table.set_share(slot, None, credit=5.0)
    assert not table.node_view(slot).leased and table.node_view(slot).credit == 0.0
    assert table.take_message(slot, 30.0, 30.0) == 0.0
    table.set_fleet(0)
    assert table.node_cap(slot, 4) == 4


def test_a_node_alone_again_clears_the_fleet_count(tmp_path) -> None:
    # A node that ran with [cluster] and restarts without it must not keep dividing
    # its caps by the fleet it left (the supervisor clears the count at start).
    from engine.cluster.coordinator import reset_fleet
    from engine.delivery.shared_limits import table_path

    table = LimitTable.open_shared(table_path(str(tmp_path)))
    slot = table.slot_of("provider")
    assert slot is not None
    table.set_fleet(3)
    assert table.node_cap(slot, 4) == 1
    reset_fleet(str(tmp_path))
    assert table.fleet() == 0 and table.node_cap(slot, 4) == 4
    table.close()
    reset_fleet(str(tmp_path / "none"))  # no table yet: nothing to do, no file made
    assert not (tmp_path / "none").exists()
