"""Shared pieces of the control socket tests: a raw JSON-lines client, `volley ctl` as a
process, and a relay set-up (real supervisor, loopback DNS, sinks on 127.0.0.x)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.harness import REPO, ServeProcess

CTL_TIMEOUT = 60.0


def ask(path: str | Path, request: dict[str, Any] | bytes, timeout: float = CTL_TIMEOUT) -> dict[str, Any]:
    """One request on a fresh connection; the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        s.sendall(line)
        return json.loads(read_line(s))


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def ctl(server: ServeProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`volley ctl -c CONFIG ARGS...` as its own process (how an operator runs it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ctl", "-c", str(server.config_path), *args],
        capture_output=True, text=True, timeout=CTL_TIMEOUT, env=env,
        cwd=server.config_path.parent,
    )
    if check:
        assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def ctl_json(server: ServeProcess, *args: str) -> dict[str, Any]:
    return json.loads(ctl(server, "--json", *args).stdout)


def relay_overrides(dns_port: int, sink_port: int, **delivery: Any) -> dict[str, Any]:
    return {
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "min_ttl": "1s",
                "failure_ttl": "0s", "timeout": "2s"},
        "delivery": {"enabled": True, "port": sink_port, "poll_interval": "50ms",
                     "retry": "1s", "backoff": "1s", "backoff_max": "2s",
                     "timeouts": {"connect": "3s", "data": "20s", "quit": "2s"}, **delivery},
    }
