"""`make soak` in small: tools/soak.py for 20 seconds with every fault kind injected.

The soak's own verdict is not taken on trust: the numbers of its table are checked
against counts made here from the raw material it leaves in its --keep directory (the
blast's JSON report, the files the sinks stored, the delivery log). The RSS check is
left to the real 10-minute run: 20 seconds say nothing about a leak.
"""

from __future__ import annotations

import email
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _stored(work: Path) -> tuple[Counter[str], Counter[str]]:
    """X-Soak-Id -> copies, for ordinary messages and for the DSNs naming them."""
    delivered: Counter[str] = Counter()
    bounced: Counter[str] = Counter()
    for index in (work / "sinks").glob("*/index.jsonl"):
        for line in index.read_text().splitlines():
            entry = json.loads(line)
            msg = email.message_from_bytes((index.parent / entry["file"]).read_bytes())
            if entry["mail_from"]:
                delivered[str(msg["X-Soak-Id"])] += 1
                continue
            # A DSN: the original's headers are its third part (RFC 6522).
            parts = [p for p in msg.walk() if p.get_content_type() in
                     ("text/rfc822-headers", "message/rfc822")]
            assert parts, f"a DSN without the original's headers: {entry['file']}"
            original = parts[0].get_payload(decode=False)
            if isinstance(original, list):
                original = str(original[0])
            returned = email.message_from_string(str(original))
            bounced[str(returned["X-Soak-Id"])] += 1
    return delivered, bounced


def test_soak_smoke_reconciles_with_faults(tmp_path: Path) -> None:
    work = tmp_path / "soak"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "soak.py"), "--duration", "20", "--seed", "11",
         "--drain", "60", "--json", "--keep", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert run.stdout.strip(), run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == (0 if result["ok"] else 1), run.stderr[-2000:]

    # Every fault kind was injected, and the sinks' rates fired.
    assert result["faults"].get("worker_kill", 0) >= 1, result["events"]
    assert result["faults"].get("sink_restart", 0) >= 1, result["events"]
    assert result["faults"].get("queue_fill", 0) >= 1, result["events"]
    assert all(result["sink_faults"][k] > 0 for k in ("deferred", "rejected", "disconnected"))

    # The table matches independent counts.
    blast = json.loads((work / "blast.json").read_text().strip().splitlines()[-1])
    assert result["accepted"] == blast["accepted"] > 0
    delivered, bounced = _stored(work)
    assert result["delivered"] == len(delivered)
    assert result["bounced"] == len(bounced) > 0
    extra_copies = (sum(delivered.values()) - len(delivered) + sum(bounced.values()) - len(bounced)
                    + len(set(delivered) & set(bounced)))
    assert result["duplicates"] == extra_copies

    # The reconciliation holds: nothing lost, duplicates within the crash window.
    assert result["drained"] and result["still_queued"] == 0
    assert result["lost"] == 0
    accounted = len(set(delivered) | set(bounced))
    assert blast["accepted"] <= accounted <= blast["accepted"] + blast["failed"]
    assert result["duplicates"] <= result["duplicates_allowed"]
    assert not any(p.exists() for p in (work / "volley.sock",)), "volley serve still running"
