"""The supervisor: binds every listener, starts and restarts workers, handles signals.

Workers are started by fork + exec (`python -m engine.worker`) with the listening
sockets inherited, rather than by a bare fork: a child then never inherits an event
loop, threads or an LMDB environment from us, and the
supervisor may itself open the queue for the control socket later.

Each (listener, worker) pair gets its own socket bound with SO_REUSEPORT, and each
address is claimed for the supervisor's lifetime (`listeners.py`); the supervisor keeps
every socket open, so connections that reach a dead worker's socket wait in its backlog
until the restart instead of being refused. Before anything binds or forks,
`startup.check_startup` loads the TLS certificate and key the way every worker will.

Signals: TERM/INT → drain workers and exit 0; HUP → re-read the config file and
hand limits, relay rules, users and TLS to every worker (listeners are fixed at start).

The supervisor also serves the control socket (engine/control/): it opens its own
handle of the queue for that (safe: workers are exec'd), keeps each
worker's last pushed state, and asks workers over the same pipes when it needs them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from engine import config as config_mod
from engine.cluster.coordinator import Coordinator, reset_fleet
from engine.cluster.data_sync import DataSync, leave_cluster, start_data_sync
from engine.cluster.link import ClusterLink
from engine.config import Config, split_host_port
from engine.control import wire
from engine.control.commands import ControlPlane
from engine.control.metrics_http import start_metrics_http
from engine.control.server import ControlSocketError, start_control_server
from engine.observe import log
from engine.queue.store import QueueStore
from engine.supervisor.listeners import ListenClaim, bind_listeners
from engine.supervisor.startup import check_startup

# Restart backoff: immediate-ish at first, capped, reset after a healthy run.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
HEALTHY_RUN = 30.0


class WorkerSlot:
    """One worker position: its process, its control channel, its restarts."""

    def __init__(self, sup: Supervisor, slot: int) -> None:
        self.sup = sup
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.started_at = 0.0
        self._asks = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[wire.AnyAnswer]] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        """Started and accepting (it said Ready), as far as we know."""
        return self.ready.is_set()

    async def supervise(self) -> None:
        failures = 0
        while not self.sup.stopping:
            self.started_at = time.monotonic()
            try:
                code = await self._run_once()
            except OSError as err:
                log.error("worker_spawn_failed", slot=self.slot, error=str(err))
                code = -1
            if self.sup.stopping:
                return
            ran = time.monotonic() - self.started_at
            failures = 0 if ran > HEALTHY_RUN else failures + 1
            delay = 0.0 if failures == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
            log.warning("worker_exited", slot=self.slot, status=code, restart_in=delay)
            self.restarts += 1
            if delay:
                try:
                    await asyncio.wait_for(self.sup.stop_event.wait(), delay)
                except TimeoutError:
                    pass

    async def _run_once(self) -> int:
        parent, child = socket.socketpair()
        # Listening sockets stay non-inheritable: uvloop's spawn would hand every
        # inheritable descriptor to every child, and a worker holding another worker's
        # socket keeps it accepting after a drain. pass_fds passes exactly these.
        # After a drain the listeners are closed for good: a new worker gets none.
        fds = [] if self.sup.draining else [
            s.fileno() for s in (self.sup.sockets[i][self.slot] for i in range(len(self.sup.sockets)))]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.worker",
                "--slot", str(self.slot), "--control-fd", str(child.fileno()),
                "--listen-fds", ",".join(map(str, fds)),
                pass_fds=[child.fileno(), *fds], stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        self.send(wire.Start(slot=self.slot, workers=self.sup.workers,
                             config=config_mod.to_builtins(self.sup.cfg)))
        reading = asyncio.ensure_future(self._read(reader))
        code = await self.proc.wait()
        reading.cancel()
        self.ready.clear()
        self.writer.close()
        self.writer = None
        for ask, fut in self._waiting.items():
            if not fut.done():
                fut.set_result(wire.Refused(ask=ask, error="worker exited"))
        self._waiting.clear()
        if self.sup.plane is not None:
            self.sup.plane.fleet.worker_exited(self.slot)
        return code

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = wire.from_worker_decoder.decode(line)
            except msgspec.DecodeError:
                continue
            match message:
                case wire.State():
                    if self.sup.plane is not None:
                        self.sup.plane.fleet.update(self.slot, message)
                case wire.ReactionFired():
                    if self.sup.plane is not None:
                        self.sup.plane.reactions.fired(message)
                case wire.MxFlushed() | wire.MxEntries() | wire.Lifted() | wire.Inflight() | wire.Refused():
                    fut = self._waiting.pop(message.ask, None)
                    if fut is not None and not fut.done():
                        fut.set_result(message)
                case wire.Ready():
                    self.ready.set()
                    if self.sup.draining:
                        self.send(wire.Drain())
                    self.sup.on_worker_ready(self)

    async def ask(self, query: wire.Query, timeout: float) -> wire.AnyAnswer:
        """Send a query to the worker and wait for its answer; a worker that is down or
        silent answers `Refused` instead of raising."""
        if self.writer is None or not self.ready.is_set():
            return wire.Refused(ask=0, error="worker not running")
        n = next(self._asks)
        fut: asyncio.Future[wire.AnyAnswer] = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        self.send(msgspec.structs.replace(query, ask=n))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return wire.Refused(ask=n, error="worker did not answer")
        finally:
            self._waiting.pop(n, None)

    def send(self, message: wire.ToWorker) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(wire.encode(message))


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.workers = cfg.server.workers or os.cpu_count() or 1
        self.stopping = False
        self.stop_event = asyncio.Event()
        self.sockets: list[list[socket.socket]] = []
        self.addresses: list[str] = []
        self.slots: list[WorkerSlot] = []
        self.announced = False
        self.draining = False
        self.plane: ControlPlane | None = None
        self.cluster: ClusterLink | None = None  # [cluster]: the node's link to the fleet's Redis
        self.data_sync: DataSync | None = None  # the list, holds and counters shared through it
        self.limits: Coordinator | None = None  # provider caps and rates shared through it
        self.claim = ListenClaim()
        self._servers: list[asyncio.AbstractServer] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        check_startup(self.cfg)
        self._prepare_dirs()
        self.sockets, self.addresses = bind_listeners(self.cfg, self.workers, self.claim)
        store = QueueStore(self.cfg.queue.path, map_size=int(self.cfg.queue.max_size),
                           durability=self.cfg.queue.durability, shards=self.workers)
        try:
            await self._start_control(store)
            await self._start_cluster(store)
        except BaseException:
            store.close()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.slots = [WorkerSlot(self, i) for i in range(self.workers)]
        tasks = [asyncio.ensure_future(s.supervise()) for s in self.slots]
        ticking = asyncio.ensure_future(self._tick())
        log.info("starting", workers=self.workers, listeners=self.addresses,
                 queue=self.cfg.queue.path, durability=self.cfg.queue.durability,
                 control=self.cfg.control.socket)
        await self.stop_event.wait()
        ticking.cancel()
        for server in self._servers:
            server.close()
        await self._shutdown(tasks)
        for socks in self.sockets:
            for s in socks:
                s.close()
        await asyncio.to_thread(Path(self.cfg.control.socket).unlink, missing_ok=True)
        if self.data_sync is not None:
            await self.data_sync.stop()
        if self.limits is not None:
            await self.limits.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.plane is not None:
            self.plane.reactions.close()
        store.close()
        log.info("stopped")
        return 0

    async def _start_control(self, store: QueueStore) -> None:
        self.plane = plane = ControlPlane(self, store)
        plane.reactions.restore()  # [[reactions]] in force before the restart hold again
        try:
            self._servers.append(await start_control_server(
                self.cfg.control.socket, self.cfg.control.group, plane.handle))
        except ControlSocketError as err:
            raise config_mod.ConfigError(str(err)) from None
        if self.cfg.metrics.listen:
            host, port = split_host_port(self.cfg.metrics.listen)
            try:
                self._servers.append(await start_metrics_http(host, port, plane.metrics_text))
            except OSError as err:
                raise config_mod.ConfigError(
                    f"metrics.listen: cannot bind {self.cfg.metrics.listen}: {err.strerror}") from None

    async def _start_cluster(self, store: QueueStore) -> None:
        """Join the fleet when `[cluster]` is set (a Redis that is down leaves the node
        degraded, not stopped); alone, stop recording list changes for a fleet."""
        if not self.cfg.cluster.enabled:
            await asyncio.to_thread(leave_cluster, store)
            await asyncio.to_thread(reset_fleet, self.cfg.queue.path)  # alone: whole caps
            return
        assert self.plane is not None
        self.cluster = ClusterLink(self.cfg.cluster)
        await self.cluster.start()
        # Before the workers start: their gates find this node's share in the table.
        self.limits = Coordinator(lambda: self.cfg, self.cluster)
        await self.limits.start()
        self.data_sync = await start_data_sync(self.cluster, store, self.plane)

    async def _tick(self) -> None:
        """Once a second: end suspensions whose time is up; every 5 s: sample rates and
        refresh the queue totals that metrics scrapes read."""
        n = 0
        while True:
            await asyncio.sleep(1.0)
            assert self.plane is not None
            try:
                await self.plane.expire_holds()
                await self.plane.reactions.expire()
                if n % 5 == 0:
                    await self.plane.refresh()
            except Exception as err:  # housekeeping must not end the supervisor
                log.error("control_tick_failed", error=repr(err))
            n += 1

    def broadcast(self, message: wire.ToWorker) -> None:
        for slot in self.slots:
            slot.send(message)

    def drain(self) -> None:
        """Stop accepting everywhere (also in workers started later); delivery goes on."""
        if not self.draining:
            self.draining = True
            log.info("draining")
            self.broadcast(wire.Drain())
            # Our copies too: while any process holds a listening socket the kernel
            # keeps completing handshakes that nobody would ever answer.
            for socks in self.sockets:
                for sock in socks:
                    sock.close()
            # Nothing listens any more: status must not list them (issue 14).
            self.addresses = []

    def _prepare_dirs(self) -> None:
        # P10: the queue directory is ours alone.
        Path(self.cfg.queue.path).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.cfg.queue.path, 0o700)

    def on_worker_ready(self, slot: WorkerSlot) -> None:
        if not self.announced and all(s.ready.is_set() for s in self.slots):
            self.announced = True
            # Tests and benchmarks wait for this line; it carries the bound ports.
            log.info("ready", listeners=self.addresses, workers=self.workers,
                     pids=[s.proc.pid for s in self.slots if s.proc])
        elif self.announced:
            log.info("worker_restarted", slot=slot.slot, pid=slot.proc.pid if slot.proc else None)

    def cluster_status(self) -> dict[str, Any] | None:
        """[cluster]: the link and this node's share of each provider limit."""
        if self.cluster is None:
            return None
        return self.limits.status() if self.limits is not None else self.cluster.status()

    def request_stop(self) -> None:
        if not self.stopping:
            log.info("stopping")
            self.stopping = True
            self.stop_event.set()

    def reload(self) -> tuple[str, list[str]]:
        """Re-read the configuration file (SIGHUP, `ctl reload`). Returns what happened,
        for the operator: ("reloaded", the settings kept as started), ("skipped", [why])
        when there is no file to re-read, ("refused", [the error]) when it does not load."""
        if self.config_path is None:
            why = "running on the built-in defaults (started without -c FILE): no file to re-read"
            log.info("reload_skipped", reason=why)
            return "skipped", [why]
        try:
            cfg = config_mod.load(self.config_path)
            check_startup(cfg)  # a worker given a cert it cannot load would crash
        except config_mod.ConfigError as err:
            log.error("reload_refused", error=str(err))
            return "refused", [str(err)]
        kept: list[str] = []
        fixed = ("listeners", "queue", "control", "metrics")
        if changed := [f for f in fixed if getattr(cfg, f) != getattr(self.cfg, f)]:
            log.warning("reload_partial", reason="listeners, queue, control and metrics change only on restart")
            cfg = msgspec.structs.replace(cfg, **{f: getattr(self.cfg, f) for f in fixed})
            kept += changed
        # The HTTP API's socket is bound like a listener: its address and TLS stay; the
        # rest of [http] (tokens, limits) reloads.
        if (cfg.http.listen, cfg.http.tls) != (self.cfg.http.listen, self.cfg.http.tls):
            log.warning("reload_partial", reason="http.listen and http.tls change only on restart")
            cfg = msgspec.structs.replace(cfg, http=msgspec.structs.replace(
                cfg.http, listen=self.cfg.http.listen, tls=self.cfg.http.tls))
            kept.append("http.listen/http.tls")
        self.cfg = cfg
        log.configure(cfg.log.level)
        for slot in self.slots:
            slot.send(wire.Reload(config=config_mod.to_builtins(cfg)))
        log.info("reloaded")
        return "reloaded", kept

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        for slot in self.slots:
            slot.send(wire.Stop())
            if slot.proc is not None and slot.proc.returncode is None:
                try:
                    slot.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        bound = float(self.cfg.server.shutdown_timeout) + 10.0
        done, pending = await asyncio.wait(tasks, timeout=bound)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.warning("worker_killed", slot=slot.slot)
                slot.proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=5.0)


def serve(cfg: Config, config_path: str | None) -> int:
    """Run the supervisor in the foreground until TERM/INT; returns the exit status."""
    log.configure(cfg.log.level, role="supervisor")
    sup = Supervisor(cfg, config_path)
    try:
        return uvloop.run(sup.run())
    except config_mod.ConfigError as err:
        print(f"volley: {err}", file=sys.stderr)
        return 2
    finally:
        sup.claim.release()  # the addresses are free once we return (a test may serve again)
