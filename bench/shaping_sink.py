"""The sinks of the shaping row (bench/shaping.py): one process, one counting sink per
provider, each listening on the provider's own loopback addresses (one port for all,
since Volley's `delivery.port` is one number).

    python bench/shaping_sink.py --provider tiny=127.0.0.21 --provider large=127.0.0.24,127.0.0.34 \\
        --watch reset@ --lifetime 900

Per provider it records when each message arrived (the end of DATA, time.monotonic(),
which every process of the machine shares) and every change of its concurrent
sessions. A session counts from the banner to QUIT, or to the lost connection if no
QUIT came: the span in which the sending worker holds its connection token (it
gives the token back only after the 221 or the close), so a session that a new one
replaces is never counted twice on the sink side.

Output, JSON lines on stdout: {"event": "ready", "port": P}; every --interval a
counter line {"messages": total, "by": {provider: n}, "sessions": {provider: n}, "t": now};
{"event": "watched", "provider": p, "t": ..., "before": n} when a message to a
recipient starting with --watch arrives (n: that provider's messages before it); and,
when a line "dump" is read on stdin, {"event": "dump", "providers": {p: {"arrivals":
[t...], "sessions": [[t, live]...], "opened": n, "peak": n, "socket_peak": n}}}.
It exits when stdin closes, on SIGTERM, or after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.lab.sink.protocol import SinkProtocol  # noqa: E402
from engine.lab.sink.state import Sink  # noqa: E402


class Provider:
    """One provider's counters (loop thread only)."""

    def __init__(self, name: str, watch: str) -> None:
        self.name = name
        self.watch = watch
        self.sink = Sink(servers=[], port=0, keep_segments=False, record=False)
        self.arrivals: list[float] = []
        self.sessions: list[tuple[float, int]] = []  # (t, live after the change)
        self.live = 0
        self.peak = 0
        self.opened = 0
        self.watched: list[tuple[float, int]] = []  # (t, arrivals before it)

    def opening(self) -> None:
        self.live += 1
        self.opened += 1
        self.peak = max(self.peak, self.live)
        self.sessions.append((time.monotonic(), self.live))

    def ended(self) -> None:
        self.live -= 1
        self.sessions.append((time.monotonic(), self.live))

    def arrived(self, watched: bool) -> None:
        now = time.monotonic()
        if watched:
            self.watched.append((now, len(self.arrivals)))
        self.arrivals.append(now)

    def dump(self) -> dict[str, Any]:
        return {"arrivals": [round(t, 6) for t in self.arrivals],
                "sessions": [[round(t, 6), n] for t, n in self.sessions],
                "opened": self.opened, "peak": self.peak, "socket_peak": self.sink.max_live}


class CountingProtocol(SinkProtocol):
    """The lab sink's protocol, its script hook used to see the banner, RCPT, QUIT and
    each end of data of this one connection."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.counted = False
        self.flagged = False  # this transaction has a watched recipient
        super().__init__(provider.sink, pipelining=True, chunking=False, starttls_context=None,
                         script=self._seen)

    def _seen(self, verb: str, arg: str) -> None:
        if verb == ".":
            self.provider.arrived(self.flagged)
            self.flagged = False
        elif verb == "RCPT":
            if self.provider.watch and "<" + self.provider.watch in arg:
                self.flagged = True
        elif verb == "BANNER":
            self.counted = True
            self.provider.opening()
        elif verb == "QUIT":
            self._end()
        return None

    def _end(self) -> None:
        if self.counted:
            self.counted = False
            self.provider.ended()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        super().connection_lost(exc)


async def listen(providers: dict[str, Provider], addresses: dict[str, list[str]], tries: int = 20) -> int:
    """Every provider's listeners on one port, free on all the addresses; the port."""
    loop = asyncio.get_running_loop()
    for _ in range(tries):
        port, servers = 0, []
        try:
            for name, hosts in addresses.items():
                p = providers[name]
                for host in hosts:
                    server = await loop.create_server(lambda p=p: CountingProtocol(p), host, port,
                                                      reuse_address=True)
                    port = port or server.sockets[0].getsockname()[1]
                    servers.append(server)
                    p.sink.servers.append(server)
            return port
        except OSError as err:
            for server in servers:
                server.close()
            for p in providers.values():
                p.sink.servers.clear()
            if err.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no port free on every address after {tries} tries")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.lifetime, stop.set)
    addresses = {name: hosts.split(",") for name, _, hosts in (p.partition("=") for p in args.provider)}
    providers = {name: Provider(name, args.watch) for name in addresses}
    port = await listen(providers, addresses)
    emit({"event": "ready", "port": port, "pid": os.getpid(), "listeners": addresses})
    reported: dict[str, int] = {name: 0 for name in providers}

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"dump":
                emit({"event": "dump", "providers": {n: p.dump() for n, p in providers.items()}})
        stop.set()  # our parent closed the pipe (or died)

    reading = asyncio.ensure_future(commands())
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.interval)
            except TimeoutError:
                pass
            for name, p in providers.items():
                for t, before in p.watched[reported[name]:]:
                    emit({"event": "watched", "provider": name, "t": t, "before": before})
                reported[name] = len(p.watched)
            emit({"messages": sum(len(p.arrivals) for p in providers.values()),
                  "by": {n: len(p.arrivals) for n, p in providers.items()},
                  "sessions": {n: p.live for n, p in providers.items()}, "t": time.monotonic()})
    finally:
        reading.cancel()
        for p in providers.values():
            await p.sink.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", action="append", required=True, metavar="NAME=IP[,IP...]")
    ap.add_argument("--watch", default="", help="recipient prefix whose arrival is reported at once")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between counter lines")
    ap.add_argument("--lifetime", type=float, default=1800.0, help="exit after this many seconds")
    args = ap.parse_args(argv)
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args))
    except OSError as err:
        print(f"shaping_sink: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
