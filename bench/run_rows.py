"""The rows of bench/run.py's table and the systems each compares (run.py has the
theory of operation: which peers, which load generator, which sink): a row is one
workload (receive, relay, latency, scale, newsletter, shaping, dests, cluster), a
system one server configuration; `plan` picks the cells --only, --systems and
--quick ask for, in the order they run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster  # noqa: E402
import dests  # noqa: E402
import newsletter  # noqa: E402  (bench/ is not a package)

SIZES = {"1k": 1024, "10k": 10240, "100k": 102400}
MESSAGES = {1024: 4000, 10240: 2500, 102400: 800}  # per run, by size
LATENCY = "20ms"  # what the latency rows' sink adds


@dataclass(frozen=True)
class Row:
    id: str
    kind: str  # "receive", "relay", "newsletter" (bench/newsletter.py) or "shaping" (bench/shaping.py)
    size: int
    label: str
    latency_sink: bool = False
    domains: int = 1  # for engine.lab.blast (smtp-source sends to one domain)
    prefill: int = 0
    group: str = ""  # for --only; default: the id up to its first "-"


@dataclass(frozen=True)
class System:
    id: str
    label: str
    kind: str  # "volley", "postfix", "aiosmtpd"
    durability: str = "fsync"
    own_load: bool = False  # engine.lab.blast with pipelining instead of the common generator


VOLLEY = [System(f"volley-{d}", f"volley {d}", "volley", d) for d in ("fsync", "batch", "memory")]
PIPELINING = System("volley-pipelining", "volley fsync, blast pipelined", "volley", own_load=True)
POSTFIX = System("postfix", "postfix (fsync queue)", "postfix")
AIOSMTPD = System("aiosmtpd", "aiosmtpd+uvloop+lmdb (sync)", "aiosmtpd")
SCALE = System("volley-scale", "volley fsync, blast pipelined", "volley", own_load=True)
NEWSLETTER = [System(m.id, m.label, "volley") for m in newsletter.MODES]
SHAPING = System("volley-shaping", "volley fsync, 5 shaped providers", "volley")
# bench/dests.py's rows: their systems run side by side (runs interleaved).
SLOW_DESTS = [System("volley-fsync", "volley fsync", "volley"),
              System("volley-nolat", "volley fsync, sink no latency", "volley"), POSTFIX]
DOWN_DEST = [System("volley-receive", "volley fsync, receive only", "volley"),
             System("volley-down", "volley fsync, dests refuse", "volley")]
HOT_DOMAIN = [System("volley-1dom", "volley fsync, 1 domain", "volley"),
              System("volley-50dom", "volley fsync, 50 domains", "volley")]
CLUSTER = [System("volley-alone", cluster.LABELS["alone"], "volley"),
           System("volley-redis", cluster.LABELS["redis"], "volley")]
GROUPS = ("receive", "relay", "latency", "scale", "newsletter", "shaping", "dests", "cluster")


def plan(args: argparse.Namespace) -> list[tuple[Row, list[System]]]:
    """Every row with its systems, in the order they run."""
    out: list[tuple[Row, list[System]]] = []
    for name, size in SIZES.items():
        out.append((Row(f"receive-{name}", "receive", size, f"receive {name.upper()}B"),
                    [*VOLLEY, PIPELINING, POSTFIX, AIOSMTPD]))
    for name, size in SIZES.items():
        out.append((Row(f"relay-{name}", "relay", size, f"relay {name.upper()}B"), [*VOLLEY, PIPELINING, POSTFIX]))
    for name, size in SIZES.items():
        out.append((Row(f"latency-{name}", "relay", size, f"relay {name.upper()}B, sink +{LATENCY}",
                        latency_sink=True), [VOLLEY[0], POSTFIX]))
    prefill = f"{args.prefill / 1e6:g}M" if args.prefill >= 1e6 else f"{args.prefill:,}"
    out += [(Row("scale-base", "relay", 1024, "relay 1KB, 50 dom", domains=50), [SCALE]),
            (Row("scale-queued", "relay", 1024, f"  + {prefill} queued", domains=50, prefill=args.prefill), [SCALE]),
            (Row("scale-domains", "relay", 1024, "  10k domains", domains=10_000), [SCALE]),
            (Row("newsletter", "newsletter", 1024, "newsletter 1KB, 50 dom", domains=newsletter.DOMAINS),
             NEWSLETTER),
            (Row("shaping", "shaping", 1024, "shaping, 5 providers"), [SHAPING]),
            (Row("cluster", "cluster", 1024, "cluster 1KB, 3 nodes"), CLUSTER),
            (Row("slow-dests", "dests", 1024, f"relay 1KB 1k dom +{LATENCY}", domains=dests.DOMAINS,
                 group="dests"), SLOW_DESTS),
            (Row("down-dest", "dests", 1024, "receive 1KB, dests down", domains=dests.DOWN_DOMAINS,
                 group="dests"), DOWN_DEST),
            (Row("hot-domain", "dests", 1024, "relay 1KB, hot domain", domains=dests.HOT_DOMAINS,
                 group="dests"), HOT_DOMAIN)]
    only = {t.strip() for t in args.only.split(",") if t.strip()}
    chosen = {t.strip() for t in args.systems.split(",") if t.strip()}
    result = []
    for row, members in out:
        group = row.group or row.id.split("-")[0]
        if only and row.id not in only and group not in only:
            continue
        if not only and args.quick and group in ("latency", "scale"):
            continue  # the slow rows
        picked = [s for s in members if not chosen or s.id in chosen or s.kind in chosen]
        if picked:
            result.append((row, picked))
    return result
