"""bench/dests.py's topology and bench/peers/sockbytes.py's counts, on real loopback sockets.

Run by `make bench` (its first pytest step), beside bench/test_charts.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dests  # noqa: E402  (bench/ is not a package)
from peers import sockbytes  # noqa: E402


def test_zone_and_transport_map_agree_on_every_domain() -> None:
    zone = dests.zone(dests.DOMAINS)
    hops = dests.transport(dests.DOMAINS, 2600)
    per_address: dict[str, int] = {}
    for i in range(dests.DOMAINS):
        mx = zone[f"d{i}.example"]["MX"][0][1]
        (address,) = zone[mx]["A"]
        assert hops[f"d{i}.example"] == f"[{address}]:2600"  # Volley and Postfix reach the same place
        per_address[address] = per_address.get(address, 0) + 1
    assert sorted(per_address) == sorted(dests.ADDRESSES)  # 127.0.0.2 .. 127.0.0.101, all used
    assert set(per_address.values()) == {10}  # ten domains per address


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_socket_bytes_counts_what_a_connection_carried() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        counter = sockbytes.SocketBytes(port, interval=0.05).start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            peer, _ = server.accept()
            with peer:
                sent = 0
                for chunk in (b"x" * 1000, b"y" * 25_000, b"z" * 7):
                    client.sendall(chunk)
                    sent += len(chunk)
                got = 0
                peer.settimeout(10)
                while got < sent:  # all of it received, so all of it acknowledged
                    got += len(peer.recv(65536))
                carried = counter.stop()  # its last sample sees the connection still open
    assert carried == {os.getpid(): sent}  # one socket, this process, every byte once
