"""engine.control.wire and engine.control.replies: what crosses the worker pipes and the
control socket, encoded and decoded by the same types on both ends."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from engine.control import replies, wire
from engine.delivery.holds import Holds, Suspension, Throttle

TO_WORKER = [
    wire.Start(slot=1, workers=2, config={"server": {"workers": 2}}),
    wire.Reload(config={}),
    wire.Stop(),
    wire.Drain(),
    wire.SetHolds(holds=Holds({"a.test": Suspension("a.test", since=1.0, until=None, reason="r", by="me")},
                              {"b.test": Throttle("b.test", max_connections=2, rate=None, since=2.0)})),
    wire.Flush(domain=None),
    wire.Flush(domain="c.test"),
    wire.MxQuery(domain="d.test", flush=False, ask=7),
]

FROM_WORKER = [
    wire.Ready(slot=0, pid=1234),
    wire.State(slot=0, metrics={"counters": {"received": 3}}, live=wire.Live(
        sessions_in=2, connection_budget=wire.Budget(limit=10, used=1, waiting=0),
        backoffs=[wire.Backoff(site="mx.e.test", domains=["e.test"], until=5.0, reply="421 busy")])),
    wire.MxFlushed(ask=1, flushed=4),
    wire.MxEntries(ask=2, entries=[
        wire.MxEntry(domain="f.test", kind="none", hosts=[], reply="", ttl=0.0),
        wire.MxEntry(domain="g.test", kind="route", ttl=30.0, reply="",
                     hosts=[wire.MxHost(name="mx.g.test", preference=10, addresses=["192.0.2.1"])])]),
    wire.Refused(ask=3, error="delivery is disabled"),
]


@pytest.mark.parametrize("message", TO_WORKER, ids=lambda m: type(m).__name__)
def test_orders_decode_to_what_was_sent(message: wire.ToWorker) -> None:
    line = wire.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.to_worker_decoder.decode(line) == message


@pytest.mark.parametrize("message", FROM_WORKER, ids=lambda m: type(m).__name__)
def test_reports_decode_to_what_was_sent(message: wire.FromWorker) -> None:
    assert wire.from_worker_decoder.decode(wire.encode(message)) == message


def test_an_unknown_or_malformed_message_is_refused_at_the_decoder() -> None:
    with pytest.raises(msgspec.ValidationError):
        wire.to_worker_decoder.decode(b'{"cmd": "format_disk"}\n')
    with pytest.raises(msgspec.ValidationError):
        wire.to_worker_decoder.decode(b'{"cmd": "mx", "flush": "yes"}\n')
    with pytest.raises(msgspec.ValidationError):  # a report is not an order
        wire.to_worker_decoder.decode(wire.encode(wire.Ready(slot=0, pid=1)))


def test_a_worker_state_without_delivery_has_empty_live_figures() -> None:
    state = wire.from_worker_decoder.decode(
        b'{"event": "state", "slot": 0, "metrics": {}, "live": {"sessions_in": 1, "sessions_out": 0}}')
    assert isinstance(state, wire.State)
    assert state.live.sessions_in == 1 and state.live.connection_budget is None and state.live.backoffs == []


def test_replies_put_ok_first_and_keep_their_field_order() -> None:
    assert replies.encode_reply(replies.Done()) == b'{"ok":true}\n'
    assert replies.encode_reply(replies.Failure(error="no")) == b'{"ok":false,"error":"no"}\n'
    drained = orjson.loads(replies.encode_reply(replies.Drain(drained=True, remaining=0, seconds=1.5)))
    assert list(drained) == ["ok", "drained", "remaining", "seconds", "delivering"]
    throttled = orjson.loads(replies.encode_reply(replies.Throttle(throttle=None)))
    assert throttled == {"ok": True, "throttle": None}
