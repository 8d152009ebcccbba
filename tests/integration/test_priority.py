"""Message priority end to end: a Volley-Priority: 9 message sent over SMTP after a
newsletter backlog for a throttled provider overtakes the backlog, and the field never
leaves Volley; an untrusted client's field is removed and means nothing.

Assertions are on the order of arrival at the sink, never on elapsed time. The bound
is exact: once the priority message is committed, the next scan of its shard reads
lane 0 first (and has headroom over a full in-flight set), so what the sink receives
between its 250 and itself can only be backlog units already in flight then: at most
`delivery.max_ready` of them, whatever the load on the machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from engine.delivery.holds import HOLDS_KEY, Holds, Throttle, encode_holds
from engine.queue.records import MessageRecord, Recipient
from engine.queue.writetxn import WriteTxn
from tests.integration.feedback_helpers import UNTRUSTED
from tests.integration.harness import InboundServer, merge, wait_until
from tests.integration.relay_helpers import (
    SENDER,
    Lab,
    body,
    lab,  # noqa: F401  (fixture)
    send,
    tag_of,
)

ZONE: dict[str, Any] = {"slow.test": {"MX": [(10, "mx.slow.test")]},
                        "mx.slow.test": {"A": ["127.0.0.2"]}}
BACKLOG = 2_000
MAX_READY = 20


def throttle(server: InboundServer, domain: str, rate: float) -> None:
    """What `volley ctl throttle DOMAIN --rate R --connections 1` does, by hand."""
    holds = Holds({}, {domain: Throttle(domain, max_connections=1, rate=rate, since=time.time())})
    server.call(lambda: server.store.put_control(HOLDS_KEY, encode_holds(holds)))
    server.call(lambda: server.runtime.delivery.set_holds(holds))


def queue_newsletter(server: InboundServer, n: int, chunk: int = 500) -> None:
    """`n` one-recipient messages at the default priority, straight into the queue (as
    the HTTP API would put them, in large commits), then one wake-up of the scheduler."""
    data = body("news", subject="newsletter")
    ctx = server.runtime.ctx
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        ids = server.call(lambda count=count: [ctx.ids.next() for _ in range(count)])
        recs = [MessageRecord(mid, SENDER, [Recipient(f"n{start + i}@slow.test")], time.time(),
                              len(data)) for i, mid in enumerate(ids)]

        def op(w: WriteTxn, recs: list[MessageRecord] = recs) -> None:
            for rec in recs:
                w.put_message(rec, data)

        server.commit(op)
    server.call(server.runtime.delivery.scheduler.wake)


def wait_log_line(lab: Lab, recipient: str) -> dict[str, Any]:
    """The delivery-log line of `recipient`, once written. Only whole lines are read:
    the worker may be writing the next one while the file is read."""
    assert lab.server is not None
    path = Path(lab.server.cfg.log.delivery)
    found: list[dict[str, Any]] = []

    def written() -> bool:
        data = path.read_bytes() if path.exists() else b""
        whole = data[:data.rfind(b"\n") + 1]
        found[:] = [e for e in map(orjson.loads, whole.splitlines()) if e["recipient"] == recipient]
        return bool(found)

    wait_until(written, 20, f"the delivery-log line of {recipient}")
    return found[0]


def test_priority_message_overtakes_a_throttled_newsletter(lab: Lab) -> None:
    sink = lab.sink("127.0.0.2")
    lab.zone(ZONE)
    # One destination may fill the whole in-flight set here: the case the headroom is for.
    server = lab.start({"delivery": {"max_ready": MAX_READY, "max_ready_per_destination": MAX_READY}})
    throttle(server, "slow.test", rate=40.0)
    queue_newsletter(server, BACKLOG)
    lab.wait_sink(sink, 5)  # the backlog flows, its in-flight set is full
    wait_until(lambda: len(server.runtime.delivery.scheduler.inflight) >= MAX_READY, 20,
               "in-flight set full of newsletter units")
    lab.send(["reset@slow.test"], body("reset", subject="password reset",
                                       extra="Volley-Priority: 9\r\n"))
    before = len(sink.messages)  # read after the 250: the message is committed

    def position() -> int | None:
        tags = [tag_of(m.data) for m in list(sink.messages)]
        return tags.index("reset") if "reset" in tags else None

    wait_until(lambda: position() is not None, 30, "the priority message at the sink")
    at = position()
    assert at is not None
    # Ahead of it: only units already in flight when it was committed ...
    assert at - before <= MAX_READY, (before, at)
    # ... so most of the backlog is still queued behind it.
    assert at < BACKLOG // 2
    reset = sink.messages[at]
    assert reset.rcpt_tos == ["reset@slow.test"]
    assert b"volley-priority" not in reset.data.lower()  # ours: it never leaves Volley
    assert all(tag_of(m.data) == "news" for m in sink.messages[:at])
    line = wait_log_line(lab, "reset@slow.test")
    assert line["outcome"] == "delivered"


def test_low_priority_waits_for_the_default(lab: Lab) -> None:
    """Priority 0 (bulk) mail queued first still goes after default mail queued later."""
    sink = lab.sink("127.0.0.2")
    lab.zone(ZONE)
    # One destination may fill the whole in-flight set here: the case the headroom is for.
    server = lab.start({"delivery": {"max_ready": MAX_READY, "max_ready_per_destination": MAX_READY}})
    throttle(server, "slow.test", rate=40.0)
    queue_newsletter(server, 300)
    lab.wait_sink(sink, 5)
    wait_until(lambda: len(server.runtime.delivery.scheduler.inflight) >= MAX_READY, 20,
               "in-flight set full")
    lab.send(["bulk@slow.test"], body("bulk", extra="Volley-Priority: 0\r\n"))
    lab.send(["normal@slow.test"], body("normal"))
    lab.wait_sink(sink, 300 + 2, timeout=60)
    tags = [tag_of(m.data) for m in sink.messages]
    assert tags[-1] == "bulk"  # after the whole default lane, though queued before "normal"
    assert tags.index("normal") < len(tags) - 1


def test_untrusted_clients_priority_is_removed_and_ignored(inbound: Any) -> None:
    # 127.0.0.1 is a client from the internet here, mailing a domain we receive for
    server = inbound(merge(UNTRUSTED, {"relay": {"local_domains": ["example.org"]}}))
    data = (f"From: <{SENDER}>\r\nVolley-Priority: 9\r\nX-Volley-Campaign: c1\r\n"
            "Subject: hi\r\n\r\nbody\r\n").encode()
    qid = send(server.port, ["a@example.org"], data)
    [rec] = [r for r in server.call(lambda: server.store.get_many(list(server.store.iter_ids())))
             if r is not None]
    assert rec.priority == 5 and rec.campaign == ""
    stored = server.call(lambda: server.store.get_body(rec.id))
    assert b"Volley-Priority" not in stored and b"X-Volley-Campaign: c1" in stored
    assert qid
