"""The state a worker pushes to the supervisor every second (engine/control/fleet.py).

Counters are copied from the stats objects the hot paths already keep (inbound,
scheduler, DNS cache, pools) into the worker's `WorkerMetrics` here, once a second,
instead of bumping a second set of counters per message. Histograms are observed
where the event happens (the scheduler's outcome) into the same object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.worker import WorkerRuntime


def worker_state(runtime: WorkerRuntime) -> dict[str, Any]:
    m = runtime.metrics
    inbound = runtime.ctx.stats
    m.received = inbound.received
    m.received_bytes = inbound.received_bytes
    m.connections_in = inbound.connections
    live: dict[str, Any] = {"sessions_in": len(runtime.ctx.sessions), "sessions_out": 0}
    delivery = runtime.delivery
    if delivery is not None:
        st = delivery.scheduler.stats
        m.delivered = st.delivered
        m.deferred = st.deferred
        m.bounced = st.bounced
        m.expired = st.expired
        m.dsns_queued = st.dsns
        dns = delivery.dns.stats
        m.dns_lookups = dns.misses
        m.dns_cache_hits = dns.hits
        m.connections_out = delivery.pools.connections_opened
        m.sent_bytes = delivery.pools.bytes_sent
        live.update(delivery.live_state())
    return {"metrics": m.snapshot(), "live": live}
