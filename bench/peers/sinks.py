"""The destination every relay delivers to, one per benchmark invocation, on 127.0.0.2.

Two kinds with one interface (`port`, `label`, `proc`, `settle()`, `expect(n)`,
`wait_reached(n, stall, cap)`, `stop()`):
* `CSink`: Postfix's `smtp-sink -c` (C, stores nothing, advertises PIPELINING). Its
  `-c` counter ("sess=… quit=… mesg=N", one per message, separated by CR) is followed
  on a thread, which stamps time.monotonic() when each expected count is reached.
* `PySink`: the Python sink (`python -m engine.lab.sink`, the same as `volley sink`
  when it is there and has what is asked of it, e.g. `--latency`), which reports
  reached targets itself (bench/relay_peers.Sink).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time

from e2e import REPO, _env, stop_group
from relay_peers import LIFETIME, SINK_HOST, Peer, Sink

from peers.procs import free_port, smtp_banner

SMTP_SINK = "/usr/sbin/smtp-sink"
MAX_SESSIONS = 15000
_MESG = re.compile(rb"mesg=(\d+)")
_SESS = re.compile(rb"sess=(\d+)")


class CSink:
    def __init__(self) -> None:
        self.port = free_port(SINK_HOST)
        self.label = "smtp-sink (Postfix, C, stores nothing, PIPELINING)"
        # As root smtp-sink insists on dropping privileges after binding. -m: it takes
        # 256 connections at most by default, and a relay keeps an idle connection per
        # destination domain open for a while (the 10,000-domain row).
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", str(LIFETIME), SMTP_SINK, *user, "-c", "-m", str(MAX_SESSIONS),
             f"{SINK_HOST}:{self.port}", "4096"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        self.messages = 0
        self.sessions = 0
        self.targets: list[int] = []
        self.reached: dict[int, float] = {}
        self.cond = threading.Condition()
        self.err: collections.deque[str] = collections.deque(maxlen=20)
        # Both pipes are drained all the time: a full pipe would stall smtp-sink.
        self._threads = [threading.Thread(target=self._follow, daemon=True),
                         threading.Thread(target=self._errors, daemon=True)]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 10
        while not smtp_banner(SINK_HOST, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"smtp-sink did not start on {SINK_HOST}:{self.port}: {' | '.join(self.err)}")
            time.sleep(0.05)

    def _errors(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err.append(raw.decode("utf-8", "replace").rstrip())

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while chunk := os.read(fd, 65536):
            now = time.monotonic()
            data = tail + chunk
            cut = data.rfind(b"\r") + 1  # the last counter may be cut in two
            tail = data[cut:]
            counts = _MESG.findall(data[:cut])
            if not counts:
                continue
            sess = _SESS.findall(data[:cut])
            with self.cond:
                self.messages = int(counts[-1])
                self.sessions = int(sess[-1]) if sess else self.sessions
                while self.targets and self.messages >= self.targets[0]:
                    self.reached[self.targets.pop(0)] = now
                self.cond.notify_all()

    def counts(self) -> tuple[int, int]:
        with self.cond:
            return self.messages, self.sessions

    def settle(self) -> tuple[int, int]:
        """Counts once they have not changed for half a second."""
        seen, since = self.counts(), time.monotonic()
        while time.monotonic() - since < 0.5:
            time.sleep(0.1)
            if (now := self.counts()) != seen:
                seen, since = now, time.monotonic()
        return seen

    def expect(self, target: int) -> None:
        with self.cond:
            if self.messages >= target:
                self.reached[target] = time.monotonic()
            else:
                self.targets = sorted([*self.targets, target])

    def wait_reached(self, target: int, stall: float, cap: float) -> float:
        deadline = time.monotonic() + cap
        with self.cond:
            last, progress = self.messages, time.monotonic()
            while target not in self.reached:
                now = time.monotonic()
                if self.messages != last:
                    last, progress = self.messages, now
                if self.proc.poll() is not None:
                    raise RuntimeError(f"smtp-sink exited {self.proc.returncode}")
                if now - progress > stall or now > deadline:
                    why = f"no progress for {stall:.0f}s" if now <= deadline else f"{cap:.0f}s cap"
                    raise RuntimeError(f"sink has {self.messages}/{target} messages ({why});"
                                       f" smtp-sink stderr: {' | '.join(self.err) or '-'}")
                self.cond.wait(0.2)
            return self.reached.pop(target)

    def stop(self) -> None:
        stop_group(self.proc)
        for t in self._threads:
            t.join(2)


class PySink(Sink):
    """`volley sink --json --no-starttls` as its own process (`extra`: more options).

    `hosts`: the addresses it listens on, all on one port (a relay has one delivery
    port for every MX address), which must then be free on each: it is picked on the
    first and the start is retried with another if one of the others has it taken."""

    def __init__(self, extra: tuple[str, ...] = (), hosts: tuple[str, ...] = (SINK_HOST,)) -> None:
        for attempt in range(3):
            port = 0 if len(hosts) == 1 else free_port(hosts[0])
            listen = [arg for host in hosts for arg in ("--listen", f"{host}:{port}")]
            Peer.__init__(self, "sink", ["-m", "engine.lab.sink", "--json", "--no-starttls", *listen,
                                         "--interval", "0.2", "--lifetime", str(LIFETIME - 60),
                                         "--targets-from-stdin", *extra],
                          stdin=True)
            try:
                ready = self.wait_event("ready", 30)
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        self.port = int(ready["listeners"][0].rpartition(":")[2])
        self.hosts = hosts
        where = [f"on {hosts[0]}..{hosts[-1]} ({len(hosts)} addresses)"] if len(hosts) > 1 else []
        self.label = " ".join(["volley sink", *extra, *where])


def volley_sink_supports(*options: str) -> bool:
    """Whether `volley sink` exists here and its --help names every one of `options`."""
    try:
        done = subprocess.run([sys.executable, "-m", "engine", "sink", "--help"], capture_output=True,
                              text=True, timeout=30, cwd=REPO, env=_env())
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and all(opt in done.stdout for opt in options)
