"""The soak's reconciliation: what the sinks stored, counted by the unique id every
message carries (`X-Soak-Id`, from blast's --template), against what the blast says was
accepted and what the queue still holds; then the table and the verdict.

- delivered: distinct ids among the messages the recipient sinks stored;
- bounced: distinct ids named in the DSNs (null sender) that reached the sender's sink
  (the DSN returns the original headers, X-Soak-Id among them);
- duplicates: every extra copy of an id (a second delivery, a second DSN, or a message
  both delivered and bounced: a retry after a lost commit that met a 550);
- lost = accepted - (delivered ∪ bounced) - still queued. A message whose 250 the blast
  never saw (the worker was killed after our commit: the inbound twin of the duplicate
  window) may be delivered all the same; such extras are reported, bounded by the
  blast's in-flight failures, and can never hide behind a negative "lost" count larger
  than that bound.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ID_HEADER = re.compile(rb"^X-Soak-Id: *(\S+)", re.MULTILINE)
RSS_LIMIT = 0.20


@dataclass
class SinkCounts:
    delivered: Counter[str] = field(default_factory=Counter)  # id -> copies
    bounced: Counter[str] = field(default_factory=Counter)  # id -> DSNs
    stored: int = 0
    unreadable: list[str] = field(default_factory=list)


def scan_stores(stores: list[Path]) -> SinkCounts:
    """Every message the sinks stored, from their index.jsonl and .eml files."""
    counts = SinkCounts()
    for store in stores:
        index = store / "index.jsonl"
        if not index.exists():
            continue
        for line in index.read_bytes().splitlines():
            entry = json.loads(line)
            counts.stored += 1
            data = (store / entry["file"]).read_bytes()
            found = ID_HEADER.search(data)
            if found is None:
                counts.unreadable.append(str(store / entry["file"]))
                continue
            ident = found.group(1).decode()
            (counts.bounced if entry["mail_from"] == "" else counts.delivered)[ident] += 1
    return counts


def delivery_log(path: Path) -> dict[str, int]:
    """Distinct queue ids per final outcome in the delivery log (a cross-check: a worker
    killed with lines still buffered loses those lines, so these may run short)."""
    seen: dict[str, set[str]] = {"delivered": set(), "bounced": set(), "deferred": set()}
    if path.exists():
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("sender") and rec.get("outcome") in seen:
                    seen[rec["outcome"]].add(rec["id"])
    return {k: len(v) for k, v in seen.items()}


def reconcile(blast: dict[str, Any], sinks: SinkCounts, queued: int, received: float | None,
              dlog: dict[str, int], faults: dict[str, int], kill_bound: int,
              rss: list[dict[str, Any]], sink_faults: dict[str, int], drained: bool) -> dict[str, Any]:
    """The numbers of the final table and the verdict, as one JSON-able dict."""
    accepted = int(blast["accepted"])
    delivered = set(sinks.delivered)
    bounced = set(sinks.bounced)
    accounted = len(delivered | bounced) + queued
    in_flight_failed = int(blast.get("failed", 0))
    extra = max(0, accounted - accepted)
    lost = max(0, accepted - accounted)
    if extra > in_flight_failed:  # more than the inbound twin can explain: unknown mail
        lost = max(lost, 1)
    duplicates = (sum(n - 1 for n in sinks.delivered.values())
                  + sum(n - 1 for n in sinks.bounced.values()) + len(delivered & bounced))
    rss_ok = all(r["drift"] is None or abs(r["drift"]) <= RSS_LIMIT for r in rss)
    refused = {str(k): v for k, v in (blast.get("refused") or {}).items()}
    result = {
        "accepted": accepted, "server_received": received, "sent": blast.get("sent"),
        "refused": refused, "blast_failed": in_flight_failed,
        "delivered": len(delivered), "bounced": len(bounced), "still_queued": queued,
        "drained": drained, "lost": lost, "extra_inbound_twin": extra,
        "duplicates": duplicates, "duplicates_allowed": kill_bound,
        "unreadable": len(sinks.unreadable), "delivery_log": dlog,
        "faults": faults, "sink_faults": sink_faults, "rss": rss, "rss_ok": rss_ok,
    }
    result["ok"] = (lost == 0 and drained and duplicates <= kill_bound and rss_ok
                    and not sinks.unreadable)
    return result


def _kib(v: int | None) -> str:
    return "n/a" if v is None else f"{v / 1024:.1f} MiB"


def render(r: dict[str, Any]) -> str:
    refused = ", ".join(f"{k}: {v}" for k, v in sorted(r["refused"].items())) or "none"
    received = "n/a" if r["server_received"] is None else f"{int(r['server_received']):,}"
    dl = r["delivery_log"]
    rows = [
        ("accepted (blast 250s)", f"{r['accepted']:,}",
         f"server's received counter {received}; sent {r['sent']:,}; refused {refused};"
         f" failed in flight {r['blast_failed']:,}"),
        ("delivered (unique ids)", f"{r['delivered']:,}", f"delivery log: {dl['delivered']:,} queue ids"),
        ("bounced (DSNs, unique)", f"{r['bounced']:,}", f"delivery log: {dl['bounced']:,} queue ids"),
        ("still queued", f"{r['still_queued']:,}", "queue drained" if r["drained"] else "DRAIN TIMED OUT"),
        ("lost", f"{r['lost']:,}", "must be 0"),
        ("extra (inbound twin)", f"{r['extra_inbound_twin']:,}",
         f"delivered though blast saw no 250; at most {r['blast_failed']:,}"),
        ("duplicates", f"{r['duplicates']:,}",
         f"allowed {r['duplicates_allowed']:,} (units in flight in the killed workers)"),
    ]
    faults = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items())) or "none"
    sinkf = ", ".join(f"{k} {v:,}" for k, v in sorted(r["sink_faults"].items()))
    rows.append(("faults injected", "", f"{faults}; at the sinks: {sinkf}"))
    width = max(len(a) for a, _, _ in rows)
    lines = [f"  {a:<{width}}  {b:>9}  {c}" for a, b, c in rows]
    lines.append("  worker RSS (baseline 1 min into each worker's life -> end):")
    for w in r["rss"]:
        drift = "n/a (too young for a baseline)" if w["drift"] is None else f"{w['drift']:+.1%}"
        lines.append(f"    slot {w['slot']} pid {w['pid']}: {_kib(w['base_kib'])} -> {_kib(w['end_kib'])}"
                     f"  {drift}")
    verdict = "PASS" if r["ok"] else "FAIL"
    why = [what for bad, what in ((r["lost"], "messages lost"), (not r["drained"], "queue not drained"),
                                  (r["duplicates"] > r["duplicates_allowed"], "too many duplicates"),
                                  (not r["rss_ok"], f"RSS drift over {RSS_LIMIT:.0%}"),
                                  (r["unreadable"], "stored messages without an id")) if bad]
    lines.append(f"  verdict: {verdict}" + (f" ({'; '.join(why)})" if why else ""))
    return "\n".join(lines)
