"""bench/newsletter.py (the newsletter row group of `make bench`) in small: the two
signed cells (SMTP relay, one HTTP campaign request) complete with every message
accepted and delivered, and the results file carries the cells, the ratio and the DKIM
signing figures the table is made of. The unsigned cells are the same code with no
[[dkim]] entry, left out to keep this under 20 s.

No figure is judged (no timing assertions): this proves the harness, not the speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
N = 200


def test_newsletter_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "newsletter.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "newsletter.py"), "--runs", "1", "--newsletter-messages", str(N),
         "--warmup", "50", "--rest", "0", "--systems", "volley-smtp-dkim,volley-http-dkim", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    result = json.loads(out.read_text())
    cells = {c["system"]: c for c in result["cells"]}
    skipped = {f["system"] for f in result["failures"] if "skipped" in f}
    assert not [f for f in result["failures"] if "error" in f]
    assert "volley-smtp-dkim" in cells
    assert set(cells) | skipped == {"volley-smtp-dkim", "volley-http-dkim"}
    for system, cell in cells.items():
        assert cell["row"] == "newsletter" and cell["complete"], system
        (r,) = cell["runs"]
        assert r["messages"] == r["accepted"] == N, system
        assert r["delivery_samples"] == N, system  # one `delivered` line per message: the queue drained
        assert cell["queue_left"] == 0 and cell["exit"] == 0, system
        assert len(r["worker_cpu_split_pct"]) == 2, system
        assert cell["dkim"] == "rsa-2048", system
    if "volley-http-dkim" in cells:
        assert "smtp" in cells["volley-http-dkim"]["ratios"]
        assert result["newsletter"]["campaign_rendered_bytes"] > 0
    signing = result["newsletter"]["dkim_sign_1k"]
    for algorithm in ("rsa-2048", "ed25519"):
        assert signing[algorithm]["signatures"] > 0, signing
    assert "newsletter:" in run.stdout and "campaign delivered >= 90% of SMTP relay" in run.stdout
