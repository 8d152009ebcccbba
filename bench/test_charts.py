"""bench/charts.py draws bench/run.py's results: real files from a small fixed result set.

Run by `make bench` (its first pytest step); skipped where matplotlib is not installed
(`make test` does not install the bench extra).
"""

from __future__ import annotations

import json
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charts  # noqa: E402  (bench/ is not a package)


def _cell(row: str, system: str, rate: list[float], cpu_s_per_1k: float, ratios: dict[str, float],
          complete: bool = True) -> dict[str, Any]:
    return {"row": row, "row_label": row.replace("-", " "), "system": system, "system_label": system,
            "msgs_per_s": {"median": sorted(rate)[1], "min": min(rate), "max": max(rate)},
            "cpu_s_per_1k": {"median": cpu_s_per_1k, "min": cpu_s_per_1k, "max": cpu_s_per_1k},
            "ratios": ratios, "complete": complete, "runs": []}


RESULTS: dict[str, Any] = {
    "machine": {"date": "2026-12-06T12:00:00+00:00", "commit": "abc1234", "nproc": 2, "cpu_model": "test CPU",
                "loadavg": [1.5, 1.0, 0.5]},
    "load_generator": "smtp-source, 50 sessions", "sink": "smtp-sink",
    "cells": [
        _cell("relay-1k", "volley-fsync", [6400.0, 6558.0, 6700.0], 0.178, {"postfix": 6.578}),
        _cell("relay-1k", "postfix", [990.0, 997.0, 1001.0], 1.535, {}),
        _cell("receive-1k", "volley-fsync", [13000.0, 13457.0, 13600.0], 0.082, {"aiosmtpd": 10.31}),
        _cell("receive-1k", "aiosmtpd", [1300.0, 1305.0, 1310.0], 0.9, {}),
        _cell("scale-queued", "volley-scale", [5000.0, 5100.0, 5200.0], 0.2, {"base": 0.97}, complete=False),
        {"row": "shaping", "system": "volley-shaping", "kind": "shaping", "runs": []},  # no msgs/s: not drawn
    ],
}


@pytest.fixture(scope="module", autouse=True)
def _matplotlib() -> None:
    pytest.importorskip("matplotlib")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_draws_valid_svg_and_png_with_every_figure(tmp_path: Path) -> None:
    paths = charts.draw(RESULTS, tmp_path / "bench")
    assert [p.name for p in paths] == ["bench.svg", "bench.png"]
    root = ET.parse(paths[0]).getroot()  # raises on malformed XML
    assert root.tag.endswith("svg")
    text = " ".join(t for t in root.itertext())
    # Each cell's median and the ratios, as the fixture has them (postfix 6.578 -> "6.6×").
    for label in ("6,558", "997", "13,457", "1,305", "5,100", "6.6× Postfix", "10.3× aiosmtpd",
                  "97% of scale-base", "178", "1,535", "commit abc1234"):
        assert label in text, label
    assert "volley-shaping" not in text  # a cell without msgs/s is left out, not drawn as 0
    width, height = _png_size(paths[1].read_bytes())
    assert width > 800 and height > 200


def test_ratio_text_peers_and_own_references() -> None:
    cell = {"ratios": {"postfix": 8.14, "aiosmtpd": 10.3, "base": 0.955, "zero_latency": 0.61,
                       "receive_only": 0.85, "fifty_domains": 1.02}}
    assert charts.ratio_text(cell) == ("8.1× Postfix, 10.3× aiosmtpd, 96% of scale-base, 61% of zero latency,"
                                       " 85% of receive only, 102% of 50 domains")
    assert charts.ratio_text({"ratios": {}}) == ""


def test_a_results_file_drawn_and_a_bad_one_reported(tmp_path: Path) -> None:
    good = tmp_path / "run.json"
    good.write_text(json.dumps(RESULTS))
    assert charts.main([str(good)]) == 0
    assert (tmp_path / "run.svg").stat().st_size > 0 and (tmp_path / "run.png").stat().st_size > 0
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"cells": [RESULTS["cells"][-1]]}))
    message = charts.draw_safely(empty, tmp_path / "empty")
    assert message.startswith("chart not drawn") and "no cell" in message
    assert not (tmp_path / "empty.png").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert charts.draw_safely(broken, tmp_path / "broken").startswith("chart not drawn: JSONDecodeError")
