"""Faults with real processes and real signals (P2/P3 across crashes).

- kill -9 of the supervisor: its workers see EOF on their control socket
  (`supervisor_lost`) and stop by themselves; a new server on the same queue delivers
  everything that was waiting, and the LMDB reader table holds no slot of a dead
  process (every worker runs `reader_check` at start and every minute).
- kill -9 of the worker at each phase of one message's life (mid-DATA, right after
  the 250, delivery in flight before the remote's 250, just after the remote's 250):
  every message acknowledged with 250 is delivered, and duplicates stay within the one
  documented window (remote said 250, our outcome commit not done), at most one per kill
  with one delivery connection per domain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections import Counter as Tally
from typing import Any

from engine.lab.sink.protocol import NO_REPLY, start_sink
from tests.integration.faults import lmdb_readers, open_mid_data, pid_alive
from tests.integration.harness import ServeProcess, merge, wait_until
from tests.integration.relay_helpers import body, send, send_many, tag_of
from tests.integration.smtp_client import ConnectionDropped
from tests.integration.test_relay_process import kill_worker, queued_after_stop, relay_config

DOMAIN = "d0.test"


def zone_for(dns_zone: Any) -> Any:
    return dns_zone({"mx.sink.test": {"A": ["127.0.0.2"]}, DOMAIN: {"MX": [(10, "mx.sink.test")]}})


def queue_path(server: ServeProcess) -> str:
    return str(tomllib.loads(server.config_path.read_text())["queue"]["path"])


def env_process(path: str, *, read_txn: bool) -> subprocess.Popen[str]:
    """A process with the queue's environment open (and a read transaction begun when
    `read_txn`), waiting on stdin."""
    code = ("import lmdb, sys\n"
            "env = lmdb.open(sys.argv[1], readonly=True, max_dbs=8, subdir=True)\n"
            f"txn = env.begin() if {read_txn} else None\n"
            "print('open', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
    return proc


def end(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    proc.wait(10)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def test_kill_9_supervisor_workers_exit_and_restart_recovers(serve, peers, dns_zone):
    accepting = threading.Event()

    def script(verb: str, arg: str) -> str | None:
        if verb == "." and not accepting.is_set():
            return "451 4.3.0 not now"
        return None

    sink = peers.call(start_sink("127.0.0.2", 0, script=script))
    peers.sinks.append(sink)
    dns = zone_for(dns_zone)
    config = relay_config(dns.port, sink.port)
    first = serve(config)
    tags = [f"sup-{i}" for i in range(10)]
    send_many(first.port, [([f"r{i}@{DOMAIN}"], body(t)) for i, t in enumerate(tags)])
    wait_until(lambda: sink.deferred >= len(tags), 30, "every message deferred once")

    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    try:
        wait_until(lambda: not any(pid_alive(p) for p in first.worker_pids), 30,
                   "the orphaned workers exit by themselves")
    except TimeoutError:
        os.killpg(first.proc.pid, signal.SIGKILL)  # their group: leave nothing running
        raise
    for slot in range(len(first.worker_pids)):  # they learnt it from the control socket's EOF
        first.wait_for(lambda e, s=slot: e.get("event") == "supervisor_lost" and e.get("slot") == s,
                       10)
    path = queue_path(first)
    # LMDB resets the reader table when the first process opens an environment nobody
    # has open; a witness keeps it open so a dead reader's slot survives, as it would
    # beside a live process (a second server, `volley queue` tools).
    witness = env_process(path, read_txn=False)
    try:
        reader = env_process(path, read_txn=True)
        end(reader, signal.SIGKILL)
        assert reader.pid in lmdb_readers(path), "the killed reader left no slot"

        accepting.set()
        second = serve(merge(config, {"queue": {"path": path}}))
        wait_until(lambda: {tag_of(m.data) for m in sink.messages} >= set(tags), 30,
                   "every waiting message delivered after the restart")
        assert not [p for p in lmdb_readers(path) if not pid_alive(p)], "stale reader slots remain"
    finally:
        end(witness)
    assert queued_after_stop(second) == 0


def test_kill_9_worker_at_each_phase_loses_no_acknowledged_mail(serve, peers, dns_zone):
    lock = threading.Lock()
    hold_data = threading.Event()  # the sink answers nothing to DATA: delivery in flight
    held = [0]
    kill_after_answer = threading.Event()
    current = {"pid": 0}
    hook_kills = [0]

    def script(verb: str, arg: str) -> str | None:
        if verb == "DATA" and hold_data.is_set():
            with lock:
                held[0] += 1
            return NO_REPLY
        return None

    def on_message(mail_from: str, rcpts: list[str], data: bytes, tls: bool) -> None:
        if kill_after_answer.is_set():
            kill_after_answer.clear()
            hook_kills[0] += 1
            pid = current["pid"]
            # call_soon: after this data_received has written the 250 to the worker.
            peers.loop.call_soon(os.kill, pid, signal.SIGKILL)

    sink = peers.call(start_sink("127.0.0.2", 0, script=script, on_message=on_message))
    peers.sinks.append(sink)
    dns = zone_for(dns_zone)
    server = serve(merge(relay_config(dns.port, sink.port, max_connections_per_domain=1),
                         {"server": {"workers": 1}}))
    current["pid"] = server.worker_pids[0]
    acked: list[str] = []
    kills = 0

    # 1. mid-DATA: the client never gets a 250, so the message is not ours to keep.
    client = open_mid_data(server.port, f"a@{DOMAIN}", f"r@{DOMAIN}")
    current["pid"] = kill_worker(server, 0, current["pid"])
    kills += 1
    assert client.at_eof()
    client.close()

    # 2. right after a 250.
    tag = "after-250"
    send(server.port, [f"r0@{DOMAIN}"], body(tag))
    acked.append(tag)
    current["pid"] = kill_worker(server, 0, current["pid"])
    kills += 1

    # 3. delivery in flight, the remote's reply to DATA not yet sent.
    hold_data.set()
    batch = [f"inflight-{i}" for i in range(5)]
    send_many(server.port, [([f"r{i}@{DOMAIN}"], body(t)) for i, t in enumerate(batch)])
    acked += batch
    wait_until(lambda: held[0] > 0, 30, "a delivery held at DATA")
    current["pid"] = kill_worker(server, 0, current["pid"])
    kills += 1
    hold_data.clear()

    async def drop_held() -> None:
        for proto in list(sink.live):
            if proto.transport is not None:
                proto.transport.abort()

    peers.call(drop_held())
    wait_until(lambda: {tag_of(m.data) for m in sink.messages} >= set(acked), 30,
               "the in-flight messages delivered by the replacement")

    # 4. the remote said 250; the worker dies before (or while) committing that outcome.
    kill_after_answer.set()
    for i in range(5):
        # One connection each: the kill may land while a later one is being received;
        # only what got its 250 is counted.
        try:
            send(server.port, [f"r{i}@{DOMAIN}"], body(f"window-{i}"))
        except (ConnectionDropped, OSError):
            continue
        acked.append(f"window-{i}")
    server.wait_for(lambda e: e.get("event") == "worker_exited" and e.get("slot") == 0, 30)
    restarted = server.wait_for(lambda e: e.get("event") == "worker_restarted", 30)
    current["pid"] = int(restarted["pid"])
    kills += 1
    assert hook_kills[0] == 1

    wait_until(lambda: {tag_of(m.data) for m in sink.messages} >= set(acked), 30,
               "every acknowledged message delivered")
    copies = Tally(tag_of(m.data) for m in sink.messages)
    assert "mid-data" not in copies
    extra = sum(n - 1 for n in copies.values())
    assert extra <= kills, copies  # one connection per domain: one window per kill at most
    assert queued_after_stop(server) == 0
