"""Profile the inbound path in one process.

    python tools/profile_inbound.py [--null-commit] [--durability memory|fsync|batch] [--cprofile]

Runs one worker's inbound stack (protocol + machine + committer) on uvloop in this
process, drives it with `python -m engine.lab.blast` in a child process, and prints the
server CPU per message. --null-commit answers 250 without touching LMDB, which
separates protocol cost from storage cost.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import sys
import tempfile
import time

import uvloop

from engine import config as config_mod
from engine.inbound.context import WorkerContext
from engine.inbound.protocol import SmtpServerProtocol
from engine.queue.commit import Committer
from engine.queue.committer import Callback, CommitStats, Op, QueueCommitter
from engine.queue.ids import IdAllocator
from engine.queue.store import QueueStore


class NullCommitter:
    """A QueueCommitter that stores nothing: every op "commits" on the next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stats = CommitStats()
        self.panicked = False

    def start(self) -> None:
        pass

    def submit(self, op: Op, callback: Callback) -> None:
        self.loop.call_soon(callback, None)

    async def stop(self) -> None:
        pass


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    tmp = tempfile.mkdtemp()
    cfg = config_mod.from_dict({"queue": {"path": tmp + "/q", "durability": args.durability}})
    store = QueueStore(cfg.queue.path, map_size=8 << 30, durability=args.durability)
    committer: QueueCommitter = (NullCommitter(loop) if args.null_commit
                                 else Committer(store, loop, durability=args.durability))
    if not args.null_commit:
        committer.start()
    ctx = WorkerContext(cfg, loop, committer, IdAllocator(store.next_boot()), workers=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = await loop.create_server(lambda: SmtpServerProtocol(ctx, cfg.listeners[0], False), sock=sock)
    port = sock.getsockname()[1]
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.process_time()
    w0 = time.perf_counter()
    if prof:
        prof.enable()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.lab.blast", "--to", f"127.0.0.1:{port}", "-n", str(args.messages),
        "-c", "50", "--size", str(args.size))
    await proc.wait()
    if prof:
        prof.disable()
    cpu = time.process_time() - t0
    wall = time.perf_counter() - w0
    print(f"server CPU {cpu:.2f}s = {cpu / args.messages * 1e6:.0f} us/msg over {wall:.2f}s wall")
    server.close()
    stats = getattr(committer, "stats", None)
    if stats is not None:
        mean = stats.ops / max(1, stats.batches)
        print(f"commit batches {stats.batches}, ops {stats.ops}, mean batch {mean:.1f}, "
              f"largest {stats.largest_batch}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--null-commit", action="store_true")
    p.add_argument("--durability", default="memory")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("-n", "--messages", type=int, default=20000)
    p.add_argument("--size", type=int, default=1024, help="message bytes")
    p.add_argument("--switch", type=float, default=0.0, help="sys.setswitchinterval")
    a = p.parse_args()
    if a.switch:
        sys.setswitchinterval(a.switch)
    uvloop.run(main(a))
