"""[[egress]] end to end on loopback aliases: outbound connections bind to the pool's
source addresses (127.0.0.20, 127.0.0.21) and greet with each entry's ehlo_name, as the
receiving sink sees them (its peer address and the EHLO it was given); one entry moves
all mail; a tenant's mail leaves from its pool, HTTP mail from the pool its request
names; and with a warm-up schedule of 3 an hour on one source, the mail beyond that
leaves from the other.

No timing assertions: each test waits for the sink's count, then looks at who sent it."""

from __future__ import annotations

import time
from collections import Counter

from tests.integration.harness import merge
from tests.integration.http_helpers import http_overrides, inject, newsletter
from tests.integration.relay_helpers import (
    SENDER,
    Lab,
    body,
    lab,  # noqa: F401  (fixture)
    send_many,
)

A = {"name": "a", "source_address": "127.0.0.20", "ehlo_name": "mta20.volley.test"}
B = {"name": "b", "source_address": "127.0.0.21", "ehlo_name": "mta21.volley.test"}
ZONE = {
    "eg.test": {"MX": [(10, "mx.eg.test")]},
    "other.test": {"MX": [(10, "mx.eg.test")]},
    "mx.eg.test": {"A": ["127.0.0.3"]},
}


def _send(lab: Lab, n: int, domain: str = "eg.test", extra: str = "") -> None:
    assert lab.server is not None
    items = [([f"r{i}@{domain}"], body(f"eg-{domain}-{i}", extra=extra)) for i in range(n)]
    send_many(lab.server.port, items)


def _senders(messages: list) -> Counter[tuple[str, str]]:
    return Counter((m.peer, m.ehlo) for m in messages)


def test_one_egress_entry_moves_all_mail_to_its_address_and_name(lab: Lab):
    sink = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    lab.start({"egress": [A], "delivery": {"source_address": "127.0.0.1", "helo_name": "old.volley.test"}})
    _send(lab, 2)
    _send(lab, 2, "other.test")
    lab.wait_sink(sink, 4)
    assert _senders(sink.messages) == {("127.0.0.20", "mta20.volley.test"): 4}
    lab.wait_queue_empty()


def test_without_egress_the_delivery_source_and_name_are_used(lab: Lab):
    sink = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    lab.start({"delivery": {"source_address": "127.0.0.22", "helo_name": "plain.volley.test"}})
    _send(lab, 2)
    lab.wait_sink(sink, 2)
    assert _senders(sink.messages) == {("127.0.0.22", "plain.volley.test"): 2}


def test_a_pool_of_two_shares_the_jobs_by_weight_each_with_its_own_name(lab: Lab):
    sink = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    lab.start({"egress": [{**A, "weight": 3}, B]})
    _send(lab, 8)
    lab.wait_sink(sink, 8)
    assert _senders(sink.messages) == {("127.0.0.20", "mta20.volley.test"): 6,
                                       ("127.0.0.21", "mta21.volley.test"): 2}
    lab.wait_log(lambda e: e["outcome"] == "delivered", count=8)


def test_a_tenants_mail_leaves_from_its_pool(lab: Lab):
    sink = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    lab.start({"egress": [A, {**B, "pool": "acme"}],
               "egress_rules": [{"tenant": "acme", "pool": "acme"}]})
    _send(lab, 2, extra="X-Volley-Tenant: acme\r\n")
    _send(lab, 2, extra="X-Volley-Tenant: someone-else\r\n")
    _send(lab, 1)
    lab.wait_sink(sink, 5)
    by_source: dict[str, set[str]] = {}
    for m in sink.messages:
        by_source.setdefault(m.peer, set()).add(m.rcpt_tos[0])
    assert _senders(sink.messages) == {("127.0.0.21", "mta21.volley.test"): 2,
                                       ("127.0.0.20", "mta20.volley.test"): 3}
    assert len(by_source["127.0.0.21"]) == 2
    assert all(m.mail_from == SENDER for m in sink.messages)


def test_warmup_overflows_beyond_the_hourly_allowance_to_the_warmed_source(lab: Lab):
    sink = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    lab.start({"egress": [A, B], "warmup": [{"source": "b", "schedule": ["day 1: 3/h", "day 2: 100/h"]}]})
    first_hour = int(time.time() // 3600)
    _send(lab, 10)
    lab.wait_sink(sink, 10)
    hours = int(time.time() // 3600) - first_hour + 1  # a clock hour may have begun meanwhile
    senders = _senders(sink.messages)
    from_b = senders[("127.0.0.21", "mta21.volley.test")]
    assert from_b == 3 if hours == 1 else 3 <= from_b <= 3 * hours
    assert senders[("127.0.0.20", "mta20.volley.test")] == 10 - from_b
    lab.wait_queue_empty()
    # The first send's day is kept in the queue's control table, for restarts and ctl.
    assert lab.server is not None
    kept = lab.server.call(lambda: lab.server.store.get_control(b"warmup-start:127.0.0.21"))
    assert kept is not None and len(kept.decode()) == 10  # "YYYY-MM-DD"


# --- the HTTP API's egress_pool -----------------------------------------------------------


def test_the_http_egress_pool_field_picks_the_pool_and_an_unknown_one_is_refused(lab: Lab, tmp_path):
    sink = lab.sink("127.0.0.3")
    lab.zone(ZONE)
    server = lab.start(merge(http_overrides(tmp_path / "http"), {
        "egress": [A, {**B, "pool": "transactional"}],
        "egress_rules": [{"campaign": "spring*", "pool": "default"}]}))
    refused = inject(server.http_port, newsletter(1, domain="eg.test", egress_pool="nope"))
    assert refused.status == 400 and refused.body["field"] == "egress_pool", refused
    assert refused.body["error"] == 'no [[egress]] entry is in pool "nope"'
    # The request's own pool beats the [[egress_rules]] match on its campaign.
    answer = inject(server.http_port, newsletter(2, domain="eg.test", egress_pool="transactional"))
    assert answer.status == 200 and answer.body["success_count"] == 2, answer
    answer = inject(server.http_port, newsletter(1, domain="other.test"))
    assert answer.status == 200, answer
    lab.wait_sink(sink, 3)
    assert _senders(sink.messages) == {("127.0.0.21", "mta21.volley.test"): 2,
                                       ("127.0.0.20", "mta20.volley.test"): 1}
    assert {m.rcpt_tos[0] for m in sink.messages if m.peer == "127.0.0.20"} == {"r0@other.test"}
