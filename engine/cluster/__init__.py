"""Several Volley nodes as one fleet, coordinated through Redis (`[cluster]`).

Each node keeps its own LMDB queue; what must hold across the fleet lives in Redis:
provider connection caps (leases with a TTL) and message rates, the suppression list
(mirrored into each node's LMDB), suspensions and reactions, and campaign counters.
The supervisor runs the coordination; workers see its results through the shared
tables and the control pipe, so the delivery hot path never waits on Redis.
"""
