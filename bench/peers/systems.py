"""The systems under test, behind one small interface for bench/run.py.

Each is started in a fresh temporary directory, for one row (receive only, or relay to
the sink), and offers: `start() -> "host:port"`, `root_pid` (the top of its process tree
for CPU and memory), `drain(n, stall, cap) -> [seconds]` (relay: wait until the n
messages just sent have left its queue; returns each one's time from arrival to
delivery, as far as the system tells), `info()` and `stop()`.

* `Volley`: `volley serve` (bench/e2e.py's Server), delivery off for receive rows; for
  relay rows the loopback DNS server is its only nameserver and `delivery.port` is
  the sink's. Optionally the queue is prefilled before it starts (bench/control_live.py).
* `Postfix`: a private instance (bench/peers/postfix.py).
* `Aiosmtpd`: bench/peers/aiosmtpd_lmdb.py, receive only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from e2e import Server, bench_config, relay_config, write_config
from relay import queue_left
from relay_peers import LIFETIME, DeliveryLog

from peers import postfix
from peers.procs import free_port

HERE = Path(__file__).resolve().parent


class _Served:
    """A system that is one `Server` (bench/e2e.py) in a temporary directory of its own."""

    def __init__(self, prefix: str, ready_timeout: float) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix=prefix)
        self.tmp = Path(self._tmpdir.name)
        self.ready_timeout = ready_timeout
        self.server: Server | None = None
        self.details: dict[str, Any] = {}

    def _serve(self, cmd: list[str], config: Path) -> str:
        # `timeout`: a server outlives no crashed runner by more than LIFETIME seconds.
        self.server = Server(["timeout", "-k", "10", str(LIFETIME), *cmd], config, self.tmp)
        return self.server.wait_ready(self.ready_timeout)

    @property
    def root_pid(self) -> int:
        assert self.server is not None
        return self.server.proc.pid

    def _stopped(self) -> None:
        """After the server stopped, before its directory goes."""

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.details["exit"] = self.server.stop()
                self._stopped()
        finally:
            self._tmpdir.cleanup()


class Volley(_Served):
    def __init__(self, durability: str, workers: int, cmd: list[str], relay: tuple[int, int] | None,
                 ready_timeout: float, prefill: tuple[int, int] = (0, 0)) -> None:
        """relay: (dns_port, sink_port) or None for receive only; prefill: (messages,
        domains) deferred an hour ahead, written before the server starts."""
        super().__init__(f"volley-run-{durability}-", ready_timeout)
        self.durability, self.workers, self.cmd = durability, workers, cmd
        self.relay, self.prefill = relay, prefill
        self.dlog = DeliveryLog(self.tmp / "delivery.jsonl")
        self.delivered = 0

    def config(self) -> dict[str, Any]:
        if self.relay is None:
            return bench_config(self.tmp, self.durability, self.workers)
        return relay_config(self.tmp, self.durability, self.workers, *self.relay, dns_timeout="10s")

    def start(self) -> str:
        if self.prefill[0]:
            sys.path.insert(0, str(HERE.parent))
            from control_live import WORKERS, fill  # noqa: E402  (a bench script, imported late: heavy)

            if WORKERS != self.workers:
                raise RuntimeError(f"prefill writes {WORKERS} shards; the server runs {self.workers} workers")
            seconds, _ = fill(self.tmp / "queue", self.prefill[0], self.prefill[1], time.time())
            self.details["prefill_s"] = round(seconds, 1)
            self.details["prefill"] = self.prefill[0]
        return self._serve(self.cmd, write_config(self.tmp, self.durability, self.workers, self.config()))

    def drain(self, n: int, stall: float, cap: float) -> list[float]:
        self.delivered += n
        lines = self.dlog.wait_delivered(self.delivered, stall, cap)
        return [float(r["queue_time"]) for r in lines
                if r.get("outcome") == "delivered" and r.get("queue_time") is not None]

    def flush(self) -> None:
        """`volley ctl flush`: deferred mail is due now (a warm-up's DNS timeouts)."""
        from engine.control.client import request
        from engine.control.protocol import Flush

        request(str(self.tmp / "volley.sock"), Flush(), 10.0)

    def diagnostics(self) -> str:
        self.dlog.read()  # what happened since the last wait
        try:
            lines = (self.tmp / "delivery.jsonl").read_text().splitlines()
        except OSError:
            lines = []
        other = [line for line in lines if '"outcome":"delivered"' not in line][-5:]
        tail = "\n".join(f"  > {line[:400]}" for line in [*other, *list(self.dlog.tail)[-3:]])
        return f"delivery log {dict(self.dlog.outcomes)}\n{tail}\n{self.server.log() if self.server else ''}"

    def _stopped(self) -> None:
        if self.relay is not None and not self.prefill[0]:
            self.details["queue_left"] = queue_left(self.tmp / "queue")


class Postfix:
    def __init__(self, relay_to: str | None, transport: dict[str, str] | None = None) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="volley-run-postfix-")
        self.listen = f"127.0.0.1:{free_port('127.0.0.1')}"
        self.instance = postfix.PostfixInstance(Path(self._tmpdir.name), self.listen, relay_to, transport)
        self.relay = relay_to is not None
        self.details: dict[str, Any] = {}

    def start(self) -> str:
        self.instance.start()
        return self.listen

    @property
    def root_pid(self) -> int:
        return self.instance.master_pid

    def drain(self, n: int, stall: float, cap: float) -> list[float]:
        self.instance.wait_drained(stall, cap)
        # postlogd writes the log a moment after the queue file is gone.
        delays: list[float] = []
        deadline = time.monotonic() + 5
        while len(delays) < n and time.monotonic() < deadline:
            delays += self.instance.delays()
            time.sleep(0.05)
        return delays

    def diagnostics(self) -> str:
        return f"postfix queue {self.instance.queued()} files; log:\n{self.instance.log_tail()}"

    def stop(self) -> None:
        try:
            self.instance.stop()
            self.details["queue_left"] = self.instance.queued() if self.relay else None
        finally:
            self._tmpdir.cleanup()


class Aiosmtpd(_Served):
    def __init__(self, ready_timeout: float) -> None:
        super().__init__("volley-run-aiosmtpd-", ready_timeout)

    def start(self) -> str:
        (self.tmp / "queue").mkdir()
        path = write_config(self.tmp, "fsync", 1)
        return self._serve([sys.executable, str(HERE / "aiosmtpd_lmdb.py")], path)

    def drain(self, n: int, stall: float, cap: float) -> list[float]:
        raise RuntimeError("aiosmtpd+lmdb only receives")

    def diagnostics(self) -> str:
        return self.server.log() if self.server else ""
