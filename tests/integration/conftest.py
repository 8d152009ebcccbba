"""Fixtures for real-part tests: servers on loopback, LMDB in tmp dirs, trustme TLS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from engine.lab.dns import DnsServerThread
from tests.integration.harness import InboundServer, LoopThread, ServeProcess


@pytest.fixture
def inbound(tmp_path: Path) -> Iterator[Callable[..., InboundServer]]:
    """Factory: inbound(overrides) → a running in-process InboundServer."""
    servers: list[InboundServer] = []

    def start(overrides: dict[str, Any] | None = None) -> InboundServer:
        server = InboundServer(tmp_path / f"s{len(servers)}", overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory: serve(overrides) → a running `volley serve` process tree."""
    procs: list[ServeProcess] = []

    def start(overrides: dict[str, Any] | None = None, **kw: Any) -> ServeProcess:
        (tmp_path / f"p{len(procs)}").mkdir()
        proc = ServeProcess(tmp_path / f"p{len(procs)}", overrides, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """Server cert/key for mx.volley.test and 127.0.0.1, plus the CA file."""
    cert = ca.issue_cert("mx.volley.test", "127.0.0.1")
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    ca_file = tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return {"cert_file": str(cert_file), "key_file": str(key_file), "ca_file": str(ca_file)}


@pytest.fixture
def peers() -> Iterator[LoopThread]:
    """A loop thread for sinks: `sink = peers.call(start_sink("127.0.0.2", 0))`."""
    lt = LoopThread()
    sinks: list[Any] = []
    lt.sinks = sinks  # type: ignore[attr-defined]
    yield lt
    for sink in sinks:
        lt.call(sink.close())
    lt.close()


@pytest.fixture
def dns_zone() -> Iterator[Callable[[dict[str, Any]], Any]]:
    """Factory: dns_zone(zone) → a running loopback DNS server (`.port`, `.set`, `.count`)."""
    threads: list[DnsServerThread] = []

    def start(zone: dict[str, Any]) -> Any:
        t = DnsServerThread(zone)
        threads.append(t)
        return t.__enter__()

    yield start
    for t in threads:
        t.__exit__(None, None, None)
