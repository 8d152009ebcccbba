"""IP warm-up in a real `volley serve` with two workers: a source on day 1 of a
schedule of 4 an hour sends the provider 4 messages from both workers together (the
shared count), the rest overflows to the pool's warmed source, and `volley ctl warmup`
shows the source's day, the allowance, what was used and the headroom left.

No timing assertions; a clock hour that begins during the test is allowed for (the
allowance then counts again, so the exact figures are only asserted within one hour)."""

from __future__ import annotations

import time
from collections import Counter

from engine.lab.sink.protocol import start_sinks
from engine.queue.layout import stable_shard
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import HOME, HOME_IP, body, send_many
from tests.integration.test_pool import free_port

SINK_IP = "127.0.0.3"
DOMAINS = [f"w{i}.test" for i in range(6)]
N, ALLOWANCE = 12, 4


def zone() -> dict[str, object]:
    z: dict[str, object] = {HOME: {"MX": [(10, f"mx.{HOME}")]}, f"mx.{HOME}": {"A": [HOME_IP]},
                            "mx.provider.test": {"A": [SINK_IP]}}
    for domain in DOMAINS:
        z[domain] = {"MX": [(10, "mx.provider.test")]}
    return z


def test_warmup_allowance_holds_across_workers_and_ctl_warmup_shows_it(serve, peers, dns_zone):
    assert {stable_shard(d, 2) for d in DOMAINS} == {0, 1}  # both workers send
    port = free_port(SINK_IP)
    sink = peers.call(start_sinks([(SINK_IP, port)]))
    peers.sinks.append(sink)
    dns = dns_zone(zone())
    server = serve({
        **relay_overrides(dns.port, port),
        "shaping": [{"name": "provider", "mx_suffix": ".provider.test"}],
        "egress": [{"name": "warm", "source_address": "127.0.0.20", "ehlo_name": "warm.volley.test"},
                   {"name": "new", "source_address": "127.0.0.21", "ehlo_name": "new.volley.test"}],
        "warmup": [{"source": "new", "providers": ["provider"],
                    "schedule": [f"day 1: {ALLOWANCE}/h", "day 2-6: 50/h", "day 7: unlimited"]}],
    })
    before = ctl_json(server, "warmup")
    new = next(s for s in before["sources"] if s["name"] == "new")
    assert (new["day"], new["start_from"], new["start"]) == (1, "not sent yet", "")
    assert new["providers"] == [{"provider": "provider", "allowance": ALLOWANCE, "used": 0,
                                 "headroom": ALLOWANCE}]

    first_hour = int(time.time() // 3600)
    send_many(server.port, [([f"u{n}@{DOMAINS[n % len(DOMAINS)]}"], body(f"w{n}")) for n in range(N)])
    wait_until(lambda: len(sink.messages) == N, 60.0, f"{N} messages at the sink")
    shown = ctl_json(server, "warmup")
    one_hour = int(time.time() // 3600) == first_hour

    senders = Counter((m.peer, m.ehlo) for m in sink.messages)
    from_new = senders[("127.0.0.21", "new.volley.test")]
    assert from_new == ALLOWANCE if one_hour else ALLOWANCE <= from_new <= 2 * ALLOWANCE
    assert senders[("127.0.0.20", "warm.volley.test")] == N - from_new

    new = next(s for s in shown["sources"] if s["name"] == "new")
    assert (new["day"], new["start_from"]) == (1, "first send")
    assert new["start"] == time.strftime("%Y-%m-%d", time.gmtime()) or not one_hour
    if one_hour:
        assert new["providers"] == [{"provider": "provider", "allowance": ALLOWANCE,
                                     "used": ALLOWANCE, "headroom": 0}]
    warm = next(s for s in shown["sources"] if s["name"] == "warm")
    assert not warm["scheduled"] and warm["providers"] == []
    text = ctl(server, "warmup").stdout
    assert "new  127.0.0.21  pool default  ehlo new.volley.test" in text
    assert f"day 1 since {new['start']} (first send)" in text
    assert "no warm-up schedule: no cap" in text
