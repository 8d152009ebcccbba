"""The blocking client side of the control socket: one request line, one reply line.

`volley ctl` is a short-lived process, so a plain blocking AF_UNIX socket is all it
needs; no event loop. Errors come back as two kinds: `ControlUnavailable` when nothing
answers on the path (the server is not running, or not reachable by this user), and
`ControlError` when something answered but not with a usable reply (timeout, closed
early, not JSON).
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

import orjson

from engine.control.protocol import Request, encode_request

DEFAULT_SOCKET = "var/volley.sock"
MAX_REPLY = 16 * 1024 * 1024  # a `list` of 10,000 rows is a few MiB; more is a broken server
_CHUNK = 256 * 1024


class ControlError(Exception):
    """The control socket answered, but not with a usable reply."""


class ControlUnavailable(ControlError):
    """Nothing answers on `path`; `reason` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"nothing answers on {path} ({reason})")
        self.path = path
        self.reason = reason


def socket_path(config_path: str | None, socket_arg: str | None) -> str:
    """Where to connect: --socket, else control.socket of the -c file, else the default.

    A relative path stays relative to the current directory, as `volley serve` binds it.

    Raises:
        engine.config.ConfigError: the -c file cannot be read or is invalid.
    """
    if socket_arg:
        return socket_arg
    if config_path is not None:
        from engine.config import load  # only when -c is given: it pulls in tomllib/msgspec

        return load(config_path).control.socket or DEFAULT_SOCKET
    return DEFAULT_SOCKET


def unavailable_reason(err: OSError) -> str:
    """A few words for why a connect failed; the errno name stays greppable."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOENT:
        return "no such socket"
    if err.errno == errno.ECONNREFUSED:
        return "connection refused"
    if err.errno is not None and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def request(path: str, req: Request, timeout: float | None) -> dict[str, Any]:
    """Send `req` to the control socket at `path` and return its decoded reply.

    `timeout` bounds the whole exchange in seconds (None waits for ever: a bounce of a
    big queue or a drain may legitimately take minutes).

    Raises:
        ControlUnavailable: connect failed (no socket, refused, permission denied).
        ControlError: no reply within `timeout`, the connection closed early, or the
            reply is not a JSON object.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError:
            raise ControlError(_late(path, timeout)) from None
        except OSError as err:
            raise ControlUnavailable(path, unavailable_reason(err)) from None
        try:
            sock.sendall(encode_request(req))
            line = _read_line(sock, deadline)
        except TimeoutError:
            raise ControlError(_late(path, timeout)) from None
        except OSError as err:
            raise ControlError(f"{path}: {err.strerror or err}") from None
    if line is None:
        raise ControlError(f"{path}: connection closed before a reply")
    return _decode(path, line)


def _late(path: str, timeout: float | None) -> str:
    return f"no reply from {path} within {timeout:g}s (--timeout to wait longer, 0 for ever)"


def _read_line(sock: socket.socket, deadline: float | None) -> bytes | None:
    """Bytes up to the first newline; None if the peer closed first.

    Raises:
        TimeoutError: the deadline passed.
        ControlError: the reply grew past MAX_REPLY without a newline.
    """
    buf = bytearray()
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        chunk = sock.recv(_CHUNK)
        if not chunk:
            return None
        # Only the new chunk can hold the newline: no rescans of a multi-MiB buffer.
        nl = chunk.find(b"\n")
        if nl >= 0:
            buf += chunk[:nl]
            return bytes(buf)
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise ControlError(f"reply longer than {MAX_REPLY} bytes without a newline")


def _decode(path: str, line: bytes) -> dict[str, Any]:
    try:
        reply = orjson.loads(line)
    except orjson.JSONDecodeError:
        head = line[:80].decode("utf-8", "replace")
        raise ControlError(f"{path}: reply is not JSON: {head!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f'{path}: reply is not a JSON object with "ok"')
    return reply

