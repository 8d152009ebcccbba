"""The demo's final report: its counts add up the way blast's summary does, and no
latency is printed when none was measured."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from engine.lab.demo.report import Outcome, render


def _outcome(**blast: object) -> Outcome:
    b = {"attempted": 10, "sent": 8, "accepted": 7, "refused": {550: 2}, "failed": 1,
         "elapsed": 1.0, "msgs_per_s": 7.0, "timed": 7,
         "latency_ms": SimpleNamespace(p50=1.5, p99=3.0), **blast}
    return Outcome(messages=10, size=1024, domains=2, sinks=1, concurrency=2, workers=1,
                   durability="fsync", latency_ms=0.0, blast=SimpleNamespace(**b), delivered=7,
                   out_seconds=1.0, server_cpu=0.1, queue_times=[0.1], workdir=Path("/x"),
                   kept=False)


def test_the_counts_add_up_to_what_was_attempted() -> None:
    text = render(_outcome())
    assert "attempted          10 = accepted 7 + refused 2 + failed 1   (bodies sent 8)" in text
    assert "p50 1.5 ms   p99 3.0 ms" in text and "7 timed" in text


def test_no_latency_when_nothing_was_timed() -> None:
    text = render(_outcome(accepted=0, refused={}, failed=10, sent=0, timed=0,
                           latency_ms=SimpleNamespace(p50=0.0, p99=0.0)))
    assert "latency     n/a" in text and "p50 0.0" not in text
