"""`volley ctl campaigns` and the campaign and suppression families of /metrics, against
a real `volley serve`. The counters are written into the queue store before the server
opens it (as outcomes and injections would), so every figure shown is checked against
the counts the test wrote itself; the suppression gauge against entries added by ctl."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.queue import campaigns
from engine.queue.campaigns import OUTCOMES
from engine.queue.store import QueueStore
from tests.integration.control_helpers import ctl, ctl_json

pytestmark = pytest.mark.timeout(120)

# (tenant, campaign, last active, counts): bumped in two steps below.
SEED: list[tuple[str, str, float, dict[str, Any]]] = [
    ("acme", "spring", 1_700_000_400.0, {"injected": 10, "delivered": 6, "deferred": 2,
                                          "bounced": {"mailbox": 2, "policy": 1}, "suppressed": 1,
                                          "complained": 1}),
    ("acme", "summer", 1_700_000_300.0, {"injected": 5, "delivered": 5}),
    ("globex", "launch", 1_700_000_200.0, {"injected": 7, "bounced": {"domain": 3},
                                            "suppressed": 2}),
    ("", "plain", 1_700_000_100.0, {"injected": 4, "deferred": 4, "complained": 2}),
]


def seed(queue: Path) -> None:
    store = QueueStore(str(queue), map_size=256 << 20)
    try:
        for tenant, name, at, counts in SEED:
            half = {k: v for k, v in counts.items() if k != "bounced"}
            store.write_one(lambda w, t=tenant, n=name, a=at, c=half: campaigns.bump(
                w, t, n, now=a - 50, **c))
            if "bounced" in counts:
                store.write_one(lambda w, t=tenant, n=name, a=at, c=counts: campaigns.bump(
                    w, t, n, now=a, bounced=c["bounced"]))
            else:
                store.write_one(lambda w, t=tenant, n=name, a=at: campaigns.bump(w, t, n, now=a))
    finally:
        store.close()


def expected(tenant: str, name: str) -> dict[str, int]:
    (counts,) = [c for t, n, _, c in SEED if (t, n) == (tenant, name)]
    out = {k: counts.get(k, 0) for k in OUTCOMES if k != "bounced"}
    out["bounced"] = sum((counts.get("bounced") or {}).values())
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_campaigns_table_and_json(serve, tmp_path: Path):
    seed(tmp_path / "seeded")
    server = serve({"queue": {"path": str(tmp_path / "seeded")}})
    rows = ctl_json(server, "campaigns")["campaigns"]
    assert [(r["tenant"], r["campaign"]) for r in rows] == [(t, n) for t, n, _, _ in SEED]
    for r in rows:
        assert {k: r[k] for k in OUTCOMES} == expected(r["tenant"], r["campaign"])
    spring = rows[0]
    assert spring["bounced_by_class"] == {"mailbox": 2, "policy": 1}
    assert (spring["first_at"], spring["last_at"]) == (1_700_000_350.0, 1_700_000_400.0)
    assert [r["campaign"] for r in ctl_json(server, "campaigns", "--tenant", "acme")["campaigns"]] == [
        "spring", "summer"]
    one = ctl_json(server, "campaigns", "--tenant", "globex", "--campaign", "launch")["campaigns"]
    assert [r["injected"] for r in one] == [7]
    assert ctl_json(server, "campaigns", "--campaign", "launch")["campaigns"] == []  # tenant ""
    assert [r["campaign"] for r in ctl_json(server, "campaigns", "--limit", "1")["campaigns"]] == [
        "spring"]
    lines = ctl(server, "campaigns").stdout.splitlines()
    assert lines[0].split() == ["TENANT", "CAMPAIGN", "INJECTED", "DELIVERED", "DEFERRED",
                                "BOUNCED", "SUPPRESSED", "COMPLAINED", "LAST", "ACTIVE"]
    assert lines[1].split()[:10] == ["acme", "spring", "10", "6", "2", "3", "(mailbox", "2,",
                                     "policy", "1)"]
    assert lines[4].split()[:2] == ["-", "plain"]


def samples(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_show_the_top_campaigns_and_sum_the_rest(serve, tmp_path: Path):
    seed(tmp_path / "seeded")
    port = free_port()
    server = serve({"queue": {"path": str(tmp_path / "seeded")}, "campaigns": {"metrics_top": 2},
                    "metrics": {"listen": f"127.0.0.1:{port}"}})
    ctl(server, "suppress", "add", "a@x.example")
    ctl(server, "suppress", "add", "x.example", "--tenant", "acme")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        over_http = samples(resp.read().decode())
    for got in (over_http, samples(ctl(server, "metrics").stdout)):
        (entries,) = got["volley_suppression_entries"]
        assert entries.value == 2
        # prometheus_client names a counter family without its _total
        figures = {(s.labels["tenant"], s.labels["campaign"], s.labels["outcome"]): s.value
                   for s in got["volley_campaign_messages"]}
        want: dict[tuple[str, str, str], float] = {}
        for tenant, name in (("acme", "spring"), ("acme", "summer")):
            for outcome, n in expected(tenant, name).items():
                want[(tenant, name, outcome)] = n
        for outcome in OUTCOMES:
            want[("", "other", outcome)] = (expected("globex", "launch")[outcome]
                                            + expected("", "plain")[outcome])
        assert figures == want
