"""P1 by the order of system calls: under `queue.durability = "fsync"` every
`250 2.0.0 OK queued as ID` after end of data is written to the client only after
the commit that stored the message AND a flush of the data file after that commit's
meta page returned (strace on the one worker of a real `volley serve`). The same
check on a "memory" queue must find violations, so the check can see a loss."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from tests.integration.faults import SyscallTrace, data_fds, flush_violations
from tests.integration.harness import ServeProcess
from tests.integration.relay_helpers import send_many

MESSAGES = 50
PER_CONNECTION = 10


def body(tag: str) -> bytes:
    # Small content: stored inside a leaf page, so the tag is never split over two pages.
    return (f"From: <a@home.test>\r\nTo: <b@example.test>\r\nSubject: p1\r\n"
            f"X-Test-Id: {tag}\r\n\r\nbody {tag}\r\n").encode()


def traced_run(serve: Any, tmp_path: Path, durability: str) -> tuple[list[str], int]:
    server: ServeProcess = serve({"server": {"workers": 1}, "queue": {"durability": durability}})
    [pid] = server.worker_pids
    queue_path = tomllib.loads(server.config_path.read_text())["queue"]["path"]
    fds = data_fds(pid, queue_path)
    assert fds, f"worker {pid} has no descriptor on {queue_path}/data.mdb"
    trace_file = tmp_path / f"strace-{durability}.txt"
    tracer = SyscallTrace(pid, trace_file)
    acks: dict[str, str] = {}
    try:
        for start in range(0, MESSAGES, PER_CONNECTION):
            tags = [f"p1m{durability[0]}{i:04d}z" for i in range(start, start + PER_CONNECTION)]
            ids = send_many(server.port, [([f"r{i}@example.test"], body(t))
                                          for i, t in enumerate(tags)])
            acks.update(zip(tags, ids))
    finally:
        trace = tracer.stop()
    assert len(acks) == MESSAGES
    return flush_violations(trace, fds, acks), len(trace.calls)


def test_every_250_follows_a_flush_of_its_commit(serve, tmp_path):
    bad, calls = traced_run(serve, tmp_path, "fsync")
    assert calls > 0, "the trace is empty"
    assert bad == [], bad[:10]


def test_memory_durability_is_caught_by_the_same_check(serve, tmp_path):
    """Negative control: without flushes the check must flag every 250."""
    bad, calls = traced_run(serve, tmp_path, "memory")
    assert calls > 0, "the trace is empty"
    assert len(bad) == MESSAGES, bad[:10]
    assert all("no flush" in b for b in bad), bad[:10]
