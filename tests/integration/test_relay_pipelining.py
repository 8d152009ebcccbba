"""How the relay talks to a destination: one connection for many messages, commands
pipelined (RFC 2920) and chained, lockstep without PIPELINING, BDAT with CHUNKING
(RFC 3030), and the backoff after a 421."""

from __future__ import annotations

import threading
import time

from tests.integration.harness import wait_until
from tests.integration.relay_helpers import (
    Lab,
    body,
    lab,  # noqa: F401  (fixture)
    send_many,
    tag_of,
)

ZONE = {
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.2"]},
}


def test_fifty_messages_share_one_connection_pipelined_and_chained(lab: Lab):
    sink = lab.sink("127.0.0.2")
    # The MX answer is held back 1.5 s (it is cached afterwards) so most of the 50
    # messages are queued when the pool starts: transactions then chain back to back.
    lab.zone({**ZONE, "dest.test": {"delay": 1.5, "MX": [(10, "mx.dest.test")]}})
    server = lab.start({"delivery": {"max_connections_per_domain": 1}, "dns": {"timeout": "4s"}})
    started = time.monotonic()
    send_many(server.port, [(["bob@dest.test"], body(f"m{i}")) for i in range(50)])
    print(f"50 messages queued in {time.monotonic() - started:.2f}s")
    lab.wait_sink(sink, 50, timeout=30)
    assert sorted(tag_of(m.data) for m in sink.messages) == sorted(f"m{i}" for i in range(50))
    assert sink.connections == 1, sink.connections
    # RFC 2920: MAIL, RCPT and DATA of one transaction travel in one segment ...
    assert any(b"MAIL FROM:" in s and b"RCPT TO:" in s and b"DATA\r\n" in s for s in sink.segments)
    # ... and the next transaction rides on the previous one's end of data.
    assert any(b"\r\n.\r\nMAIL FROM:" in s for s in sink.segments), "no chained transaction"
    lab.wait_queue_empty()
    lines = lab.wait_log(lambda e: e["outcome"] == "delivered", 50)
    assert len(lines) == 50


def test_lockstep_without_pipelining(lab: Lab):
    sink = lab.sink("127.0.0.2", pipelining=False)
    lab.zone(ZONE)
    server = lab.start()
    send_many(server.port, [(["bob@dest.test", "carol@dest.test"], body(f"l{i}")) for i in range(3)])
    lab.wait_sink(sink, 3)
    assert all(m.rcpt_tos == ["bob@dest.test", "carol@dest.test"] for m in sink.messages)
    for seg in sink.segments:
        commands = sum(seg.count(v) for v in (b"MAIL FROM:", b"RCPT TO:", b"DATA\r\n"))
        assert commands <= 1, f"commands pipelined to a server without PIPELINING: {seg!r}"
    lab.wait_queue_empty()


def test_bdat_with_chunking(lab: Lab):
    sink = lab.sink("127.0.0.2", chunking=True)
    lab.zone(ZONE)
    lab.start()
    data = body("bdat", extra="X-Dots: yes\r\n") + b".leading dot line\r\n"
    lab.send(["bob@dest.test"], data)
    lab.wait_sink(sink, 1)
    verbs = [v for v, _ in sink.commands]
    assert "BDAT" in verbs and "DATA" not in verbs, verbs
    got = sink.messages[0].data
    assert got.endswith(b"\r\n.leading dot line\r\n"), got[-60:]  # BDAT: no dot-stuffing
    lab.wait_queue_empty()


def test_421_backs_the_destination_off(lab: Lab):
    """After a 421 the destination gets no new connection until `backoff` has passed,
    although the retry schedule alone (200 ms) would try sooner."""
    lock = threading.Lock()
    connected: list[float] = []
    refused_at: list[float] = []

    def script(verb: str, arg: str) -> str | None:
        with lock:
            if verb == "BANNER":
                connected.append(time.monotonic())
            elif verb == "MAIL" and not refused_at:
                refused_at.append(time.monotonic())
                return "421 4.7.0 too many connections from your host"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    lab.zone(ZONE)
    lab.start({"delivery": {"retry": "200ms", "backoff": "2s", "backoff_max": "4s"}})
    first = lab.send(["bob@dest.test"], body("b1"))
    [deferred] = lab.wait_log(lambda e: e["id"] == first)
    assert (deferred["outcome"], deferred["code"]) == ("deferred", 421), deferred
    # A message arriving during the backoff is not attempted either.
    second = lab.send(["bob@dest.test"], body("b2"))
    lab.wait_sink(sink, 2, timeout=15)
    assert refused_at
    later = [t for t in connected if t > refused_at[0]]
    assert later, connected
    assert min(later) - refused_at[0] >= 1.9, f"reconnected {min(later) - refused_at[0]:.2f}s after the 421"
    lab.wait_log(lambda e: e["id"] == first and e["outcome"] == "delivered")
    assert sorted(tag_of(m.data) for m in sink.messages) == ["b1", "b2"]
    wait_until(lambda: any(e["id"] == second and e["outcome"] == "delivered" for e in lab.log()),
               5, "second logged")
    lab.wait_queue_empty()
