"""A provider's message rate shared by a fleet: GCRA in Redis with batched grants.

Redis keeps the fleet's theoretical arrival time (TAT) per rate key, in its own clock
(TIME). A node does not ask per message: once a heartbeat its supervisor asks for a
batch, and one Lua call grants n messages by moving the TAT n emission intervals
(1/rate) on. The fleet may book at most one heartbeat ahead of now, so whatever the
nodes ask, over any window W the fleet is granted at most rate × (W + heartbeat).
The node spends the grant locally: the supervisor adds it to the slot's credit in the
shared table and each message a worker sends takes one (shared_limits.take_message),
still paced by the local GCRA at the configured rate. Redis is asked once per batch:
at 1000/s and a 1 s heartbeat, one call per ~1000 messages.

The batch a node asks for is its demand: a heartbeat's worth at the full rate while
its workers ran out of credit (they mark the slot), else twice what it spent in the
last heartbeat, less the credit it still has. When several nodes ask, the horizon is
split by the same water-filling as the caps (caps.FAIR_LUA), each node's want kept
for two heartbeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from engine.cluster.caps import FAIR_LUA
from engine.cluster.link import ClusterLink

# KEYS: tat, want expiries, wants. ARGV: node, rate (/s), ask, horizon (s), want ttl.
# Returns {granted, booked ahead (s, text)}.
GRANT_LUA = FAIR_LUA + """
local node, rate, ask = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local horizon, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_s()
publish_want(KEYS[2], KEYS[3], node, ask, now, ttl)
local interval = 1 / rate
local fair_part = fair(redis.call('HGETALL', KEYS[3]), math.max(1, math.floor(rate * horizon)), {})[node] or 0
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local room = math.floor((now + horizon - tat) / interval + 1e-9)
local n = math.max(0, math.min(ask, math.max(fair_part, 1), room))
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.floor((horizon + ttl) * 3000))
redis.call('PEXPIRE', KEYS[2], math.floor(ttl * 3000))
redis.call('PEXPIRE', KEYS[3], math.floor(ttl * 3000))
return {n, string.format('%.6f', tat - now)}
"""


@dataclass(frozen=True, slots=True)
class Grant:
    granted: int  # messages this node may send on top of its credit
    ahead: float  # seconds the fleet's rate is booked ahead of now


class RateGrants:
    """The grant script of one node (the supervisor's coordination calls it)."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self._grant = link.redis.register_script(GRANT_LUA)
        self.calls = 0  # Redis round trips made for rates (the bench's cost figure)

    def keys(self, rate_key: str) -> list[str]:
        return [self.link.key("rate", rate_key, "tat"), self.link.key("rate", rate_key, "until"),
                self.link.key("rate", rate_key, "wants")]

    def _args(self, rate: float, ask: int) -> list[Any]:
        horizon = float(self.link.cfg.heartbeat)
        return [self.link.node, repr(float(rate)), max(0, ask), repr(horizon), 2 * horizon]

    async def grant(self, rate_key: str, rate: float, ask: int) -> Grant:
        """Ask for `ask` messages of `rate`; one round trip. Raises a link error
        (ClusterLink.call) when Redis does not answer."""
        self.calls += 1
        return self.parse(await self.link.call(self._grant(
            keys=self.keys(rate_key), args=self._args(rate, ask))))

    async def queue(self, pipe: Pipeline, rate_key: str, rate: float, ask: int) -> None:
        """The same as `grant`, queued on `pipe` (one round trip for all keys)."""
        self.calls += 1
        await self._grant(keys=self.keys(rate_key), args=self._args(rate, ask), client=pipe)

    @staticmethod
    def parse(res: list[Any]) -> Grant:
        return Grant(int(res[0]), float(res[1]))


def batch_want(rate: float, heartbeat: float, credit: float, spent: float,
               starved: bool) -> int:
    """The messages to ask for this heartbeat: a heartbeat's worth at the full rate
    (plus one) while workers ran out of credit, else twice the last heartbeat's
    spending (demand seen); less the credit left."""
    full = math.ceil(rate * heartbeat) + 1
    target = full if starved else min(full, math.ceil(2 * spent))
    return max(0, target - math.floor(credit))
