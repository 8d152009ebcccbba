"""The suppression list shared by the fleet: Redis holds it, each node mirrors it.

Redis (every key under `key_prefix`):
  supp:h:TENANT   a hash per scope (TENANT "" is the list every tenant shares): field
                  "address:VALUE" / "domain:VALUE" → the msgpack `supp_outbox.Change`
  supp:tenants    a set of the scopes that have a hash (a full resync walks them)
  supp:log        a stream of changes, XADD ... MAXLEN ~ STREAM_MAX: fields c (the
                  msgpack Change) and o (the node it came from)
  supp:epoch      a random name given the first time a node finds Redis without one:
                  a Redis that lost its data (restarted without persistence) has a new
                  one, and every node then publishes its whole list again

Out (`_drain`): local changes wait in the LMDB outbox (engine/queue/supp_outbox.py,
written in the transaction of the change); every DRAIN_EVERY the supervisor sends the
oldest (HSETNX or HDEL, and XADD, in one MULTI) and deletes what Redis took. A
crash between the two publishes a change twice: harmless (the first entry stays).

In (`_follow`): XREAD BLOCK from the last stream id applied, which is saved with the
changes it brought in one LMDB transaction, so a restarted node resumes where it was.
Changes tagged with this node's name are skipped (they came from here: no echo). A node
whose saved id is older than the stream's first entry (it fell off the end), or that
finds a new epoch, resyncs: it notes the stream's last id, adds every entry of every
hash, then follows from that id. A resync only adds: an entry removed by the fleet
while this node was away stays in its mirror (refusing mail someone may want is the
safe error; mailing someone who unsubscribed is not). `volley ctl suppress remove` on
the node removes it.

Lookups never touch Redis: they read the mirror, which keeps answering while Redis is
down; the outbox fills meanwhile and drains when Redis is back.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from engine.cluster.link import ClusterLink, stop_tasks
from engine.cluster.link import call_loose as _call
from engine.cluster.loops import follow, rounds
from engine.observe import log
from engine.queue import supp_outbox, suppression
from engine.queue.store import QueueStore
from engine.queue.supp_outbox import Change
from engine.queue.writetxn import WriteTxn

Thread = Callable[..., Awaitable[Any]]
POSITION_KEY = b"cluster-supp-position"  # control state: the last stream id applied
EPOCH_KEY = b"cluster-supp-epoch"  # control state: the epoch that id belongs to
DRAIN_EVERY = 0.1  # seconds between looks at the outbox (one LMDB read transaction)
DRAIN_BATCH = 500  # changes per MULTI
APPLY_BATCH = 1000  # stream entries / hash fields per LMDB write when following or resyncing
SEED_SLICE = 1000  # entries per write transaction when a joining node copies its list out
STREAM_MAX = 1_000_000  # the stream's approximate length (XADD MAXLEN ~)


class SuppressionSync:
    """The supervisor's two tasks keeping the local list and the fleet's in step."""

    def __init__(self, link: ClusterLink, store: QueueStore, run_in_thread: Thread) -> None:
        self.link = link
        self.store = store
        self._thread = run_in_thread
        self.stream = link.key("supp", "log")
        self.tenants = link.key("supp", "tenants")
        self.epoch_key = link.key("supp", "epoch")
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()  # `poke`: an operator's change is in the outbox
        self.published = 0  # changes sent to Redis (metrics, tests)
        self.applied = 0  # changes of other nodes written into the mirror
        self.resyncs = 0

    def hash_key(self, tenant: str) -> str:
        return self.link.key("supp", "h", tenant)

    # --- life --------------------------------------------------------------------------
    async def start(self) -> None:
        """Mark the store (local changes go to the outbox from now on), publish the list
        the node had if it is joining for the first time, and start the tasks."""
        joined = await self._thread(self.store.write_one, lambda w: supp_outbox.set_on(w, True))
        # Seeding a long list takes a while (a million entries: a thousand transactions):
        # the drain task does it first, so the workers need not wait for it to start.
        self._tasks = [asyncio.create_task(self._drain_loop(seed=joined), name="cluster-supp-drain"),
                       asyncio.create_task(follow(self.link, self._join, self._follow_once,
                                                  "cluster_supp_follow_failed"),
                                           name="cluster-supp-follow")]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []

    async def _seed(self) -> None:
        after, copied = b"", 0
        while True:
            after = await self._thread(self.store.write_one,
                                       lambda w, a=after: suppression.seed_outbox(w, a, SEED_SLICE))
            if not after:
                break
            copied += 1
        log.info("cluster_supp_seeded", slices=copied)

    # --- out: the outbox to Redis ---------------------------------------------------------
    async def _drain_loop(self, *, seed: bool = False) -> None:
        if seed:
            await self._seed()
        # Degraded, the outbox keeps everything for a later round.
        await rounds(self._drain_all, self._drain_pause, "cluster_supp_drain_failed", self._wake)

    async def _drain_all(self) -> None:
        while await self.drain_once():
            pass

    def _drain_pause(self) -> float:
        return DRAIN_EVERY if self.link.healthy else float(self.link.cfg.heartbeat)

    def poke(self) -> None:
        """Send the outbox now (an operator's change; bounces and complaints from the
        workers wait for the next look, at most DRAIN_EVERY)."""
        self._wake.set()

    async def drain_once(self) -> int:
        """Publish the oldest outbox changes and delete them locally; returns how many.
        Raises a LINK_ERRORS error when Redis does not take them (they stay)."""
        items = await self._thread(self.store.supp_outbox, DRAIN_BATCH)
        if not items:
            return 0
        pipe = self.link.redis.pipeline(transaction=True)
        for _, c in items:
            if c.op == "skip":
                continue
            field = f"{c.kind}:{c.value}"
            if c.op == "add":
                # The first entry stays, as on one node (suppression.add).
                pipe.hsetnx(self.hash_key(c.tenant), field, supp_outbox.encode(c))
                pipe.sadd(self.tenants, c.tenant)
            else:
                pipe.hdel(self.hash_key(c.tenant), field)
            pipe.xadd(self.stream, {"c": supp_outbox.encode(c), "o": self.link.node},
                      maxlen=STREAM_MAX, approximate=True)
        await _call(self.link, pipe.execute())
        await self._thread(self.store.write_one, supp_outbox.delete(k for k, _ in items))
        self.published += len(items)
        return len(items)

    # --- in: the stream to the mirror -----------------------------------------------------
    async def _join(self) -> bytes:
        """Where to follow from: the saved position, or a resync's."""
        r = self.link.redis
        await _call(self.link, r.setnx(self.epoch_key, secrets.token_hex(8)))
        epoch = await _call(self.link, r.get(self.epoch_key)) or b""
        saved_epoch, saved = await self._thread(
            lambda: (self.store.get_control(EPOCH_KEY), self.store.get_control(POSITION_KEY)))
        if saved_epoch != epoch:
            if saved_epoch is not None:
                # Redis lost the list (or this node moved to another Redis): publish ours.
                log.warning("cluster_supp_new_epoch", epoch=epoch.decode())
                await self._seed()
            return await self._resync(epoch)
        first = await _call(self.link, r.xrange(self.stream, "-", "+", count=1))
        if saved is None or (first and _id(first[0][0]) > _id(saved)):
            return await self._resync(epoch)
        return bytes(saved)

    async def _resync(self, epoch: bytes) -> bytes:
        r = self.link.redis
        last = await _call(self.link, r.xrevrange(self.stream, "+", "-", count=1))
        position = bytes(last[0][0]) if last else b"0-0"
        tenants = await _call(self.link, r.smembers(self.tenants))
        added = 0
        for tenant in sorted(tenants):
            cursor = 0
            while True:
                cursor, fields = await _call(self.link, r.hscan(
                    self.hash_key(tenant.decode("utf-8", "surrogatepass")), cursor, count=APPLY_BATCH))
                changes = [c for c in map(_change, fields.values()) if c is not None]
                a, _ = await self._thread(self.store.write_one,
                                          lambda w, ch=changes: suppression.apply_remote(w, ch))
                added += a
                if cursor == 0:
                    break
        await self._thread(self.store.write_one, lambda w: _mark(w, epoch, position))
        self.resyncs += 1
        log.info("cluster_supp_resynced", added=added, position=position.decode())
        return position

    async def _follow_once(self, position: bytes) -> bytes:
        """One XREAD BLOCK (shorter than the command timeout); applies what came."""
        block = max(50, int(self.link.timeout * 500))
        got = await _call(self.link, self.link.redis.xread(
            {self.stream: position}, count=APPLY_BATCH, block=block))
        if not got:
            return position
        entries = got[0][1]
        me = self.link.node.encode()
        changes = []
        for entry_id, fields in entries:
            position = bytes(entry_id)
            if fields.get(b"o") == me:
                continue
            c = _change(fields.get(b"c", b""))
            if c is not None:
                changes.append(c)
        await self._thread(self.store.write_one, lambda w: suppression.apply_remote(
            w, changes, mark=POSITION_KEY, position=position))
        self.applied += len(changes)
        return position


def _id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


def _change(data: bytes) -> Change | None:
    try:
        return supp_outbox.decode(data)
    except Exception:  # a newer engine's entry: skip it rather than stop the mirror
        return None


def _mark(w: WriteTxn, epoch: bytes, position: bytes) -> None:
    w.txn.put(EPOCH_KEY, epoch, db=w._store._ctl)
    w.txn.put(POSITION_KEY, position, db=w._store._ctl)
