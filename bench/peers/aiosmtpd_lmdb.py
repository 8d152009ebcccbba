"""The plain-Python peer: aiosmtpd on uvloop, one synced LMDB commit per message.

    .venv/bin/python bench/peers/aiosmtpd_lmdb.py -c volley.toml     # as bench/run.py starts it
    .venv/bin/python bench/peers/aiosmtpd_lmdb.py --listen 127.0.0.1:2527 --db /tmp/q

What a Python developer would write first for a durable SMTP receiver: aiosmtpd's SMTP
protocol, and in `handle_DATA` one LMDB write transaction holding the message, committed
with LMDB's default `sync=True` (data and meta page flushed) before the 250. The commit
runs on the event loop thread, as a straightforward handler would do it; no batching
across sessions. It only receives: nothing is relayed, so it has receive rows only.

`-c FILE` reads the same TOML that bench/run.py writes for `volley serve` (the first
`[[listeners]] address` and `queue.path`), so the runner starts it like Volley, and
it prints Volley's JSON `{"event": "ready", "listeners": [...]}` line on stderr.
It stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
import tomllib

import lmdb
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

MAP_SIZE = 8 << 30


class LmdbHandler:
    """aiosmtpd handler: each accepted message is one synced LMDB commit."""

    def __init__(self, path: str) -> None:
        # sync=True (the default) flushes on every commit: durable before the 250.
        self.env = lmdb.open(path, map_size=MAP_SIZE, subdir=True, sync=True, metasync=True)
        self.keys = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        key = next(self.keys).to_bytes(8, "big")
        head = json.dumps({"from": envelope.mail_from, "to": envelope.rcpt_tos}).encode()
        content = envelope.original_content or b""
        with self.env.begin(write=True) as txn:
            txn.put(key, head + b"\n" + content)
        return "250 2.0.0 Ok: queued"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="bench TOML: [[listeners]] address, queue.path")
    p.add_argument("--listen", default="127.0.0.1:2527", help="HOST:PORT (port 0: any)")
    p.add_argument("--db", default="", help="LMDB directory")
    a = p.parse_args(argv)
    if a.config:
        with open(a.config, "rb") as f:
            config = tomllib.load(f)
        a.listen = config["listeners"][0]["address"]
        a.db = config["queue"]["path"]
    if not a.db:
        p.error("--db or -c is required")
    return a


async def serve(listen: str, db: str) -> None:
    host, _, port = listen.rpartition(":")
    handler = LmdbHandler(db)
    loop = asyncio.get_running_loop()
    # hostname given: aiosmtpd would otherwise call socket.getfqdn() (a DNS lookup).
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.peers.test", decode_data=False),
        host.strip("[]"), int(port), backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "ready", "listeners": [f"{host}:{bound}"]}), file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    handler.env.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uvloop.run(serve(args.listen, args.db))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
