"""Metrics: histogram buckets, snapshot merge, Prometheus text (parsed back with
prometheus_client's own parser), 1/5/15 minute rates, and the /metrics HTTP endpoint
over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.control.metrics_http import CONTENT_TYPE, MAX_HEAD, HttpStats, start_metrics_http
from engine.observe.metrics import (
    BY_CLASS,
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    Gauge,
    Histogram,
    WorkerMetrics,
    gauge,
    render,
)
from engine.observe.rates import RateWindow


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == name and s.labels == labels:
            return s.value
    raise AssertionError(f"no sample {name}{labels} in {family}")


# --- Histogram -----------------------------------------------------------------------

def test_histogram_value_on_a_bound_falls_in_that_bucket() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.0, 1.0, 1.0000001, 2.0, 5.0, 5.5, 1e9):
        h.observe(v)
    snap = h.snapshot()
    # per-bucket (not cumulative): <=1, (1,2], (2,5], >5
    assert snap["counts"] == [2, 2, 1, 2]
    assert snap["count"] == 7
    assert snap["sum"] == pytest.approx(0 + 1 + 1.0000001 + 2 + 5 + 5.5 + 1e9)
    assert snap["bounds"] == [1.0, 2.0, 5.0]


def test_histogram_refuses_unsorted_or_empty_buckets() -> None:
    for bad in ((), (2.0, 1.0), (1.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            Histogram(bad)


def test_worker_snapshot_is_json_encodable_and_has_every_table_entry() -> None:
    m = WorkerMetrics()
    m.received += 3
    m.delivery_latency.observe(0.2)
    snap = msgspec.json.decode(msgspec.json.encode(m.snapshot()))
    assert set(snap["counters"]) == {attr for attr, _, _ in COUNTERS}
    assert set(snap["histograms"]) == {attr for attr, _, _, _ in HISTOGRAMS}
    assert snap["counters"]["received"] == 3
    assert snap["histograms"]["delivery_latency"]["count"] == 1


# --- merge ---------------------------------------------------------------------------

def test_merge_sums_counters_and_histograms() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.received, b.received = 5, 7
    a.dns_cache_hits = 2
    a.queue_time.observe(0.5)
    b.queue_time.observe(0.5)
    b.queue_time.observe(100000.0)
    total = WorkerMetrics.merge([a.snapshot(), b.snapshot()])
    assert total["counters"]["received"] == 12
    assert total["counters"]["dns_cache_hits"] == 2
    assert total["counters"]["delivered"] == 0
    qt = total["histograms"]["queue_time"]
    assert qt["count"] == 3
    assert qt["sum"] == pytest.approx(100001.0)
    assert qt["counts"][2] == 2  # (0.1, 1.0]
    assert qt["counts"][-1] == 1  # above one day
    # a merged total merges again: the supervisor's retired base is such a total
    again = WorkerMetrics.merge([total, a.snapshot()])
    assert again["counters"]["received"] == 17
    assert again["histograms"]["queue_time"]["count"] == 4


def test_merge_of_nothing_is_zero_and_bounds_must_match() -> None:
    zero = WorkerMetrics.merge([])
    assert all(v == 0 for v in zero["counters"].values())
    odd = WorkerMetrics().snapshot()
    odd["histograms"]["delivery_latency"]["bounds"][0] = 0.001
    with pytest.raises(ValueError, match="delivery_latency"):
        WorkerMetrics.merge([WorkerMetrics().snapshot(), odd])


# --- render --------------------------------------------------------------------------

def test_render_parses_and_carries_the_counted_values() -> None:
    m = WorkerMetrics()
    m.received = 41
    m.received_bytes = 123456789012
    m.delivered = 40
    m.connections_out = 3
    for v in (0.004, 0.005, 0.3, 29.0, 31.0):
        m.delivery_latency.observe(v)
    text = render(WorkerMetrics.merge([m.snapshot()]), [])
    fams = families(text)
    # the parser strips _total from a counter's family name
    assert fams["volley_messages_received"].type == "counter"
    assert sample(fams, "volley_messages_received", "volley_messages_received_total") == 41
    assert sample(fams, "volley_received_bytes", "volley_received_bytes_total") == 123456789012
    assert sample(fams, "volley_messages_delivered", "volley_messages_delivered_total") == 40
    assert sample(fams, "volley_connections_out", "volley_connections_out_total") == 3
    assert sample(fams, "volley_messages_bounced", "volley_messages_bounced_total") == 0
    lat = "volley_delivery_latency_seconds"
    assert fams[lat].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in fams[lat].samples if s.name == lat + "_bucket"}
    assert buckets["0.005"] == 2  # cumulative, and 0.005 itself is <= 0.005
    assert buckets["0.25"] == 2
    assert buckets["0.5"] == 3
    assert buckets["30.0"] == 4
    assert buckets["+Inf"] == 5 == sample(fams, lat, lat + "_count")
    assert sample(fams, lat, lat + "_sum") == pytest.approx(0.004 + 0.005 + 0.3 + 29.0 + 31.0)
    values = [buckets[k] for k in buckets]
    assert values == sorted(values)
    # every table name is exported exactly once
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)) == len(COUNTERS) + len(BY_CLASS) + len(HISTOGRAMS)


def test_render_gauges_with_labels_needing_escapes() -> None:
    nasty = 'a\\b"c\nd'
    gauges = [
        gauge("volley_queue_messages", 17),
        gauge("volley_sessions_in", 3, {"worker": "0"}),
        gauge("volley_sessions_in", 4, {"worker": "1"}),
        gauge("volley_uptime_seconds", 12.5),
        gauge("volley_worker_restarts_total", 2),
        Gauge("volley_custom", 'help with \\ and\nnewline', 1.0, {"domain": nasty}),
    ]
    text = render(WorkerMetrics.merge([]), gauges)
    fams = families(text)
    assert sample(fams, "volley_queue_messages", "volley_queue_messages") == 17
    assert sample(fams, "volley_sessions_in", "volley_sessions_in", worker="0") == 3
    assert sample(fams, "volley_sessions_in", "volley_sessions_in", worker="1") == 4
    assert text.count("# TYPE volley_sessions_in gauge") == 1
    assert sample(fams, "volley_uptime_seconds", "volley_uptime_seconds") == 12.5
    assert fams["volley_worker_restarts"].type == "counter"
    assert sample(fams, "volley_worker_restarts", "volley_worker_restarts_total") == 2
    assert sample(fams, "volley_custom", "volley_custom", domain=nasty) == 1.0
    assert fams["volley_custom"].documentation == 'help with \\ and\nnewline'


def test_gauge_names_come_from_the_table() -> None:
    assert gauge("volley_workers", 2).help == GAUGES["volley_workers"][1]
    with pytest.raises(KeyError):
        gauge("volley_not_a_metric", 1)
    with pytest.raises(ValueError):
        render(WorkerMetrics.merge([]), [Gauge("bad-name", "x", 1)])
    with pytest.raises(ValueError):
        render(WorkerMetrics.merge([]), [Gauge("volley_x", "x", 1, {"bad-label": "v"})])


# --- RateWindow ----------------------------------------------------------------------

def test_rates_over_each_window() -> None:
    w = RateWindow()
    # 20 minutes: received 10/s throughout; delivered 6/s for the first 10 min, then 0
    t, received, delivered = 0, 0, 0
    while t <= 1200:
        w.add(1000.0 + t, {"received": received, "delivered": delivered})
        t += 5
        received += 50
        delivered += 30 if t <= 600 else 0
    r = w.rates(1000.0 + 1200)
    assert r["1m"]["received"] == pytest.approx(10.0)
    assert r["5m"]["received"] == pytest.approx(10.0)
    assert r["15m"]["received"] == pytest.approx(10.0)
    assert r["1m"]["delivered"] == 0.0
    assert r["5m"]["delivered"] == 0.0
    # 15 minutes back is t=300: 300 s of 6/s then 600 s of nothing
    assert r["15m"]["delivered"] == pytest.approx(300 * 6 / 900)
    assert r["1m"]["bounced"] == 0.0  # never fed: counts as zero
    assert w.history() == pytest.approx(900.0)  # older samples were dropped


def test_rates_with_short_or_no_history_never_divide_by_zero() -> None:
    w = RateWindow()
    assert w.rates(5.0) == {k: dict.fromkeys(("received", "delivered", "deferred", "bounced",
                                              "seconds"), 0.0)
                            for k in ("1m", "5m", "15m")}
    w.add(10.0, {"received": 5})
    assert w.rates(10.0)["1m"]["received"] == 0.0
    w.add(30.0, {"received": 45})  # 20 s of history: every window uses those 20 s
    r = w.rates(30.0)
    assert r["1m"]["received"] == r["15m"]["received"] == pytest.approx(2.0)
    w.add(31.0, {"received": 0})  # a counter that went down gives 0, not a negative rate
    assert w.rates(31.0)["1m"]["received"] == 0.0


def test_rate_memory_is_bounded_however_often_fed() -> None:
    w = RateWindow(min_interval=1.0)
    for i in range(20000):  # 2000 s at 10 samples a second
        w.add(i / 10, {"received": i})
    assert len(w._samples) <= 900 + 2
    assert w.rates(1999.9)["1m"]["received"] == pytest.approx(10.0, rel=0.02)


# --- HTTP endpoint -------------------------------------------------------------------

async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()  # until the server closes (Connection: close)
    writer.close()
    return data


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    """Poll a real condition on the running loop, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.01)


def _serve(test: Any, **kwargs: Any) -> HttpStats:
    """Run `test(port)` against a server on 127.0.0.1:0, wait for every connection to be
    done with, and fail on any loop error or handler bug."""
    errors: list[dict[str, Any]] = []
    stats = HttpStats()
    m = WorkerMetrics()
    m.received = 9

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        server = await start_metrics_http(
            "127.0.0.1", 0, lambda: render(m.snapshot(), [gauge("volley_workers", 2)]),
            stats=stats, **kwargs)
        try:
            await test(server.sockets[0].getsockname()[1])
            await until(lambda: stats.open == 0, "all connections handled")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert errors == []
    assert stats.errors == 0
    return stats


def test_http_get_metrics_parses() -> None:
    async def test(port: int) -> None:
        status, headers, body = _split(await _request(
            port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"))
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(body)
        fams = families(body.decode())
        assert sample(fams, "volley_messages_received", "volley_messages_received_total") == 9
        assert sample(fams, "volley_workers", "volley_workers") == 2
        # a query string is ignored; HEAD gets the headers only
        status, _, _ = _split(await _request(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"))
        assert status == 200
        status, headers, body = _split(await _request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
        assert status == 200 and body == b"" and int(headers["content-length"]) > 100
    assert _serve(test).replies == {200: 3}


def test_http_404_405_400() -> None:
    async def test(port: int) -> None:
        status, _, _ = _split(await _request(port, b"GET / HTTP/1.1\r\n\r\n"))
        assert status == 404
        status, _, _ = _split(await _request(port, b"GET /metricsx HTTP/1.1\r\n\r\n"))
        assert status == 404
        status, headers, _ = _split(await _request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        for garbage in (b"hello\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET /metrics SMTP/1.0\r\n\r\n",
                        b"\x16\x03\x01\x00\xa5\x01\x00\r\n\r\n", b"G\xffT /metrics HTTP/1.1\r\n\r\n"):
            status, _, _ = _split(await _request(port, garbage))
            assert status == 400, garbage
        # a head over MAX_HEAD: one long header line, and many short ones
        long_line = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        many = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: 0123456789\r\n" * 600 + b"\r\n"
        for raw in (long_line, many):
            status, _, _ = _split(await _request(port, raw))
            assert status == 400
    stats = _serve(test)
    assert stats.replies == {404: 2, 405: 1, 400: 7}
    assert stats.dropped == 0


def test_http_survives_clients_that_vanish_or_stall() -> None:
    async def test(port: int) -> None:
        # disconnect mid-request line, and mid-headers
        for partial in (b"GET /met", b"GET /metrics HTTP/1.1\r\nHost: x"):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(partial)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        # reset outright (RST instead of FIN)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        # a client that sends nothing is dropped after idle_timeout, without a reply
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.read() == b""
        writer.close()
        # and the server still answers
        status, _, _ = _split(await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        assert status == 200
    stats = _serve(test, idle_timeout=0.3)
    assert stats.replies == {200: 1}
    assert stats.dropped == 4  # two half-requests, one reset, one silent client


def test_http_render_failure_is_a_500_not_a_crash() -> None:
    def broken() -> str:
        raise RuntimeError("boom")

    async def main() -> tuple[int, int]:
        server = await start_metrics_http("127.0.0.1", 0, broken)
        port = server.sockets[0].getsockname()[1]
        try:
            first, _, _ = _split(await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
            second, _, _ = _split(await _request(port, b"GET /nope HTTP/1.1\r\n\r\n"))
        finally:
            server.close()
            await server.wait_closed()
        return first, second

    assert asyncio.run(main()) == (500, 404)
