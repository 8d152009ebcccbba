"""Message priority: does a password reset overtake a newsletter queued for one throttled
provider, and what does reading the due index lane by lane cost the scheduler?

    .venv/bin/python bench/priority.py deliver                 # 100,000 queued, ~1-2 minutes
    .venv/bin/python bench/priority.py deliver --messages 20000 --rate 200 --json
    .venv/bin/python bench/priority.py scan                    # the scan micro-benchmark, ~10 s

`deliver`: one in-process worker (the engine's WorkerRuntime, default settings: fsync
queue, delivery.max_ready 20,000), a loopback DNS zone and a sink on 127.0.0.2. The
provider's domain is throttled like `volley ctl throttle provider.test --rate R
--connections 2`; N one-recipient newsletter messages (1 KB, priority 5) go straight into
the queue in commits of 1,000, as the HTTP API would put them. Once the sink has seen
`--warm` of them (the in-flight set is full by then), one message with
`Volley-Priority: 9` is sent over SMTP from 127.0.0.1 (a relay-network client), and
the bench reports the time from its 250 to its arrival at the sink, and how many
newsletter messages arrived in between. It stops there (the rest would take N/R s
more). `--patience` caps the wait (an engine without priorities delivers it last).

`scan`: a QueueStore with N units of one owner (dues 0.3 ms apart: a newsletter queued
at ~3,000 messages/s), timing the scheduler's due-index reads: the first batch of a
fresh shard, an incremental scan with 20,000 units in flight (resume point 1 s before
the newest dispatched), a full scan past those 20,000, and (lanes only) the scan of
the priority lanes that now runs when the in-flight set is full. Median of 30 runs.

Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import config as config_mod  # noqa: E402
from engine.delivery.holds import HOLDS_KEY, Holds, Throttle, encode_holds  # noqa: E402
from engine.lab.dns import DnsServerThread  # noqa: E402
from engine.lab.loop_thread import LoopThread  # noqa: E402
from engine.lab.sink.protocol import start_sink  # noqa: E402
from engine.queue.ids import IdAllocator  # noqa: E402
from engine.queue.records import MessageRecord, Recipient  # noqa: E402
from engine.queue.store import QueueStore  # noqa: E402
from engine.worker import WorkerRuntime  # noqa: E402

DOMAIN = "provider.test"
SENDER = "news@home.test"
NEWS = (f"From: <{SENDER}>\r\nTo: <someone@{DOMAIN}>\r\nSubject: newsletter\r\n\r\n"
        + "x" * 70 + "\r\n") * 12
RESET = (f"From: <{SENDER}>\r\nTo: <reset@{DOMAIN}>\r\nSubject: password reset\r\n"
         "Volley-Priority: 9\r\nX-Bench-Priority: 1\r\n\r\nyour code: 123456\r\n")


# --- deliver ----------------------------------------------------------------------------------
class Bench:
    """The worker, its DNS and sink, and the moment the priority message arrives."""

    def __init__(self, tmp: Path, rate: float) -> None:
        self.peers = LoopThread()
        self.arrived = threading.Event()
        self.arrived_at = 0.0
        self.before_it = 0  # newsletter messages the sink had when it arrived
        self.sink = self.peers.call(start_sink("127.0.0.2", 0, record=False,
                                               on_message=self._seen))
        self.dns_thread = DnsServerThread({DOMAIN: {"MX": [(10, f"mx.{DOMAIN}")]},
                                           f"mx.{DOMAIN}": {"A": ["127.0.0.2"]}})
        dns = self.dns_thread.__enter__()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.cfg = config_mod.from_dict({
            "server": {"hostname": "mx.volley.test", "shutdown_timeout": "2s"},
            "listeners": [{"address": "127.0.0.1:0"}],
            "queue": {"path": str(tmp / "queue"), "max_size": "2GiB"},
            "control": {"socket": str(tmp / "volley.sock")},
            "log": {"delivery": str(tmp / "delivery.jsonl")},
            "delivery": {"enabled": True, "port": self.sink.port},
            "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": "2s"},
        })
        self.loop = LoopThread()
        self.runtime: WorkerRuntime = self.loop.call(WorkerRuntime.start(self.cfg, [self.listener]))
        assert self.runtime.delivery is not None
        holds = Holds({}, {DOMAIN: Throttle(DOMAIN, max_connections=2, rate=rate, since=time.time())})
        self.runtime.store.put_control(HOLDS_KEY, encode_holds(holds))
        self.loop.call(self._run(lambda: self.runtime.delivery.set_holds(holds)))  # type: ignore[union-attr]

    def _seen(self, _sender: str, _rcpts: list[str], data: bytes, _tls: bool) -> None:
        if b"X-Bench-Priority" in data and not self.arrived.is_set():
            self.arrived_at = time.monotonic()
            self.before_it = self.sink.accepted  # counted before this hook: newsletter only
            self.arrived.set()

    @staticmethod
    async def _run(fn: Any) -> Any:
        return fn()

    def queue_newsletter(self, n: int, chunk: int = 1000) -> float:
        """Put n messages in commits of `chunk`; returns the seconds it took."""
        rt = self.runtime
        body = NEWS.encode()
        started = time.monotonic()
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            ids = self.loop.call(self._run(lambda count=count: [rt.ctx.ids.next() for _ in range(count)]))
            now = time.time()
            recs = [MessageRecord(mid, SENDER, [Recipient(f"n{start + i}@{DOMAIN}")], now, len(body))
                    for i, mid in enumerate(ids)]

            def op(w: Any, recs: list[MessageRecord] = recs) -> None:
                for rec in recs:
                    w.put_message(rec, body)

            result = self._commit(op)
            if isinstance(result, BaseException):
                raise SystemExit(f"queueing failed: {result!r}")
        return time.monotonic() - started

    def _commit(self, op: Any) -> object:
        """Submit `op` to the worker's committer (on its loop); wait for the commit."""
        done = threading.Event()
        result: list[object] = [TimeoutError("commit not answered in 60 s")]

        def answered(res: object) -> None:
            result[0] = res
            done.set()

        self.loop.loop.call_soon_threadsafe(self.runtime.committer.submit, op, answered)
        done.wait(60)
        return result[0]

    def send_priority(self) -> float:
        """One SMTP transaction; returns time.monotonic() at its 250."""
        port = self.listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            f = s.makefile("rb")

            def cmd(line: str | None, want: str) -> None:
                if line is not None:
                    s.sendall(line.encode() + b"\r\n")
                reply = f.readline()
                while reply[3:4] == b"-":
                    reply = f.readline()
                if not reply.startswith(want.encode()):
                    raise SystemExit(f"{line!r}: {reply!r}")

            cmd(None, "220")
            cmd("EHLO bench.test", "250")
            cmd(f"MAIL FROM:<{SENDER}>", "250")
            cmd(f"RCPT TO:<reset@{DOMAIN}>", "250")
            cmd("DATA", "354")
            s.sendall(RESET.encode() + b".\r\n")
            cmd(None, "250")
            t = time.monotonic()
            s.sendall(b"QUIT\r\n")
        return t

    def inflight(self) -> int:
        return int(self.loop.call(self._run(lambda: len(self.runtime.delivery.scheduler.inflight))))  # type: ignore[union-attr]

    def close(self) -> None:
        try:
            self.loop.call(self.runtime.stop(), timeout=60)
        finally:
            self.loop.close()
            self.peers.call(self.sink.close())
            self.peers.close()
            self.dns_thread.__exit__(None, None, None)
            self.listener.close()


def deliver(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="volley-priority-") as tmp:
        bench = Bench(Path(tmp), args.rate)
        try:
            fill = bench.queue_newsletter(args.messages)
            deadline = time.monotonic() + 120
            while bench.sink.accepted < args.warm and time.monotonic() < deadline:
                time.sleep(0.05)
            inflight = bench.inflight()
            sent_before = bench.sink.accepted
            t0 = bench.send_priority()
            at_250 = bench.sink.accepted
            bench.arrived.wait(args.patience)
            out: dict[str, Any] = {
                "messages": args.messages, "rate": args.rate, "queue_fill_s": round(fill, 1),
                "inflight_at_send": inflight, "delivered_before_send": sent_before,
                "max_ready": bench.cfg.delivery.max_ready,
            }
            if bench.arrived.is_set():
                out.update(delivered=True, seconds=round(bench.arrived_at - t0, 3),
                           newsletter_between=bench.before_it - at_250)
            else:
                out.update(delivered=False, seconds=None, waited_s=args.patience,
                           newsletter_between=bench.sink.accepted - at_250)
            return out
        finally:
            bench.close()


# --- scan -------------------------------------------------------------------------------------
def _median_us(fn: Any, runs: int = 30) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 1)


def scan(args: argparse.Namespace) -> dict[str, Any]:
    n, inflight_n = args.messages, min(20_000, args.messages // 2)
    with tempfile.TemporaryDirectory(prefix="volley-scan-") as tmp:
        store = QueueStore(str(Path(tmp) / "q"), map_size=2 << 30, durability="memory")
        ids = IdAllocator(store.next_boot())
        t0 = 1_700_000_000.0
        recs = [MessageRecord(ids.next(), SENDER, [Recipient(f"n{i}@{DOMAIN}", next_attempt=t0 + i * 0.0003)],
                              t0, 10) for i in range(n)]
        for i in range(0, n, 20_000):
            store.write_one(lambda w, part=recs[i:i + 20_000]: [w.put_message(r, b"x") for r in part])
        until = int((t0 + 3600) * 1000)
        flight = {(r.id, DOMAIN) for r in recs[:inflight_n]}
        resume = int(recs[inflight_n - 1].recipients[0].next_attempt * 1000) - 1000
        lanes = hasattr(store, "due_scan")  # an engine with priority lanes

        def read(since: int, exclude: set[tuple[bytes, str]]) -> object:
            # what the scheduler calls: due_scan with lanes, due_entries before them
            if lanes:
                return store.due_scan(0, until, [512] * 10, [since] * 10, exclude)
            return store.due_entries(0, until, 512, since, exclude)

        out: dict[str, Any] = {"units": n, "in_flight": inflight_n, "batch": 512, "lanes": lanes}
        out["first_batch_us"] = _median_us(lambda: read(0, set()))
        out["resume_scan_us"] = _median_us(lambda: read(resume, flight))
        out["full_scan_us"] = _median_us(lambda: read(0, flight), runs=10)
        if lanes:
            caps = [2000] * 4 + [0] * 6
            since = [0] * 4 + [resume] * 6
            out["priority_lanes_when_full_us"] = _median_us(
                lambda: store.due_scan(0, until, caps, since, flight))
        store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["deliver", "scan"])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=500.0, help="throttle, messages/s (deliver)")
    p.add_argument("--warm", type=int, default=2_000, help="deliveries before the priority message")
    p.add_argument("--patience", type=float, default=120.0, help="max wait for it, seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = deliver(args) if args.mode == "deliver" else scan(args)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>30}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
