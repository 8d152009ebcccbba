"""bench/shaping.py (the shaping row group of `make bench`) in small: one newsletter
request of 500 messages to the five shaped providers and the priority-9 message, all
delivered, and the results file carries each provider's figures the table is made of.

Only what is not a timing is asserted: every message arrived at its own provider's
sink, no provider saw more sessions at once than its cap (the sink counts a session
from its banner to its QUIT, the span the sending worker holds its connection token),
each domain was matched by its provider's mx_suffix, and the priority message came.
The rates and the priority message's delay are the bench's figures, not assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
N = 500


def test_shaping_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "shaping.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "shaping.py"), "--shaping-messages", str(N), "--shaping-warm", "2",
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    result = json.loads(out.read_text())
    assert not result["failures"], result["failures"]
    (cell,) = result["cells"]
    assert cell["row"] == "shaping" and cell["complete"]
    (r,) = cell["runs"]
    assert r["queue_left"] == 0 and r["exit"] == 0
    assert r["delivered_log"] == N + 1  # one `delivered` line per message: the queue drained
    assert sum(r["shares"].values()) == N
    assert set(r["providers"]) == set(r["shares"]) == {"tiny", "small", "medium", "large", "open"}
    for name, figures in r["providers"].items():
        # the priority message went to the slowest provider, "tiny"
        assert figures["messages"] == r["shares"][name] + (name == "tiny"), name
        if figures["cap"] is not None:
            assert 1 <= figures["peak_sessions"] <= figures["cap"], (name, figures["peak_sessions"])
        assert r["rules"][name]["rule"] == name
        assert r["rules"][name]["why"].startswith(f'mx_suffix ".mx.{name}.test"'), r["rules"][name]
    assert [p["cap"] for p in r["providers"].values()] == [2, 4, 8, 16, None]
    assert r["priority"]["delivered"] and r["priority"]["recipient"].startswith("reset@tiny")
    assert "shaping: one newsletter request to 5 providers" in run.stdout
    assert "shaping: priority-9 message delivered, seconds" in run.stdout
