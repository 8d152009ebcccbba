"""Which process carried how many bytes to a port, from the kernel's per-socket counters.

A relay's delivery work per worker, counted outside the relay: every outbound SMTP
connection to the sink's port belongs to one worker process, and the kernel keeps each
TCP socket's `bytes_acked` (what the peer acknowledged: header, body, commands). `ss
-tinpH` lists them with the owning pid; a thread samples them every `interval` seconds
and keeps each socket's largest count, so a connection that stays open (a relay's pool
keeps them) is counted in full at the last sample after the run, and one that closed
between two samples loses at most its last interval. The shares per pid are then the
delivery split, which CPU cannot give (each worker also receives, and the intake's CPU
is in the same process).
"""

from __future__ import annotations

import re
import subprocess
import threading

_PID = re.compile(r"pid=(\d+)")
_ACKED = re.compile(r"bytes_acked:(\d+)")


def sample(port: int) -> dict[tuple[str, int], tuple[int, int]]:
    """(local address, pid) -> (pid, bytes_acked) of every established TCP socket whose
    remote port is `port` (empty when `ss` is missing or fails)."""
    try:
        done = subprocess.run(["ss", "-tinpH", "state", "established", "dport", "=", f":{port}"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[tuple[str, int], tuple[int, int]] = {}
    key: tuple[str, int] | None = None
    pid = 0
    for line in done.stdout.splitlines():
        if not line[:1].isspace():  # a socket: Recv-Q Send-Q Local Peer users:((...))
            fields = line.split()
            m = _PID.search(line)
            pid = int(m.group(1)) if m else 0
            key = (fields[2], pid) if len(fields) > 2 else None
        elif key is not None and (m := _ACKED.search(line)):
            out[key] = (pid, max(0, int(m.group(1)) - 1))  # Linux counts the SYN as one byte acked
            key = None
    return out


class SocketBytes:
    """Samples `sample(port)` on a thread between start() and stop(); stop() returns the
    bytes per owning pid in between."""

    def __init__(self, port: int, interval: float = 0.5) -> None:
        self.port = port
        self.interval = interval
        self.best: dict[tuple[str, int], tuple[int, int]] = {}
        self.banked: dict[int, int] = {}  # counts of sockets whose local address was reused
        self.samples = 0
        self.baseline: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _take(self) -> None:
        for key, (pid, acked) in sample(self.port).items():
            old = self.best.get(key)
            if old is not None and acked < old[1]:  # a new connection on the same local port
                self.banked[pid] = self.banked.get(pid, 0) + old[1]
            if old is None or acked != old[1]:
                self.best[key] = (pid, acked)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> SocketBytes:
        self._take()
        self.baseline = self.per_pid()  # connections already open count from here
        self._thread.start()
        return self

    def stop(self) -> dict[int, int]:
        """Bytes per pid since start()."""
        self._stop.set()
        self._thread.join(10)
        self._take()  # the final counts of the connections still open
        return delta(self.baseline, self.per_pid())

    def per_pid(self) -> dict[int, int]:
        out = dict(self.banked)
        for pid, acked in self.best.values():
            out[pid] = out.get(pid, 0) + acked
        return out


def delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    """Bytes per pid between two per_pid() results."""
    return {pid: n - before.get(pid, 0) for pid, n in after.items() if n - before.get(pid, 0) > 0}
