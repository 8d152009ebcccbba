"""The `[cluster]` section: several Volley nodes sharing provider limits, the
suppression list, suspensions and campaign counters through Redis.

Off by default (`redis = ""`): one node needs nothing and runs exactly as without it.
Each node keeps its own LMDB queue; only coordination state lives in Redis.
Kept apart from tree.py, which imports it into `Config`.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import msgspec

from engine.config.units import Duration

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PREFIX = re.compile(r"^[A-Za-z0-9:._-]{1,64}$")


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ClusterConfig(_Frozen, frozen=True):
    # redis://host:port/db (or rediss:// for TLS); "" = no cluster, this node alone.
    redis: str = ""
    # This node's name in the cluster (leases, counters, status); "" = the host name.
    node_name: str = ""
    # Every Redis key Volley writes starts with this, so several fleets (or a test
    # and a production fleet) can share one Redis.
    key_prefix: str = "volley:"
    # How long a node's connection leases and its liveness record outlive it: a node
    # killed with -9 holds nothing beyond this.
    lease_ttl: Duration = Duration(10)
    # How often a node renews its leases and liveness and re-reads its shares.
    heartbeat: Duration = Duration(1)
    # Redis commands time out after this; the node then runs degraded on its local
    # share (cap ÷ live nodes last seen) until Redis answers again.
    timeout: Duration = Duration(1)

    def __post_init__(self) -> None:
        if self.redis:
            parts = urlsplit(self.redis)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ValueError(f"redis: expected redis://host:port/db, got {self.redis!r}")
        if self.node_name and not _NAME.match(self.node_name):
            raise ValueError(f"node_name: letters, digits, '.', '_' and '-' only: {self.node_name!r}")
        if not _PREFIX.match(self.key_prefix):
            raise ValueError(f"key_prefix: 1-64 of letters, digits, ':', '.', '_', '-': {self.key_prefix!r}")
        if float(self.lease_ttl) < 2 * float(self.heartbeat):
            raise ValueError("lease_ttl: must be at least twice heartbeat (leases are renewed every heartbeat)")
        if float(self.heartbeat) <= 0 or float(self.timeout) <= 0:
            raise ValueError("heartbeat: and timeout must be positive")

    @property
    def enabled(self) -> bool:
        return bool(self.redis)

    @property
    def node(self) -> str:
        """The node's name: `node_name`, or the host name."""
        return self.node_name or socket.gethostname()
