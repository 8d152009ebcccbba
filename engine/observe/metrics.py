"""Counters and histograms of one worker, their merge, and Prometheus text.

Each worker owns one `WorkerMetrics` and bumps its plain attributes in place on the loop
thread (no locks: one thread writes, and the snapshot is taken on that same thread).
About once a second the worker sends `snapshot()` to the supervisor over its control
pipe; the supervisor keeps the last snapshot per worker, folds the final snapshot of a
dead worker into a "retired" base (so totals never go backwards across restarts), and
`WorkerMetrics.merge`s them into one total for `render`.

Snapshot shape (msgspec/JSON friendly, a few hundred bytes):

    {"counters": {"received": 12, ...},
     "histograms": {"delivery_latency": {"bounds": [...], "counts": [...],
                                          "sum": 1.5, "count": 12}, ...},
     "by_class": {"bounced": {"bad_mailbox": 2, ...}, "deferred": {...}}}

Histogram `counts` are per bucket, NOT cumulative: counts[i] is the number of values
v with bounds[i-1] < v <= bounds[i], and the last entry (len(bounds) + 1 entries in
all) counts values above the last bound. Per-bucket counts make `observe` a single
increment; `render` accumulates them into Prometheus' cumulative `le` buckets.

`by_class` counts are labelled counters: one sample per bounce class (a fixed set of
15, engine/config/bounces.py, so the label's cardinality is bounded), bumped where the
outcome is observed.

Every exported name lives in COUNTERS, BY_CLASS, HISTOGRAMS and GAUGES below (the README lists
them from here). Text format: Prometheus exposition format 0.0.4.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from typing import Any, Literal

import msgspec

# (attribute, exported name, help). Delivery outcomes count recipients: a message to
# three recipients that all succeed adds three to `delivered`.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("received", "volley_messages_received_total", "Messages accepted (end of DATA answered 250)."),
    ("received_bytes", "volley_received_bytes_total", "Bytes of message content accepted."),
    ("rejected", "volley_transactions_rejected_total",
     "Inbound refusals (4xx/5xx) of mail transactions: a MAIL refused by policy (auth, "
     "declared size), any command of an open transaction refused (RCPT, DATA, BDAT), or a "
     "message refused at its end (too big, malformed, looping, the queue refused it)."),
    ("connections_in", "volley_connections_in_total", "Inbound SMTP connections accepted."),
    ("delivered", "volley_messages_delivered_total", "Recipients delivered (2xx from the next hop)."),
    ("deferred", "volley_messages_deferred_total", "Recipients deferred for a later retry."),
    ("bounced", "volley_messages_bounced_total", "Recipients failed permanently."),
    ("expired", "volley_messages_expired_total", "Recipients failed because their queue lifetime ran out."),
    ("connections_out", "volley_connections_out_total", "Outbound SMTP connections opened."),
    ("sent_bytes", "volley_sent_bytes_total", "Bytes of message content sent to next hops."),
    ("dns_lookups", "volley_dns_lookups_total",
     "MX and address answers asked of the nameservers (misses of the worker's cache that "
     "no other worker had fetched)."),
    ("dns_shared_answers", "volley_dns_shared_answers_total",
     "DNS answers (MX, address, MTA-STS TXT) a worker took from those another worker had "
     "fetched, instead of asking the nameservers."),
    ("dns_cache_hits", "volley_dns_cache_hits_total", "DNS answers served from the cache."),
    ("dsns_queued", "volley_dsns_queued_total", "Delivery status notifications queued."),
    ("handed_over", "volley_messages_handed_over_total",
     "Recipients handed to another node by volley ctl drain --to (the peer answered 250)."),
)

# (attribute, exported name, help): counters labelled {class="..."} (the bounce rules'
# class of the reply, engine/mail/bounce_rules.toml). Each family sums to the unlabelled
# counter of the same outcome.
BY_CLASS: tuple[tuple[str, str, str], ...] = (
    ("bounced", "volley_bounces_total",
     "Recipients failed permanently, by the class of the reply (bad_mailbox, reputation, "
     "expired, suppressed, ...); sums to volley_messages_bounced_total."),
    ("deferred", "volley_deferrals_total",
     "Recipient deferrals by the class of the reply (transient, rate_limited, reputation, "
     "...); sums to volley_messages_deferred_total."),
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_TIME_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0)

# (attribute, exported name, help, bucket bounds in seconds)
HISTOGRAMS: tuple[tuple[str, str, str, tuple[float, ...]], ...] = (
    ("delivery_latency", "volley_delivery_latency_seconds",
     "Seconds from the start of an outbound SMTP transaction to its final reply.", LATENCY_BUCKETS),
    ("queue_time", "volley_queue_time_seconds",
     "Seconds from a message's arrival to its delivery.", QUEUE_TIME_BUCKETS),
)

# Gauges (and the few counters) the supervisor knows itself: name -> (type, help).
GAUGES: dict[str, tuple[Literal["gauge", "counter"], str]] = {
    "volley_queue_messages": ("gauge", "Messages in the queue."),
    "volley_queue_bytes": ("gauge", "Bytes of message content in the queue."),
    "volley_queue_units": ("gauge", "Pending (message, recipient domain) delivery units."),
    "volley_sessions_in": ("gauge", "Inbound SMTP sessions open now."),
    "volley_sessions_out": ("gauge", "Outbound SMTP sessions open now."),
    "volley_workers": ("gauge", "Worker processes running."),
    "volley_domains_suspended": ("gauge", "Recipient domains whose delivery is suspended."),
    "volley_uptime_seconds": ("gauge", "Seconds since the supervisor started."),
    "volley_worker_restarts_total": ("counter", "Workers restarted after they exited."),
    # Read from the queue store at scrape time (engine/control/lists.py).
    "volley_campaign_messages_total": (
        "counter", "Recipients of a campaign by outcome (injected, delivered, deferred, bounced, "
        "suppressed, complained); the campaigns past campaigns.metrics_top summed as "
        'campaign="other".'),
    "volley_suppression_entries": ("gauge", "Entries on the suppression list, every tenant."),
    # Only in a [cluster] (engine/control/lists.py).
    "volley_cluster_suppression_outbox": (
        "gauge", "Local changes of the suppression list not yet in the cluster's Redis."),
    # Only in a [cluster] (engine/cluster/link.py).
    "volley_cluster_degraded": (
        "gauge", "1 while the cluster's Redis does not answer (provider limits on the local "
        "share: cap and rate / live nodes last seen), 0 when healthy."),
}

_COUNTER_ATTRS = tuple(attr for attr, _, _ in COUNTERS)
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class Histogram:
    """Fixed-bucket histogram; `observe` is one bisect and three updates."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)) or not all(map(math.isfinite, buckets)):
            raise ValueError("buckets: finite, strictly increasing, at least one")
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the extra one is above the last bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's bucket: Prometheus'
        # `le` is "less than or equal".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts),
                "sum": self.sum, "count": self.count}


class WorkerMetrics:
    """One worker's counters (plain ints, bumped in place) and histograms."""

    __slots__ = _COUNTER_ATTRS + tuple(attr for attr, _, _, _ in HISTOGRAMS) + ("by_class",)

    received: int
    received_bytes: int
    rejected: int
    connections_in: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    connections_out: int
    sent_bytes: int
    dns_lookups: int
    dns_cache_hits: int
    dns_shared_answers: int
    dsns_queued: int
    handed_over: int
    delivery_latency: Histogram
    queue_time: Histogram
    # BY_CLASS attribute -> {class: count}
    by_class: dict[str, dict[str, int]]

    def __init__(self) -> None:
        for attr in _COUNTER_ATTRS:
            setattr(self, attr, 0)
        for attr, _, _, buckets in HISTOGRAMS:
            setattr(self, attr, Histogram(buckets))
        self.by_class = {attr: {} for attr, _, _ in BY_CLASS}

    def count_class(self, attr: str, cls: str) -> None:
        """One recipient of outcome `attr` ("bounced", "deferred") whose reply is of
        class `cls`."""
        counts = self.by_class[attr]
        counts[cls] = counts.get(cls, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "counters": {attr: getattr(self, attr) for attr in _COUNTER_ATTRS},
            "histograms": {attr: getattr(self, attr).snapshot() for attr, _, _, _ in HISTOGRAMS},
            "by_class": {attr: dict(counts) for attr, counts in self.by_class.items()},
        }

    @staticmethod
    def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
        """Sum snapshots (live workers' and the retired base) into one of the same shape.

        An empty list gives all zeros, so the result can itself be merged again.
        Counters missing from a snapshot count as zero.

        Raises:
            ValueError: one histogram's bounds differ between snapshots.
        """
        total = WorkerMetrics().snapshot()
        counters = total["counters"]
        hists = total["histograms"]
        by_class = total["by_class"]
        for snap in snapshots:
            for attr, value in snap.get("counters", {}).items():
                counters[attr] = counters.get(attr, 0) + value
            for attr, counts in snap.get("by_class", {}).items():
                into_counts = by_class.setdefault(attr, {})
                for cls, n in counts.items():
                    into_counts[cls] = into_counts.get(cls, 0) + n
            for attr, h in snap.get("histograms", {}).items():
                into = hists.get(attr)
                if into is None:
                    hists[attr] = into = {"bounds": list(h["bounds"]), "counts": [0] * len(h["counts"]),
                                          "sum": 0.0, "count": 0}
                if list(h["bounds"]) != into["bounds"] or len(h["counts"]) != len(into["counts"]):
                    raise ValueError(f"histogram {attr}: bucket bounds differ between snapshots")
                into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"])]
                into["sum"] += h["sum"]
                into["count"] += h["count"]
        return total


class Gauge(msgspec.Struct, frozen=True):
    """One sample the supervisor supplies itself; several with one name (and different
    labels) render as one family."""

    name: str
    help: str
    value: float
    labels: dict[str, str] | None = None
    kind: Literal["gauge", "counter"] = "gauge"


def gauge(name: str, value: float, labels: dict[str, str] | None = None) -> Gauge:
    """A Gauge named in GAUGES, with its help and type from there.

    Raises:
        KeyError: the name is not in GAUGES (every exported name lives in the tables).
    """
    kind, help_text = GAUGES[name]
    return Gauge(name, help_text, value, labels, kind)


# --- Prometheus text exposition format 0.0.4 -----------------------------------------

def _number(value: float) -> str:
    # Go's ParseFloat spellings, which Prometheus reads.
    if isinstance(value, int):  # bool too: True is 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str] | None) -> str:
    if not labels:
        return ""
    for key in labels:
        if not _LABEL.match(key) or key.startswith("__"):
            raise ValueError(f"bad label name {key!r}")
    return "{" + ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items()) + "}"


def _header(out: list[str], name: str, kind: str, help_text: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"bad metric name {name!r}")
    out.append(f"# HELP {name} {_escape_help(help_text)}")
    out.append(f"# TYPE {name} {kind}")


def _render_histogram(out: list[str], name: str, help_text: str, h: dict[str, Any]) -> None:
    _header(out, name, "histogram", help_text)
    running = 0
    for bound, n in zip(h["bounds"], h["counts"]):
        running += n
        out.append(f'{name}_bucket{{le="{_number(float(bound))}"}} {running}')
    # +Inf is the count itself: every observation is <= +Inf.
    out.append(f'{name}_bucket{{le="+Inf"}} {h["count"]}')
    out.append(f"{name}_sum {_number(float(h['sum']))}")
    out.append(f"{name}_count {h['count']}")


def render(total: dict[str, Any], gauges: list[Gauge]) -> str:
    """The merged snapshot and the supervisor's gauges as Prometheus text (0.0.4).

    Counters, labelled counters and histograms follow the order of the tables; gauges keep the order of
    their first appearance, samples of one name grouped under one HELP/TYPE.
    """
    out: list[str] = []
    counters = total.get("counters", {})
    for attr, name, help_text in COUNTERS:
        _header(out, name, "counter", help_text)
        out.append(f"{name} {_number(counters.get(attr, 0))}")
    by_class = total.get("by_class", {})
    for attr, name, help_text in BY_CLASS:
        _header(out, name, "counter", help_text)
        for cls, n in sorted(by_class.get(attr, {}).items()):
            out.append(f"{name}{_labels({'class': cls})} {_number(n)}")
    hists = total.get("histograms", {})
    for attr, name, help_text, buckets in HISTOGRAMS:
        h = hists.get(attr) or Histogram(buckets).snapshot()
        _render_histogram(out, name, help_text, h)
    families: dict[str, list[Gauge]] = {}
    for g in gauges:
        families.setdefault(g.name, []).append(g)
    for name, samples in families.items():
        _header(out, name, samples[0].kind, samples[0].help)
        for g in samples:
            out.append(f"{name}{_labels(g.labels)} {_number(g.value)}")
    return "\n".join(out) + "\n"
