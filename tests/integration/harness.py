"""Real servers for integration tests: in-process (a worker runtime on its own uvloop
thread) and as real processes (`volley serve`). Readiness always comes from the
server itself (the runtime's start, or the supervisor's "ready" log line), never from
a sleep; every wait has a deadline."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import tomli_w
import uvloop

from engine import config as config_mod
from engine.lab.loop_thread import LoopThread as LoopThread  # the tests import it from here
from engine.worker import WorkerRuntime

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(tmp: Path) -> dict[str, Any]:
    """Everything under `tmp`, a free port, and no way out of loopback: delivery is
    off unless a test turns it on, and then DNS must point at a loopback server."""
    return {
        "server": {"hostname": "mx.volley.test", "shutdown_timeout": "5s"},
        "listeners": [{"address": "127.0.0.1:0"}],
        "queue": {"path": str(tmp / "queue"), "max_size": "256MiB"},
        "control": {"socket": str(tmp / "volley.sock")},
        "log": {"delivery": str(tmp / "delivery.jsonl")},
        "delivery": {"enabled": False},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "2s"},
    }


class InboundServer:
    """A worker runtime (store, group commit, SMTP listeners) on a loop thread."""

    def __init__(self, tmp: Path, overrides: dict[str, Any] | None = None) -> None:
        data = merge(base_config(tmp), overrides or {})
        self.cfg = config_mod.from_dict(data)
        self.loop = uvloop.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(ctx))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.sockets = []
        for listener in self.cfg.listeners:
            host, port = config_mod.split_host_port(listener.address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, port))
            sock.listen(128)
            self.sockets.append(sock)
        self.ports = [s.getsockname()[1] for s in self.sockets]
        self.port = self.ports[0]
        # The injection API's socket, as the supervisor would hand it down ([http] listen).
        self.http_socket: socket.socket | None = None
        if self.cfg.http.listen:
            host, port = config_mod.split_host_port(self.cfg.http.listen)
            self.http_socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self.http_socket.bind((host, port))
            self.http_socket.listen(128)
            self.http_port = self.http_socket.getsockname()[1]
        self.runtime: WorkerRuntime = self.call(
            WorkerRuntime.start(self.cfg, self.sockets, http_socket=self.http_socket))

    def commit(self, op: Any) -> Any:
        """Run a write op through the worker's own committer (its one writer) and wait
        for the commit; re-raise what the op raised."""

        async def run() -> Any:
            fut = asyncio.get_running_loop().create_future()
            self.runtime.committer.submit(op, fut.set_result)
            res = await fut
            if isinstance(res, BaseException):
                raise res
            return res

        return self.call(run())

    def call(self, coro_or_fn: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine or a plain function on the server's loop thread."""
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(timeout)

        async def wrap() -> Any:
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    @property
    def store(self) -> Any:
        return self.runtime.store

    def queued(self) -> int:
        return int(self.call(self.runtime.store.count))

    def stop(self) -> None:
        try:
            self.call(self.runtime.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            for s in [*self.sockets, *([self.http_socket] if self.http_socket else [])]:
                s.close()
        assert not self.errors, f"unhandled loop errors: {self.errors}"


class ServeProcess:
    """`volley serve -c FILE` as a real process tree; logs parsed as JSON lines."""

    def __init__(self, tmp: Path, overrides: dict[str, Any] | None = None,
                 ready_timeout: float = 60.0) -> None:
        data = merge(merge(base_config(tmp), {"server": {"workers": 2}}), overrides or {})
        self.config_path = tmp / "volley.toml"
        self.config_path.write_text(tomli_w.dumps(data))
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, cwd=tmp, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_for(lambda e: e.get("event") == "ready", ready_timeout)
        self.listeners: list[str] = ready["listeners"]
        self.port = int(self.listeners[0].rsplit(":", 1)[1])
        self.worker_pids: list[int] = ready["pids"]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                event = {"event": "stderr", "text": raw.decode(errors="replace")}
            self.lines.put(event)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """The next log event matching `predicate` (events seen are kept in .log)."""
        for seen in self.log:
            if predicate(seen) and not seen.get("_consumed"):
                seen["_consumed"] = True
                return seen
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching log event in {timeout}s; saw {self.log[-20:]}")
            try:
                event = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.log.append(event)
            if predicate(event):
                event["_consumed"] = True
                return event

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        return self.proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until true or the deadline; the pause is between checks of a
    real condition, never a stand-in for one."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)
