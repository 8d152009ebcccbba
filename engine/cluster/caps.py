"""A provider's connection cap shared by a fleet: leases with an expiry in Redis.

Per cap key (the provider, or "provider|source address" as in shared_limits.py) Redis
holds a sorted set of leases, member "node:n", score the wall-clock second (Redis's
own clock, TIME) the lease ends. A node holds one lease per connection it may open;
its supervisor renews them every heartbeat, so a node killed with -9 holds nothing
beyond lease_ttl. The node's workers see the count as the slot's share in the shared
table (fleet_share.py) and open at most that many connections.

How much each node holds is decided by demand, every heartbeat, in one Lua script
(atomic: no two nodes can both take the last lease):
- each node publishes its want (the whole cap while one of its workers waits for a
  connection, else the connections it has open; 0 when idle), kept for lease_ttl;
- the cap is split over the nodes' wants by water-filling (max-min fairness: a node
  wanting less than an equal split gets what it wants, the rest share what is left;
  ties go to whoever already holds more, so shares do not flap);
- a node takes its target only from leases nobody else holds, so the sum of leases
  never exceeds the cap; a node above its target gives back leases down to the
  target, but never below the connections it has open (those end as their sessions
  go idle: the supervisor marks the provider wanted, and the gates QUIT idle ones).
So an idle node's share flows to the busy ones within a heartbeat or two, and comes
back as soon as it has mail again.

Recovery. A node also publishes the connections it has open, and the leases free for
the others are cap - sum over nodes of max(leases, open): connections a node opened
without leases (on its local share while Redis was down) are reserved as if leased.
That alone does not cover the first round after Redis comes back empty: a node that
has not run its round yet has published nothing. So a node that comes back (its link
was degraded), or finds its own want gone although it published one (Redis lost its
data, or the node was silent longer than lease_ttl), sets a hold on the cap key for
lease_ttl + timeout; while it stands no node grows above its local share (cap ÷ the
live nodes it last saw), which is all it may have had open during the outage. Every
live node retries Redis every heartbeat, a failed try costs at most timeout, and
lease_ttl is at least two heartbeats: each has published its open count before the
hold ends, and from then on its connections are reserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from engine.cluster.link import ClusterLink

# Water-filling in Lua (shared with rates.py): `flat` is HGETALL's node, want, ...;
# returns node -> amount, the amounts summing to at most `total`.
FAIR_LUA = """
local function fair(flat, total, held)
  local ws = {}
  for i = 1, #flat, 2 do ws[#ws + 1] = {flat[i], tonumber(flat[i + 1])} end
  table.sort(ws, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    local ha, hb = held[a[1]] or 0, held[b[1]] or 0
    if ha ~= hb then return ha < hb end
    return a[1] < b[1]
  end)
  local give, left = {}, total
  for i, e in ipairs(ws) do
    local g = math.min(e[2], math.floor(left / (#ws - i + 1)))
    give[e[1]] = g
    left = left - g
  end
  return give
end
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function publish_want(zkey, hkey, node, want, now, ttl)
  local gone = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  for _, n in ipairs(gone) do redis.call('HDEL', hkey, n) end
  redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now)
  redis.call('ZADD', zkey, now + ttl, node)
  redis.call('HSET', hkey, node, want)
end
"""

# KEYS: leases, want expiries, wants, open counts, hold. ARGV: node, cap, want, keep
# (connections open), ttl, most (the local share), seen (1: this node published here
# before), back (1: its first round since Redis answers again), hold (s).
# Returns {share, target, node, held, node, held, ...} (every node's leases after).
LEASE_LUA = FAIR_LUA + """
local node, cap, want = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local keep, ttl, most = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_s()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
-- Our want gone though we published one: what the fleet had published is lost.
local mine = tonumber(redis.call('ZSCORE', KEYS[2], node) or '0')
if ARGV[8] == '1' or (ARGV[7] == '1' and mine <= now) then
  redis.call('SET', KEYS[5], '1', 'PX', math.floor(tonumber(ARGV[9]) * 1000))
end
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[4], n)
end
publish_want(KEYS[2], KEYS[3], node, want, now, ttl)
redis.call('HSET', KEYS[4], node, keep)
local held, open = {}, {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local owner = string.match(m, '^(.*):%d+$') or m
  held[owner] = (held[owner] or 0) + 1
  if owner == node then redis.call('ZREM', KEYS[1], m) end
end
local flat = redis.call('HGETALL', KEYS[4])
for i = 1, #flat, 2 do open[flat[i]] = tonumber(flat[i + 1]) end
-- Another node's connections count whether leased or not (opened while degraded).
local others = 0
for n, c in pairs(held) do
  if n ~= node then others = others + math.max(c, open[n] or 0) end
end
for n, c in pairs(open) do
  if n ~= node and not held[n] then others = others + c end
end
local target = fair(redis.call('HGETALL', KEYS[3]), cap, held)[node] or 0
local grow = target
if redis.call('EXISTS', KEYS[5]) == 1 then grow = math.min(target, most) end
local share = math.max(0, math.min(math.max(grow, keep), cap - others))
for i = 0, share - 1 do redis.call('ZADD', KEYS[1], now + ttl, node .. ':' .. i) end
held[node] = share
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], math.floor(ttl * 3000)) end
local out = {share, target}
for n, c in pairs(held) do
  if c > 0 then out[#out + 1] = n; out[#out + 1] = c end
end
return out
"""

# KEYS: leases, want expiries, wants, open counts. ARGV: node. Gives back every lease
# of the node.
RELEASE_LUA = """
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if (string.match(m, '^(.*):%d+$') or m) == ARGV[1] then redis.call('ZREM', KEYS[1], m) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 0
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """The outcome of one round for one cap key."""

    share: int  # leases this node holds now: the connections it may open
    target: int  # its fair part of the cap by the wants published
    by_node: dict[str, int]  # every node's leases (status)


class CapLeases:
    """The lease scripts of one node (the supervisor's coordination calls them)."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self._lease = link.redis.register_script(LEASE_LUA)
        self._release = link.redis.register_script(RELEASE_LUA)

    @property
    def hold(self) -> float:
        """Seconds no node grows above its local share after Redis comes back (see the
        module's docstring): every live node has published its open count by then."""
        return float(self.link.cfg.lease_ttl) + float(self.link.cfg.timeout)

    def keys(self, cap_key: str) -> list[str]:
        return [self.link.key("cap", cap_key, part) for part in ("leases", "until", "wants", "open", "hold")]

    def _args(self, cap: int, want: int, keep: int, most: int | None, seen: bool, back: bool) -> list[Any]:
        return [self.link.node, cap, max(0, min(want, cap)), max(0, keep),
                float(self.link.cfg.lease_ttl), cap if most is None else max(0, most),
                int(seen), int(back), self.hold]

    async def rebalance(self, cap_key: str, cap: int, want: int, keep: int, *, most: int | None = None,
                        seen: bool = False, back: bool = False) -> Lease:
        """Publish this node's want and open count (`keep`), renew and resize its
        leases; one round trip. `most`: its local share, the most it may grow to during
        a hold; `seen`: it published on this key before; `back`: its first round since
        Redis answers again (both may start a hold). Raises a link error
        (ClusterLink.call) when Redis does not answer."""
        return self.parse(await self.link.call(self._lease(
            keys=self.keys(cap_key), args=self._args(cap, want, keep, most, seen, back))))

    async def queue(self, pipe: Pipeline, cap_key: str, cap: int, want: int, keep: int, *,
                    most: int | None = None, seen: bool = False, back: bool = False) -> None:
        """The same as `rebalance`, queued on `pipe` (one round trip for all keys)."""
        await self._lease(keys=self.keys(cap_key), args=self._args(cap, want, keep, most, seen, back),
                          client=pipe)

    @staticmethod
    def parse(res: list[Any]) -> Lease:
        by_node = {_text(res[i]): int(res[i + 1]) for i in range(2, len(res), 2)}
        return Lease(int(res[0]), int(res[1]), by_node)

    async def release(self, cap_key: str) -> None:
        """Give back every lease of this node (a clean stop: no need to wait the TTL)."""
        await self.link.call(self._release(keys=self.keys(cap_key)[:4], args=[self.link.node]))


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
