"""Binding the listening sockets, one per (listener, worker), and claiming each address.

Each (listener, worker) pair gets its own socket bound with SO_REUSEPORT, so the
kernel spreads new connections evenly over workers (measured: one shared accept
socket split persistent sessions 20,000 to 0). SO_REUSEPORT would also let any
process of the same user join the address, so a second `volley serve` would bind
without an error and the kernel would split mail between two unrelated queues: the
supervisor therefore holds, for its lifetime, an exclusive claim per address
(`ListenClaim`, an abstract Unix socket named after it: unique per network namespace
like the address itself, gone when the process dies).

The HTTP injection API (`http.listen`) is bound the same way, with its own claim, and
its sockets come LAST in what `bind_listeners` returns: a worker is handed the SMTP
sockets in `[[listeners]]` order, then the HTTP one (engine/worker.py splits them by
that count), and the supervisor passes them all down without telling them apart.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from engine import config as config_mod
from engine.config import Config, split_host_port


class ListenClaim:
    """This server's exclusive claim on listening addresses, held for its lifetime.

    One abstract Unix socket per address, named "\\0volley-listen/HOST:PORT": a second
    server's bind of the same name fails (EADDRINUSE) while we live, and the kernel
    drops the name when we die. A non-Volley process takes no claim: the probe bind
    in `_bind_one` finds it, and any holder of an overlapping address (0.0.0.0, ::).
    """

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def take(self, key: str, address: str) -> None:
        """Claim `address`; `key` names the setting in errors ("listeners[0].address")."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0volley-listen/{address}")
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                raise config_mod.ConfigError(
                    f"{key}: {address} is already served by another "
                    "Volley server") from None
            raise config_mod.ConfigError(
                f"{key}: cannot claim {address}: {err.strerror}") from None
        self._held.append(sock)

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


def _address_text(host: str, port: int) -> str:
    """One spelling per address, so "::1" and "0:0::1" claim the same name."""
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listeners(
    cfg: Config, workers: int, claim: ListenClaim
) -> tuple[list[list[socket.socket]], list[str]]:
    """One socket per (listener, worker slot); returns them and the bound addresses.

    Each address is claimed (`claim`) before any socket of ours listens on it: a
    second server fails here without ever taking a connection from the first. With
    `http.listen` set, its sockets come last and its address reads "http://HOST:PORT"
    (or https), so a log line or `ctl status` tells it from the SMTP ones.
    """
    per_listener: list[list[socket.socket]] = []
    bound: list[str] = []
    wanted = [(f"listeners[{i}].address", listener.address, "")
              for i, listener in enumerate(cfg.listeners)]
    if cfg.http.listen:
        wanted.append(("http.listen", cfg.http.listen, "https://" if cfg.http.tls else "http://"))
    try:
        for key, address, scheme in wanted:
            per_listener.append(_bind_one(key, address, workers, claim))
            port = per_listener[-1][0].getsockname()[1]
            bound.append(scheme + _address_text(split_host_port(address)[0], port))
    except BaseException:
        for socks in per_listener:
            for s in socks:
                s.close()
        raise
    return per_listener, bound


def _bind_one(key: str, address: str, workers: int, claim: ListenClaim) -> list[socket.socket]:
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        claim.take(key, _address_text(host, port))
        # The claim covers this exact address; a holder of an overlapping one
        # (0.0.0.0 or :: on this port, another server's or anyone's) shows up as a
        # bind without SO_REUSEPORT failing. Port 0 gets a port nobody holds.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            _bind(probe, key, address, host, port)
    socks: list[socket.socket] = []
    try:
        for n in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _bind(sock, key, address, host, port)
            if n == 0 and not port:
                # Bound, not yet listening: takes no connection. The port is known now.
                port = sock.getsockname()[1]
                claim.take(key, _address_text(host, port))
            sock.listen(1024)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _bind(sock: socket.socket, key: str, address: str, host: str, port: int) -> None:
    try:
        sock.bind((host, port))
    except OSError as err:
        where = "listeners" if key.startswith("listeners") else key
        raise config_mod.ConfigError(f"{where}: cannot bind {address}: {err.strerror}") from None
