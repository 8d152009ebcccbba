"""Fixtures for the fleet tests: a real `redis-server` on loopback that a test can kill
and restart, and `volley serve` nodes on 127.0.0.x sharing it through `[cluster]`.

redis-server runs with no persistence (`--save "" --appendonly no`): a restart starts
empty, as a Redis that lost its data would, which is the harder case for the nodes.
Readiness is Redis answering PING, never a sleep; every wait has a deadline. Without
a redis-server binary (Debian package redis-server, `make system-deps`) the tests skip
and say so."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from engine.lab.loop_thread import LoopThread
from tests.cluster.fleet_helpers import Provider

# The integration fixtures (sinks on the peers loop, loopback DNS, serve processes):
# imported here so the fleet tests use the same real parts.
from tests.integration.conftest import dns_zone, peers, serve  # noqa: F401
from tests.integration.harness import ServeProcess, merge
from tests.integration.test_pool import free_port

REDIS_HOST = "127.0.0.1"
READY_TIMEOUT = 20.0


class RedisServer:
    """One redis-server process on REDIS_HOST:port; `kill()` is SIGKILL (Redis gone at
    once, as a crash or a cut network looks to the nodes), `start()` again restarts it
    on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port(REDIS_HOST)
        self.url = f"redis://{REDIS_HOST}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = self.workdir / f"redis-{self.starts}.log"
        self.proc = subprocess.Popen(
            [self.binary, "--bind", REDIS_HOST, "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--logfile", str(log), "--protected-mode", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not answering PING in {READY_TIMEOUT}s")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def client(self) -> redis.Redis:
        """A plain (sync, bytes) client for the test's own independent reads."""
        return redis.Redis(host=REDIS_HOST, port=self.port, socket_timeout=5,
                           socket_connect_timeout=5)

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone (the port refuses)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on loopback (killable, restartable); skips without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is missing (Debian package redis-server; `make system-deps`)")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, workdir)
    server.start()
    yield server
    server.stop()


NODE_IPS = tuple(f"127.0.0.{20 + i}" for i in range(8))


def cluster_overrides(redis_url: str, name: str, ip: str, **cluster: Any) -> dict[str, Any]:
    """A node's own part of the config: its listener on its own loopback address and
    the `[cluster]` section (a fast heartbeat so tests see changes within seconds; a
    timeout a loaded test machine does not reach while Redis is up)."""
    return {
        "listeners": [{"address": f"{ip}:0"}],
        "cluster": {"redis": redis_url, "node_name": name, "key_prefix": "volleytest:",
                    "heartbeat": "250ms", "lease_ttl": "3s", "timeout": "2s", **cluster},
    }


@pytest.fixture
def nodes(serve: Callable[..., ServeProcess], redis_server: RedisServer,
          ) -> Callable[..., list[ServeProcess]]:
    """Factory: nodes(n, overrides, **cluster) → n `volley serve` processes named
    node0..node{n-1}, listening on 127.0.0.20+i, all on the test's redis-server.
    `overrides` (the shared config: DNS, delivery, shaping) applies to every node; the
    `serve` fixture stops them all at the end."""
    started: list[ServeProcess] = []

    def start(n: int, overrides: dict[str, Any] | None = None, **cluster: Any) -> list[ServeProcess]:
        out = []
        for i in range(len(started), len(started) + n):
            own = cluster_overrides(redis_server.url, f"node{i}", NODE_IPS[i], **cluster)
            proc = serve(merge(overrides or {}, own))
            out.append(proc)
            started.append(proc)
        return out

    return start


@pytest.fixture
def shaped_provider(peers: LoopThread, dns_zone: Any) -> Callable[..., Provider]:
    """Factory: shaped_provider(latency=0.05) → the shaped provider's sinks and DNS
    (fleet_helpers.Provider), stopped with the peers at the end."""
    return lambda latency=0.05: Provider(peers, dns_zone, latency=latency)
