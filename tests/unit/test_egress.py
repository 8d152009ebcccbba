"""[[egress]] pool selection (egress.py) and warm-up allowances (warmup.py), pure:
real config, real jobs, a private warm-up table and a fixed clock."""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

import msgspec

from engine.config import from_dict
from engine.control.render_warmup import render_warmup
from engine.control.warmup_view import build
from engine.delivery.egress import EgressPools
from engine.delivery.job import Job, JobResult, PoolSettings
from engine.delivery.warmup import Warmup, put_start_op, start_key
from engine.delivery.warmup_table import WarmupTable, table_path
from engine.dns.mx import Route, RouteHost
from engine.queue.records import MessageRecord, Recipient

# 2025-03-10 12:30:00 UTC
NOON = datetime.datetime(2025, 3, 10, 12, 30, tzinfo=datetime.UTC).timestamp()
ROUTE = Route("example.com", (RouteHost("mx.example.com", 10, ("192.0.2.1",)),), site_key="mx.example.com")


def job(tenant: str = "", campaign: str = "", egress_pool: str = "") -> Job:
    rec = MessageRecord(b"\0" * 16, "a@b.example", [Recipient("x@example.com")], 0.0, 10,
                        tenant=tenant, campaign=campaign, egress_pool=egress_pool)
    return Job(rec, b"body", [0], "example.com", ROUTE, lambda r: None, 0.0)


class Lab:
    def __init__(self, data: dict[str, Any], kept: dict[bytes, bytes] | None = None) -> None:
        self.cfg = from_dict({"server": {"hostname": "mta.example.com"}, **data})
        self.kept = dict(kept or {})
        self.ops: list[Any] = []
        self.now = NOON
        self.table = WarmupTable.private()
        self.warmup = Warmup(self.table, self.kept.get, self.ops.append, clock=lambda: self.now)
        self.egress = EgressPools(self.cfg, self.warmup)

    def pick(self, n: int = 1, settings: PoolSettings | None = None, **kw: str) -> list[str]:
        out = []
        for _ in range(n):
            chosen = self.egress.choose(job(**kw), settings or PoolSettings(), 100.0)
            out.append(chosen.source_address if isinstance(chosen, PoolSettings) else "held")
        return out


E = [{"name": "a", "source_address": "127.0.0.20", "ehlo_name": "a.example.com"},
     {"name": "b", "source_address": "127.0.0.21", "ehlo_name": "b.example.com"}]


def test_no_egress_keeps_the_delivery_settings():
    lab = Lab({"delivery": {"source_address": "127.0.0.5"}})
    assert not lab.egress.active
    base = PoolSettings(source_address="127.0.0.5")
    assert lab.egress.choose(job(), base, 0.0) is base


def test_one_entry_moves_all_mail_and_greets_with_its_name():
    lab = Lab({"egress": [E[0]]})
    chosen = lab.egress.choose(job(tenant="t"), PoolSettings(helo_name="old.example"), 0.0)
    assert isinstance(chosen, PoolSettings)
    assert (chosen.source_address, chosen.helo_name) == ("127.0.0.20", "a.example.com")
    # The same base settings and source give the same object (the pool's identity check).
    assert lab.egress.choose(job(), PoolSettings(), 0.0) == chosen


def test_an_entry_without_ehlo_name_greets_with_the_delivery_name():
    lab = Lab({"egress": [{"name": "a", "source_address": "127.0.0.20"}],
               "delivery": {"helo_name": "relay.example.com"}})
    chosen = lab.egress.choose(job(), PoolSettings(), 0.0)
    assert isinstance(chosen, PoolSettings) and chosen.helo_name == "relay.example.com"


def test_weighted_round_robin_is_smooth_and_exact():
    lab = Lab({"egress": [{**E[0], "weight": 3}, E[1]]})
    picks = lab.pick(8)
    assert Counter(picks) == {"127.0.0.20": 6, "127.0.0.21": 2}
    # Interleaved, not 3 in a row then 1: nginx's smooth order a a b a | a a b a.
    assert picks[:4] == ["127.0.0.20", "127.0.0.20", "127.0.0.21", "127.0.0.20"]


def test_equal_weights_alternate():
    assert Lab({"egress": E}).pick(4) == ["127.0.0.20", "127.0.0.21"] * 2


def test_pool_precedence_message_then_rules_then_route_then_default():
    lab = Lab({
        "egress": [E[0], {**E[1], "pool": "acme"},
                   {"name": "c", "source_address": "127.0.0.22", "pool": "spring"},
                   {"name": "d", "source_address": "127.0.0.23", "pool": "corp"}],
        "egress_rules": [{"tenant": "acme", "campaign": "spring*", "pool": "spring"},
                         {"tenant": "acme", "pool": "acme"},
                         {"campaign": "spring*", "pool": "default"}],
    })
    routed = PoolSettings(egress_pool="corp")
    assert lab.pick() == ["127.0.0.20"]  # nothing names a pool: "default"
    assert lab.pick(settings=routed) == ["127.0.0.23"]  # the route's
    assert lab.pick(settings=routed, tenant="acme") == ["127.0.0.21"]  # a rule beats the route
    assert lab.pick(tenant="acme", campaign="spring-sale") == ["127.0.0.22"]  # first match wins
    assert lab.pick(tenant="other", campaign="spring-sale", settings=routed) == ["127.0.0.20"]
    assert lab.pick(tenant="acme", egress_pool="corp") == ["127.0.0.23"]  # the message's own
    assert lab.pick(egress_pool="gone") == ["127.0.0.20"]  # unknown now (a reload): default


def test_an_empty_default_pool_keeps_the_delivery_settings():
    lab = Lab({"egress": [{**E[1], "pool": "acme"}], "egress_rules": [{"tenant": "acme", "pool": "acme"}]})
    base = PoolSettings(source_address="")
    assert lab.egress.choose(job(), base, 0.0) is base
    assert lab.pick(tenant="acme") == ["127.0.0.21"]


WARM = {"egress": E, "warmup": [{"source": "b", "schedule": ["day 1: 3/h", "day 2-3: 5/h"]}]}


def test_warmup_overflows_to_the_warmed_source_beyond_the_allowance():
    lab = Lab(WARM)
    picks = lab.pick(20)
    assert picks.count("127.0.0.21") == 3  # day 1: 3 an hour
    assert picks.count("127.0.0.20") == 17
    assert lab.ops, "the first send's day is kept"
    lab.now += 3600  # the next hour: 3 more
    assert lab.pick(20).count("127.0.0.21") == 3
    lab.now += 86400  # day 2: 5 an hour
    assert lab.pick(20).count("127.0.0.21") == 5
    lab.now += 2 * 86400  # day 4: past the last line's range, warmed
    assert lab.pick(20).count("127.0.0.21") == 10


def test_every_source_held_defers_until_the_next_hour():
    lab = Lab({"egress": [E[1]], "warmup": [{"source": "b", "schedule": ["day 1: 2/h"]}]})
    assert lab.pick(2) == ["127.0.0.21"] * 2
    held = lab.egress.choose(job(), PoolSettings(), 100.0)
    assert isinstance(held, JobResult) and not held.destination_failed
    assert held.replies[0].code == 451 and held.replies[0].enhanced == "4.4.5"
    assert held.retry_after == 100.0 + 1800  # 12:30 → 13:00 in loop time


def test_allowance_is_per_provider_and_only_for_the_listed_ones():
    lab = Lab({"egress": E, "shaping": [{"name": "gmail", "mx_suffix": ".google.com"},
                                        {"name": "yahoo", "domain": "yahoo.com"}],
               "warmup": [{"source": "b", "schedule": ["day 1: 2/h"], "providers": ["gmail", "*"]}]})
    gmail, yahoo, other = (PoolSettings(provider="gmail"), PoolSettings(provider="yahoo"), PoolSettings())
    assert lab.pick(10, settings=gmail).count("127.0.0.21") == 2
    assert lab.pick(10, settings=other).count("127.0.0.21") == 2  # "*": its own allowance
    assert lab.pick(10, settings=yahoo).count("127.0.0.21") == 5  # not listed: not held


def test_the_day_counts_from_the_configured_start_or_the_kept_first_send():
    day3 = datetime.date(2025, 3, 8).isoformat()
    lab = Lab({**WARM, "warmup": [{**WARM["warmup"][0], "start": day3}]})
    assert lab.warmup.day("127.0.0.21", lab.now) == 3
    assert lab.pick(20).count("127.0.0.21") == 5 and not lab.ops
    kept = Lab(WARM, kept={start_key("127.0.0.21"): b"2025-03-09"})
    assert kept.warmup.day("127.0.0.21", kept.now) == 2 and kept.pick(20).count("127.0.0.21") == 5
    future = Lab({**WARM, "warmup": [{**WARM["warmup"][0], "start": "2025-04-01"}]})
    assert future.pick(5) == ["127.0.0.20"] * 5  # not before its start


def test_start_op_keeps_the_first_write():
    class Txn:
        def __init__(self) -> None:
            self.data: dict[bytes, bytes] = {}

        def put(self, key: bytes, value: bytes, db: object) -> None:
            self.data[key] = value

    class Store:
        _ctl = object()

    class W:
        def __init__(self) -> None:
            self.txn = Txn()
            self._store = Store()

        def get_control(self, key: bytes) -> bytes | None:
            return self.txn.data.get(key)

    w = W()
    put_start_op(b"k", b"2025-03-10")(w)  # type: ignore[arg-type]
    put_start_op(b"k", b"2025-03-11")(w)  # type: ignore[arg-type]
    assert w.txn.data == {b"k": b"2025-03-10"}


def test_shared_table_counts_across_processes_by_hour(tmp_path):
    path = str(tmp_path / "warmup.shm")
    one, two = WarmupTable.open(path), WarmupTable.open(path)
    try:
        assert [one.take("127.0.0.21", "gmail", 7, 3) for _ in range(2)] == [True, True]
        assert two.take("127.0.0.21", "gmail", 7, 3) and not two.take("127.0.0.21", "gmail", 7, 3)
        assert one.used("127.0.0.21", "gmail", 7) == 3 and one.used("127.0.0.21", "gmail", 8) == 0
        assert two.take("127.0.0.21", "gmail", 8, 3)  # a new hour starts from 0
        reader = WarmupTable.open_readonly(path)
        assert reader is not None and reader.used("127.0.0.21", "gmail", 8) == 1
        assert reader.used("127.0.0.99", "gmail", 8) == 0
        reader.close()
    finally:
        one.close()
        two.close()


def test_ctl_warmup_figures_from_the_config_the_kept_day_and_the_shared_table(tmp_path):
    data = {"queue": {"path": str(tmp_path)}, "egress": E,
            "shaping": [{"name": "gmail", "mx_suffix": ".google.com"}],
            "warmup": [{"source": "b", "start": "2025-03-09", "schedule": ["day 1: 3/h", "day 2: 7/h"]}]}
    cfg = from_dict({"server": {"hostname": "mta.example.com"}, **data})
    assert [s.day for s in build(cfg, {}.get, NOON).sources] == [None, 2]  # no table yet: 0 used
    table = WarmupTable.open(table_path(str(tmp_path)))
    try:
        assert table.take("127.0.0.21", "gmail", int(NOON // 3600), 7)
    finally:
        table.close()
    reply = build(cfg, {}.get, NOON)
    b = reply.sources[1]
    assert (b.start, b.start_from, b.day, reply.hour) == ("2025-03-09", "config", 2, "2025-03-10T12:00Z")
    assert [(p.provider, p.allowance, p.used, p.headroom) for p in b.providers] == [
        ("gmail", 7, 1, 6), ("*", 7, 0, 7)]
    text = render_warmup(msgspec.to_builtins(reply), NOON)
    assert "day 2 since 2025-03-09 (config)" in text and "gmail" in text
    empty = from_dict({"queue": {"path": str(tmp_path)}})
    assert render_warmup(msgspec.to_builtins(build(empty, {}.get, NOON)), NOON).startswith("no [[egress]]")
