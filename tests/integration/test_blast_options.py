"""`volley blast` options against the scripted sink on loopback: per-session counts,
recipients and domains, size distributions, STARTTLS, AUTH, message files and
templates, the duration cap and stopping early.

Each test runs its own uvloop event loop (sink and load generator together) under a
hard deadline (`_run`), so a bug that would hang fails in seconds instead.
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
from pathlib import Path

import pytest

from engine.lab.blast.message import UNIFORM_STEPS
from engine.lab.blast.run import BlastOptions, Progress, Report, run
from engine.lab.sink.protocol import Sink, start_sink
from tests.integration.test_blast import _against_server, _blast_raw, _run


def _against(sink_kw: dict[str, object], **options: object) -> tuple[Sink, Report]:
    """One run of blast against a fresh sink; (the sink, the report)."""
    return _against_server(lambda: start_sink(keep_segments=False, **sink_kw), **options)  # type: ignore[arg-type]


def _server_tls(tls_files: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files["cert_file"], tls_files["key_file"])
    return ctx


@pytest.mark.parametrize(("n", "c", "m"), [(105, 4, 10), (200, 5, 10), (7, 3, 2), (30, 8, 1)])
def test_connections_opened_are_messages_over_per_session(n: int, c: int, m: int) -> None:
    sink, report = _against({}, messages=n, concurrency=c, messages_per_session=m)
    assert report.accepted == len(sink.messages) == n and report.ok
    # Each connection claims its -m share before connecting: none is left half-used
    # except the last, and none connects only to say QUIT.
    assert report.connections == sink.connections == math.ceil(n / m)
    assert sink.max_live <= c


def test_recipients_per_message_and_domains_spread() -> None:
    sink, report = _against({}, messages=100, concurrency=4, recipients=3, domains=5)
    assert report.accepted == 100 and report.rcpt_refused == {}
    assert all(len(set(m.rcpt_tos)) == 3 for m in sink.messages)
    per_domain = collections.Counter(r.split("@")[1] for m in sink.messages for r in m.rcpt_tos)
    assert per_domain == {f"d{i}.example": 60 for i in range(5)}  # 300 recipients, evenly


def test_sender_and_recipient_template() -> None:
    sink, report = _against({}, messages=20, concurrency=2, domains=4,
                            sender="load@gen.test", rcpt_template="user{n}@d{d}.example")
    assert report.accepted == 20
    assert {m.mail_from for m in sink.messages} == {"load@gen.test"}
    rcpts = {r for m in sink.messages for r in m.rcpt_tos}
    assert rcpts == {f"user{i}@d{i}.example" for i in range(4)}
    assert all(m.data.startswith(b"From: <load@gen.test>\r\n") for m in sink.messages)


def test_weighted_size_distribution_lands_in_exact_proportions() -> None:
    # Weights reduce to 14:5:1, a schedule of 20 messages: 200 messages are 10 rounds.
    sink, report = _against({}, messages=200, concurrency=5, sizes="1k:70,10k:25,100k:5")
    assert report.accepted == 200
    sizes = collections.Counter(len(m.data) for m in sink.messages)
    assert sizes == {1000: 140, 10000: 50, 100000: 10}


def test_uniform_size_range_spreads_over_the_range() -> None:
    sink, report = _against({}, messages=2 * UNIFORM_STEPS, concurrency=3, sizes="1k-2KiB",
                            chain=False)
    assert report.accepted == 2 * UNIFORM_STEPS
    sizes = collections.Counter(len(m.data) for m in sink.messages)
    assert min(sizes) == 1000 and max(sizes) == 2048
    assert len(sizes) == UNIFORM_STEPS and set(sizes.values()) == {2}


def test_message_file_arrives_as_written(tmp_path: Path) -> None:
    text = (b"From: <a@b.test>\nTo: <c@d.test>\nSubject: file {n}\n\n"
            b"first line\n.a line that starts with a dot\n..two dots\nlast")
    path = tmp_path / "m.eml"
    path.write_bytes(text)
    sink, report = _against({}, messages=30, concurrency=3, message_file=str(path))
    assert report.accepted == 30
    expected = text.replace(b"\n", b"\r\n") + b"\r\n"  # CRLF, and a final line end
    assert {m.data for m in sink.messages} == {expected}  # dots unstuffed, braces kept


def test_message_template_substitutes_number_and_id(tmp_path: Path) -> None:
    path = tmp_path / "t.eml"
    path.write_bytes(b"Message-ID: <{id}@blast.test>\r\nSubject: number {n}\r\n\r\n.{n}.\r\n")
    sink, report = _against({}, messages=40, concurrency=4, message_file=str(path), template=True)
    assert report.accepted == 40
    subjects, ids = set(), set()
    for m in sink.messages:
        head, _, body = m.data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        n = lines[1].removeprefix(b"Subject: number ")
        assert body == b"." + n + b".\r\n"  # the stuffed dot survives substitution
        subjects.add(int(n))
        ids.add(lines[0])
    assert subjects == set(range(40)) and len(ids) == 40


def test_starttls_with_and_without_verification(tls_files: dict[str, str]) -> None:
    tls = {"starttls_context": _server_tls(tls_files)}
    sink, report = _against(tls, messages=40, concurrency=2, tls=True)
    assert report.accepted == 40 and report.ok
    assert all(m.tls for m in sink.messages) and len(sink.messages) == 40

    sink, report = _against(tls, messages=40, concurrency=2, tls=True, tls_verify=True,
                            tls_ca=tls_files["ca_file"])
    assert report.accepted == 40 and all(m.tls for m in sink.messages)


def test_starttls_verification_failure_sends_nothing(tls_files: dict[str, str]) -> None:
    # The certificate chains to a CA the client was not given.
    sink, report = _against({"starttls_context": _server_tls(tls_files)}, messages=10,
                            concurrency=2, tls=True, tls_verify=True)
    assert report.accepted == 0 and report.attempted == 0 and sink.messages == []
    assert report.errors == {"tls: SSLCertVerificationError": 6}  # 3 tries per session
    assert report.unsent == 10 and report.stopped == "gave up" and not report.ok


def test_tls_required_but_not_offered_sends_nothing_in_plaintext() -> None:
    sink, report = _against({}, messages=10, concurrency=1, tls=True)
    assert report.errors == {"STARTTLS not offered": 3} and report.attempted == 0
    assert sink.messages == [] and ("MAIL", "FROM:<blast@volley.test>") not in sink.commands


def test_auth_plain_after_starttls(tls_files: dict[str, str]) -> None:
    sink_kw = {"starttls_context": _server_tls(tls_files), "auth": {"alice": "s3cret:x"}}
    sink, report = _against(sink_kw, messages=30, concurrency=3, messages_per_session=10,
                            tls=True, auth="alice:s3cret:x")
    assert report.accepted == 30 and report.ok
    assert sink.auth_users == ["alice"] * 3  # once per connection
    assert report.options.auth == "alice:***"  # the report does not carry the password


def test_auth_refused_is_an_error_not_a_message(tls_files: dict[str, str]) -> None:
    sink_kw = {"starttls_context": _server_tls(tls_files), "auth": {"alice": "s3cret"}}
    sink, report = _against(sink_kw, messages=10, concurrency=1, tls=True, auth="alice:wrong")
    assert report.errors == {"auth 535": 3} and report.accepted == 0 and sink.messages == []
    assert report.unsent == 10 and not report.ok


def test_duration_without_count_runs_until_the_cap() -> None:
    sink, report = _against({}, messages=0, concurrency=3, rate=100.0, duration=0.5)
    # 100 msgs/s for 0.5 s: tickets due at 0, 0.01, ... 0.49 s. The duration ended the run
    # (not the count); the wall time is only bounded from below, with room for a ticket
    # started a little early (take_now's 0.5 ms) and for two clocks read a moment apart.
    assert report.stopped == "duration" and report.ok
    assert report.elapsed >= 0.45
    assert 0 < report.accepted == len(sink.messages) <= 50
    assert report.unsent == 0 and report.connections == 3


def test_stop_starts_no_more_messages_and_lets_those_in_flight_finish() -> None:
    async def scenario() -> tuple[Sink, Report, list[Progress]]:
        sink = await start_sink(keep_segments=False)
        stop = asyncio.Event()
        seen: list[Progress] = []

        def progress(p: Progress) -> None:
            seen.append(p)
            if p.accepted >= 20:
                stop.set()

        try:
            options = BlastOptions(port=sink.port, messages=10_000, concurrency=4, rate=200.0)
            report = await run(options, progress=progress, interval=0.05, stop=stop)
            return sink, report, seen
        finally:
            await sink.close()

    sink, report, seen = _run(scenario)
    assert report.stopped == "interrupted" and not report.ok
    assert 20 <= report.accepted == len(sink.messages) < 10_000
    assert report.failed == 0 and report.refused == {}
    assert report.accepted + report.unsent == 10_000
    assert seen and all(p.total == 10_000 for p in seen)
    assert [p.accepted for p in seen] == sorted(p.accepted for p in seen)


class _SilentAfterStartTls(asyncio.Protocol):
    """Offers STARTTLS, says 220 to it, then never answers the handshake."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.t.write(b"220 silent.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"EHLO"):
            self.t.write(b"250-silent.test\r\n250 STARTTLS\r\n")
        elif data.startswith(b"STARTTLS"):
            self.t.write(b"220 go ahead\r\n")


def test_stalled_tls_handshake_times_out_once_per_connection() -> None:
    report = _run(lambda: _blast_raw(_SilentAfterStartTls, messages=5, concurrency=2, tls=True,
                                     timeout=0.3))
    assert report.errors == {"timeout": 6}  # 3 connections per session, one error each
    assert report.attempted == 0 and report.unsent == 5 and report.stopped == "gave up"
