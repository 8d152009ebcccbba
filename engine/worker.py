"""One worker process: `python -m engine.worker`, started by the supervisor.

The supervisor execs us (fork + exec, never a bare fork) with the listening sockets
and one end of a control socketpair inherited. Only here, after the exec, is LMDB
opened, so the supervisor stays free to open it too.

Control channel: one JSON line per message, the typed messages of
engine/control/wire.py: `Start` first, then orders (reload, stop, drain, holds, flush,
mx queries); we send `Ready` once we accept, our `State` every second, and an answer
to each mx query.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import msgspec
import uvloop

from engine import config as config_mod
from engine.control import wire
from engine.delivery.dns_share import ADDRESSES, MX
from engine.delivery.holds import HOLDS_KEY, Holds, decode_holds
from engine.delivery.runtime import Delivery
from engine.inbound.context import WorkerContext
from engine.inbound.listener import start_listeners
from engine.inbound.tls import make_server_tls_context
from engine.mail import bounce_class
from engine.mail.dkim import DkimSigner
from engine.observe import log
from engine.observe.metrics import WorkerMetrics
from engine.queue.commit import Committer
from engine.queue.committer import QueueCommitter
from engine.queue.ids import IdAllocator
from engine.queue.inline_commit import InlineCommitter
from engine.queue.store import QueueStore

if TYPE_CHECKING:
    from engine.http.server import HttpApi

# Exit status of a worker whose storage environment became unusable (MDB_PANIC,
# finding 8); the supervisor restarts it like any other exit, with the same backoff.
EXIT_STORAGE_PANIC = 3


class WorkerRuntime:
    """Everything one worker runs, on sockets it is given: the queue store opened in
    this process, group commit, and the SMTP listeners. Tests start it in-process on
    their own sockets; the worker process starts it on the supervisor's."""

    def __init__(self, store: QueueStore, committer: QueueCommitter, ctx: WorkerContext,
                 servers: list[asyncio.AbstractServer], delivery: Delivery | None,
                 sockets: list[socket.socket] | None = None) -> None:
        self.sockets = sockets or []
        self.store = store
        self.committer = committer
        self.ctx = ctx
        self.servers = servers
        self.delivery = delivery
        self.metrics = WorkerMetrics()
        self.http: HttpApi | None = None  # the injection API, when given a socket for it

    @classmethod
    async def start(cls, cfg: config_mod.Config, sockets: list[socket.socket], *,
                    workers: int = 1, slot: int = 0,
                    http_socket: socket.socket | None = None) -> WorkerRuntime:
        loop = asyncio.get_running_loop()
        bounce_class.configure(cfg)  # the rules the ledger, delivery log and metrics use
        store = QueueStore(cfg.queue.path, map_size=int(cfg.queue.max_size),
                           durability=cfg.queue.durability, shards=workers,
                           reserve=cfg.queue.headroom())
        ids = IdAllocator(store.next_boot())
        # "fsync" flushes inside the commit, which must not stall the loop: a thread.
        # The other levels commit on the loop (engine/queue/inline_commit.py says why).
        committer_cls = Committer if cfg.queue.durability == "fsync" else InlineCommitter
        committer = committer_cls(store, loop, durability=cfg.queue.durability,
                                  batch_interval=float(cfg.queue.batch_interval))
        committer.start()
        ctx = WorkerContext(cfg, loop, committer, ids, workers=workers)
        ctx.store = store  # read side for the suppression list at RCPT
        servers = await start_listeners(ctx, cfg, sockets)
        ctx.start_sweeper()
        delivery = None
        if cfg.delivery.enabled:
            local = {(s.getsockname()[0], s.getsockname()[1]) for s in sockets}
            delivery = Delivery(cfg, store=store, committer=committer, ids=ids, owner=slot,
                                local=_expand_wildcards(local), workers=workers)
            ctx.on_new_mail = delivery.scheduler.wake
            ctx.dead_until = delivery.scheduler.dead_until
            ctx.on_deferred = delivery.scheduler.deferred_at_intake
            raw = store.get_control(HOLDS_KEY)  # suspensions hold from the first scan on
            delivery.set_holds(decode_holds(raw) if raw else Holds({}, {}))
            delivery.start()
        runtime = cls(store, committer, ctx, servers, delivery, sockets)
        if delivery is not None:
            delivery.scheduler.metrics = runtime.metrics  # latency and queue-time histograms
            delivery.scheduler.signer = DkimSigner.from_config(cfg.dkim) if cfg.dkim else None
        if http_socket is not None:
            # Imported here: a worker without [http] never loads aiohttp or jinja2.
            from engine.http.inject import Backend
            from engine.http.server import HttpApi
            tls = make_server_tls_context(cfg) if cfg.http.tls else None
            runtime.http = await HttpApi.start(
                cfg, http_socket, Backend(store, committer, ids, ctx.on_new_mail), ssl_context=tls)
        return runtime

    def apply_config(self, cfg: config_mod.Config) -> None:
        bounce_class.configure(cfg)  # bounces.rules_file is read again
        self.ctx.apply_config(cfg)
        if self.delivery is not None:
            self.delivery.apply_config(cfg)
            # The supervisor loaded every key before it sent the reload (startup check).
            self.delivery.scheduler.signer = DkimSigner.from_config(cfg.dkim) if cfg.dkim else None
        if self.http is not None:
            self.http.apply_config(cfg)

    async def stop(self) -> None:
        await self.drain()
        if self.http is not None:
            await self.http.stop()  # requests in flight still commit: before the committer
        if self.delivery is not None:
            await self.delivery.stop(float(self.ctx.cfg.server.shutdown_timeout))
        await self.committer.stop()
        self.store.close()

    def stop_accepting(self) -> None:
        """Close the listeners (the supervisor keeps the sockets) and end idle sessions;
        delivery goes on."""
        ctx = self.ctx
        ctx.draining = True
        for server in self.servers:
            server.close()
        # The event loop serves a duplicate of each socket; ours must go too, or the
        # kernel keeps completing handshakes nobody will answer.
        for sock in self.sockets:
            sock.close()
        for proto in list(ctx.sessions):
            proto.shutdown_if_idle()
        if self.http is not None:
            self.http.stop_accepting()

    async def drain(self) -> None:
        """Stop accepting, end idle sessions, give busy ones the shutdown bound."""
        ctx = self.ctx
        self.stop_accepting()  # ends the idle sessions too
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(ctx.cfg.server.shutdown_timeout)
        while ctx.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
            for proto in list(ctx.sessions):
                proto.shutdown_if_idle()
        for proto in list(ctx.sessions):
            proto.close()
        ctx.stop_sweeper()
        ctx.executor.shutdown(wait=False)


def _expand_wildcards(local: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """A wildcard listener answers on every local address; loopback stands in for
    them in loop detection (plus whatever server.hostname resolves to, added by the
    DNS layer's own local-name check)."""
    out = set()
    for ip, port in local:
        if ip in ("0.0.0.0", "::"):
            out.update({("127.0.0.1", port), ("::1", port)})
        else:
            out.add((ip, port))
    return out


class Worker:
    def __init__(self, slot: int, control_fd: int, listen_fds: list[int]) -> None:
        self.slot = slot
        self.control_fd = control_fd
        self.listen_fds = listen_fds
        self.stop_event = asyncio.Event()
        self.exit_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=self.control_fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        start = wire.to_worker_decoder.decode(await reader.readline())
        if not isinstance(start, wire.Start):
            raise config_mod.ConfigError(f"the supervisor began with {type(start).__name__}, not Start")
        cfg = config_mod.from_dict(start.config)
        log.configure(cfg.log.level, role=f"worker{self.slot}")

        for sig in (signal.SIGTERM,):
            loop.add_signal_handler(sig, self.stop_event.set)
        # Ctrl-C reaches the whole process group; the supervisor decides for us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

        # The SMTP sockets in [[listeners]] order, then http.listen's (supervisor/listeners.py).
        socks = [socket.socket(fileno=fd) for fd in self.listen_fds]
        n = len(cfg.listeners)
        runtime = await WorkerRuntime.start(
            cfg, socks[:n], workers=start.workers, slot=self.slot,
            http_socket=socks[n] if len(socks) > n and cfg.http.listen else None,
        )
        ctx = runtime.ctx
        housekeeping = loop.create_task(self._housekeeping(runtime.store, runtime.committer))
        writer.write(wire.encode(wire.Ready(slot=self.slot, pid=os.getpid())))
        log.info("worker_ready", slot=self.slot)

        if runtime.delivery is not None:  # [[reactions]] in force are told to the supervisor
            runtime.delivery.reactions.notify = lambda fired: writer.write(
                wire.encode(wire.ReactionFired(slot=self.slot, **fired._asdict())))
        control = loop.create_task(self._control(reader, writer, runtime))
        pushing = loop.create_task(self._push_state(writer, runtime))
        await self.stop_event.wait()
        control.cancel()
        pushing.cancel()
        housekeeping.cancel()
        await runtime.stop()
        st = runtime.committer.stats
        log.info("worker_stopped", slot=self.slot, received=ctx.stats.received,
                 commits=st.batches, committed_ops=st.ops, syncs=st.syncs)
        return self.exit_code

    async def _push_state(self, writer: asyncio.StreamWriter, runtime: WorkerRuntime) -> None:
        while not writer.is_closing():
            try:
                writer.write(wire.encode(worker_state(self.slot, runtime)))
            except Exception as err:  # reporting must never stop the worker
                log.error("state_push_failed", error=repr(err))
            await asyncio.sleep(1.0)

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       runtime: WorkerRuntime) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, OSError, ValueError):
                line = b""  # a failed write to the pipe closed it: the same as EOF
            if not line:  # the supervisor is gone: nobody would restart or stop us
                log.warning("supervisor_lost", slot=self.slot)
                self.stop_event.set()
                return
            try:
                self._obey(wire.to_worker_decoder.decode(line), writer, runtime)
            except (msgspec.DecodeError, config_mod.ConfigError, OSError, ValueError, KeyError,
                    TypeError) as err:
                log.error("control_message_refused", slot=self.slot, error=str(err))

    def _obey(self, message: wire.AnyToWorker, writer: asyncio.StreamWriter,
              runtime: WorkerRuntime) -> None:
        """Carry out one order of the supervisor; answer it when it is a query. Holds
        and flush without delivery are dropped: there is nothing to steer."""
        delivery = runtime.delivery
        match message:
            case wire.Stop():
                self.stop_event.set()
            case wire.Reload(config=config):
                cfg = config_mod.from_dict(config)
                runtime.apply_config(cfg)
                log.configure(cfg.log.level)
                log.info("worker_reloaded", slot=self.slot)
            case wire.Drain():
                runtime.stop_accepting()
                log.info("worker_draining", slot=self.slot)
            case wire.SetHolds(holds=holds) if delivery is not None:
                delivery.set_holds(holds)
            case wire.Flush(domain=domain) if delivery is not None:
                delivery.flush(domain)
            case wire.MxQuery():
                writer.write(wire.encode(_mx_answer(message, delivery)))
            case wire.LiftReaction(provider=provider, ask=ask):
                domains = delivery.lift(provider) if delivery is not None else []
                writer.write(wire.encode(wire.Lifted(ask=ask, domains=domains)))
            case wire.InflightQuery(ask=ask):
                units = len(delivery.scheduler.inflight) if delivery is not None else 0
                writer.write(wire.encode(wire.Inflight(ask=ask, units=units)))
            case wire.Start():
                raise ValueError("Start twice")

    async def _housekeeping(self, store: QueueStore, committer: QueueCommitter) -> None:
        loop = asyncio.get_running_loop()
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            if committer.panicked:
                log.error("storage_panic", slot=self.slot)
                self.exit_code = EXIT_STORAGE_PANIC
                self.stop_event.set()
                return
            ticks += 1
            if ticks % 60 == 0:
                # Stale readers of killed processes pin old pages (finding 7).
                cleared = await loop.run_in_executor(None, store.reader_check)
                if cleared:
                    log.info("stale_readers_cleared", count=cleared)


def _mx_answer(query: wire.MxQuery, delivery: Delivery | None) -> wire.AnyAnswer:
    if delivery is None:
        return wire.Refused(ask=query.ask, error="delivery is disabled")
    if query.flush:
        return wire.MxFlushed(ask=query.ask, flushed=delivery.mx_flush(query.domain))
    entry = msgspec.convert(delivery.mx(query.domain or ""), wire.MxEntry)
    return wire.MxEntries(ask=query.ask, entries=[entry])


def worker_state(slot: int, runtime: WorkerRuntime) -> wire.State:
    """The state a worker pushes to the supervisor every second (engine/control/fleet.py).

    Counters are copied from the stats objects the hot paths already keep (inbound,
    scheduler, DNS cache, pools) into the worker's `WorkerMetrics` here, once a second,
    instead of bumping a second set of counters per message. Histograms are observed
    where the event happens (the scheduler's outcome) into the same object.
    """
    m = runtime.metrics
    inbound = runtime.ctx.stats
    m.received = inbound.received
    m.received_bytes = inbound.received_bytes
    m.rejected = inbound.rejected
    m.connections_in = inbound.connections
    sessions_in = len(runtime.ctx.sessions)
    delivery = runtime.delivery
    if delivery is None:
        return wire.State(slot=slot, metrics=m.snapshot(), live=wire.Live(sessions_in=sessions_in))
    st = delivery.scheduler.stats
    m.delivered = st.delivered
    m.deferred = st.deferred
    m.bounced = st.bounced
    m.expired = st.expired
    m.dsns_queued = st.dsns
    dns = delivery.dns.stats
    shared = delivery.answers.hits_by_kind
    # Asked of the nameservers: the cache's calls of the resolver (misses that joined a
    # lookup under way make none) but those the workers' shared answers served (TXT
    # lookups go around the cache: not in its calls).
    m.dns_lookups = dns.queries - shared[MX] - shared[ADDRESSES]
    m.dns_shared_answers = sum(shared)
    m.dns_cache_hits = dns.hits
    m.connections_out = delivery.pools.connections_opened
    m.sent_bytes = delivery.pools.bytes_sent
    live = msgspec.convert({**delivery.live_state(), "sessions_in": sessions_in}, wire.Live)
    return wire.State(slot=slot, metrics=m.snapshot(), live=live)


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the per-message path (issue 15, relay cost).

    Measured on the relay-1k row: 12-14% of a worker's CPU went to collections, most of
    it the full ones walking every object made at import. Those never become garbage:
    freeze() moves them out of the collector's view. A relayed message makes hundreds of
    short-lived containers (freed by reference counting, not the collector), so the
    first generation is collected every 10,000 net allocations instead of 700; cycles
    are still found, a little later. Measured: 1.7% of the worker's CPU in GC."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="volley-worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listen-fds", default="")
    args = parser.parse_args(argv)
    fds = [int(x) for x in args.listen_fds.split(",") if x]
    worker = Worker(args.slot, args.control_fd, fds)
    tune_gc()
    profile_dir = os.environ.get("VOLLEY_PROFILE_DIR")
    if profile_dir:
        # Developer aid (tools/README): cProfile of the loop thread, one file per worker.
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            return uvloop.run(worker.run())
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(profile_dir, f"worker{args.slot}-{os.getpid()}.prof"))
    try:
        return uvloop.run(worker.run())
    except config_mod.ConfigError as err:
        print(f"volley worker: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
