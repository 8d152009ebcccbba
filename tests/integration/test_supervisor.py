"""The process model, on real process trees (`volley serve`): start and readiness,
worker crashes and restarts (INV-LIVE, INV-NOLOSS), drain on SIGTERM, SIGHUP reload,
crash-loop backoff, config errors, several listeners, queue id uniqueness.

Synchronisation is always on the server's own JSON log events (`wait_for` with a
deadline) or on a polled condition with a deadline, never on a sleep. The queue is
opened in this process only after the server has stopped (finding 9: an LMDB
environment belongs to the process that opened it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from engine import config as config_mod
from engine.queue.ids import id_bytes
from engine.queue.store import QueueStore
from tests.integration.harness import REPO, ServeProcess, wait_until
from tests.integration.smtp_client import (
    ConnectionDropped,
    connect_until_banner,
    send_one,
)

HOST = "127.0.0.1"
EVENT_TIMEOUT = 30.0  # a loaded 2-core machine starts a Python worker in well under this
STOP_TIMEOUT = 30.0


# --- helpers ---------------------------------------------------------------------------


def event(name: str, **fields: Any):
    """Predicate for `wait_for`: event `name` whose fields equal `fields`."""
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


def proc_stat(pid: int) -> tuple[str, int]:
    """(state, ppid) from /proc/<pid>/stat; the command name may contain spaces."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    rest = raw.rsplit(")", 1)[1].split()
    return rest[0], int(rest[1])


def running(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def alive_child_of(pid: int, parent: int) -> bool:
    try:
        state, ppid = proc_stat(pid)
    except FileNotFoundError:
        return False
    return state != "Z" and ppid == parent


def queue_path(server: ServeProcess) -> str:
    return str(tomllib.loads(server.config_path.read_text())["queue"]["path"])


def read_queue(server: ServeProcess) -> dict[str, tuple[Any, bytes]]:
    """Every queued message as id → (record, body); the server must have stopped.

    Every record and body must be readable (INV-CONSISTENT)."""
    assert server.proc.poll() is not None, "open the queue only after the server stopped"
    data = tomllib.loads(server.config_path.read_text())
    store = QueueStore(
        data["queue"]["path"],
        map_size=int(config_mod.parse_size(data["queue"]["max_size"])),
        shards=int(data["server"]["workers"]),
    )
    try:
        out = {}
        for raw in store.iter_ids():
            record = store.get(raw)
            body = store.get_body(raw)
            assert record is not None and body is not None, raw.hex()
            out[raw.hex()] = (record, body)
        assert store.count() == len(out)
        return out
    finally:
        store.close()


def kill_worker(server: ServeProcess, slot: int, pid: int) -> int:
    """SIGKILL the worker `pid` in `slot`; returns the restarted worker's pid."""
    os.kill(pid, signal.SIGKILL)
    exited = server.wait_for(event("worker_exited", slot=slot), EVENT_TIMEOUT)
    assert exited["status"] == -signal.SIGKILL, exited
    restarted = server.wait_for(event("worker_restarted", slot=slot), EVENT_TIMEOUT)
    new_pid = int(restarted["pid"])
    assert new_pid != pid
    assert alive_child_of(new_pid, server.proc.pid)
    return new_pid


def stop_ok(server: ServeProcess) -> None:
    assert server.stop(STOP_TIMEOUT) == 0, server.log[-20:]
    server.wait_for(event("stopped"), 5.0)


def volley(*args: str, cwd: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


def rcpt_limit_probe(port: int, tries: int) -> list[int]:
    """Codes of `tries` RCPTs in one transaction on a new connection."""
    with connect_until_banner(HOST, port) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.com>")[0] == 250
        codes = [client.cmd(f"RCPT TO:<r{i}@example.org>")[0] for i in range(tries)]
        client.cmd("QUIT")
    return codes


def rewrite_config(server: ServeProcess, **limits: Any) -> None:
    data = tomllib.loads(server.config_path.read_text())
    data.setdefault("limits", {}).update(limits)
    tmp = server.config_path.with_suffix(".new")
    tmp.write_text(tomli_w.dumps(data))
    tmp.replace(server.config_path)  # atomic: SIGHUP never reads half a file


# --- 1. start and ready ------------------------------------------------------------------


def test_ready_line_names_port_and_worker_children_and_mail_spreads(serve):
    server = serve()
    [ready] = [e for e in server.log if e.get("event") == "ready"]  # the harness waited for it
    assert ready["workers"] == 2
    assert len(server.worker_pids) == 2 and len(set(server.worker_pids)) == 2
    assert ready["listeners"] == [f"{HOST}:{server.port}"] and server.port > 0
    for pid in server.worker_pids:
        assert alive_child_of(pid, server.proc.pid), pid
    for slot in (0, 1):
        server.wait_for(event("worker_ready", slot=slot), EVENT_TIMEOUT)

    sent = 40  # one connection each: SO_REUSEPORT hashes the 4-tuple over both sockets
    ids = [send_one(HOST, server.port, f"spread-{i}") for i in range(sent)]
    assert len(set(ids)) == sent

    stop_ok(server)
    stopped = {e["slot"]: e["received"] for e in server.log if e.get("event") == "worker_stopped"}
    assert sorted(stopped) == [0, 1], server.log[-20:]
    assert sum(stopped.values()) == sent
    # 2**-39 chance of a false failure with 40 connections.
    assert all(n > 0 for n in stopped.values()), stopped
    assert set(read_queue(server)) == set(ids)


# --- 2. kill -9 between sessions: INV-LIVE and INV-NOLOSS ------------------------------------


def test_sigkilled_worker_is_restarted_and_loses_no_acknowledged_mail(serve):
    server = serve()
    acked = {f"before-{i}": send_one(HOST, server.port, f"before-{i}") for i in range(20)}

    kill_worker(server, 0, server.worker_pids[0])
    # INV-LIVE: the listener answers (either worker) within the deadline.
    with connect_until_banner(HOST, server.port, deadline=20.0) as client:
        assert client.cmd("NOOP")[0] == 250
    acked.update({f"after-{i}": send_one(HOST, server.port, f"after-{i}") for i in range(5)})

    stop_ok(server)
    queued = read_queue(server)
    assert len(queued) == 25
    for test_id, msg_id in acked.items():
        record, body = queued[msg_id]
        assert record.sender == "a@example.com"
        assert [r.address for r in record.recipients] == ["b@example.org"]
        assert f"X-Test-Id: {test_id}\r\n".encode() in body


# --- 3. kill -9 in the middle of DATA ----------------------------------------------------------


def test_worker_killed_mid_data_drops_the_session_and_queues_nothing_half_written(serve):
    server = serve({"server": {"workers": 1}})
    pid = server.worker_pids[0]
    client = connect_until_banner(HOST, server.port)
    with client:
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: half\r\nX-Test-Id: partial\r\n\r\nthe first half of a bo")
        os.kill(pid, signal.SIGKILL)
        # Reaped by the supervisor, so certainly dead before the end of data is sent.
        exited = server.wait_for(event("worker_exited", slot=0), EVENT_TIMEOUT)
        assert exited["status"] == -signal.SIGKILL
        # The client sees the connection end, never a reply (no 250).
        with pytest.raises(ConnectionDropped):
            client.send(b"dy\r\n.\r\n")
            client.reply()

    restarted = server.wait_for(event("worker_restarted", slot=0), EVENT_TIMEOUT)
    assert alive_child_of(int(restarted["pid"]), server.proc.pid)

    msg_id = send_one(HOST, server.port, "after-kill")
    stop_ok(server)
    queued = read_queue(server)
    assert list(queued) == [msg_id]  # count == number of 250s seen
    assert b"X-Test-Id: after-kill\r\n" in queued[msg_id][1]


# --- 4. SIGTERM --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_drains_sessions_exits_zero_and_closes_the_port(serve, sig):
    server = serve({"server": {"workers": 1}})
    busy = connect_until_banner(HOST, server.port)
    idle = connect_until_banner(HOST, server.port)
    with busy, idle:
        assert busy.cmd("EHLO client.test")[0] == 250
        assert busy.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert busy.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert busy.cmd("DATA")[0] == 354
        busy.send(b"Subject: in flight\r\nX-Test-Id: in-flight\r\n\r\nfirst half, ")
        assert idle.cmd("EHLO client.test")[0] == 250

        server.signal(sig)
        # The (only) worker is draining once it ends the idle session with 421.
        code, text = idle.reply()
        assert code == 421, text
        assert idle.at_eof()
        # A transaction in flight may still finish within the shutdown bound: its 250
        # comes, then 421, then the close.
        busy.send(b"second half\r\n.\r\n")
        code, text = busy.reply()
        assert code == 250, text
        in_flight = text.rsplit(" ", 1)[1]
        assert busy.reply()[0] == 421
        assert busy.at_eof()

    assert server.proc.wait(STOP_TIMEOUT) == 0
    server.wait_for(event("stopping"), 5.0)
    server.wait_for(event("stopped"), 5.0)
    for pid in server.worker_pids:
        assert not alive_child_of(pid, server.proc.pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, server.port), timeout=5.0).close()
    assert list(read_queue(server)) == [in_flight]


def test_workers_exit_when_the_supervisor_is_killed(serve):
    """No orphans: a worker whose supervisor is gone (control channel EOF) drains and
    exits, so nothing keeps the port or the queue without a supervisor."""
    server = serve()
    pids = list(server.worker_pids)
    try:
        os.kill(server.proc.pid, signal.SIGKILL)
        assert server.proc.wait(STOP_TIMEOUT) == -signal.SIGKILL
        for slot in (0, 1):
            server.wait_for(event("supervisor_lost", slot=slot), EVENT_TIMEOUT)
            server.wait_for(event("worker_stopped", slot=slot), EVENT_TIMEOUT)
        # Orphans are reparented to init (which may not reap them: a zombie counts as
        # exited); the stopped events above mean this is short.
        try:
            wait_until(lambda: not [pid for pid in pids if running(pid)], 20.0, "workers gone")
        except TimeoutError:
            raise AssertionError([proc_stat(pid) for pid in pids if running(pid)]) from None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, server.port), timeout=5.0).close()
    finally:
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)  # only if the test failed
        except ProcessLookupError:
            pass


# --- 5. SIGHUP reload -----------------------------------------------------------------------


def test_sighup_reload_reaches_workers_and_keeps_sessions(serve):
    server = serve({"limits": {"max_recipients": 2}})
    assert rcpt_limit_probe(server.port, 3) == [250, 250, 452]

    idle = connect_until_banner(HOST, server.port)
    with idle:
        assert idle.cmd("EHLO client.test")[0] == 250
        rewrite_config(server, max_recipients=5)
        server.signal(signal.SIGHUP)
        server.wait_for(event("reloaded"), EVENT_TIMEOUT)
        for slot in (0, 1):
            server.wait_for(event("worker_reloaded", slot=slot), EVENT_TIMEOUT)
        # Both workers have applied it, so any new connection sees the new limit.
        deadline = time.monotonic() + 20.0
        while (codes := rcpt_limit_probe(server.port, 6)) != [250] * 5 + [452]:
            assert time.monotonic() < deadline, codes
        # The idle session survived the reload.
        assert idle.cmd("NOOP")[0] == 250
        assert idle.cmd("QUIT")[0] == 221
    assert not any(e.get("event") == "reload_partial" for e in server.log)

    # A worker started after the reload runs the reloaded config, not the first one.
    for slot, pid in enumerate(server.worker_pids):
        kill_worker(server, slot, pid)
    for _ in range(4):
        assert rcpt_limit_probe(server.port, 6) == [250] * 5 + [452]
    stop_ok(server)


# --- 6. SIGHUP with a broken file ------------------------------------------------------------


def test_sighup_with_broken_config_is_refused_and_old_config_stays(serve):
    server = serve({"limits": {"max_recipients": 2}})
    good = server.config_path.read_text()
    broken = good.replace("max_recipients = 2", 'max_recipients = "many"')
    assert broken != good
    server.config_path.write_text(broken)
    server.signal(signal.SIGHUP)
    refused = server.wait_for(event("reload_refused"), EVENT_TIMEOUT)
    assert "limits.max_recipients" in refused["error"], refused
    assert not any(e.get("event") in ("reloaded", "worker_reloaded") for e in server.log)
    # Still serving, still with the old limit, on new connections to either worker.
    for _ in range(4):
        assert rcpt_limit_probe(server.port, 3) == [250, 250, 452]
    send_one(HOST, server.port, "after-refused")

    # And a later good reload still works.
    server.config_path.write_text(good)
    rewrite_config(server, max_recipients=3)
    server.signal(signal.SIGHUP)
    server.wait_for(event("reloaded"), EVENT_TIMEOUT)
    stop_ok(server)


# --- 7. crash loop backoff -------------------------------------------------------------------


def test_worker_that_cannot_start_is_restarted_with_growing_backoff(serve):
    """A realistic start failure: the queue path stops being a directory (an operator
    moved it), so a restarted worker cannot open the store and exits at once. The
    running worker keeps its open environment and keeps serving."""
    server = serve()
    qpath = Path(queue_path(server))
    moved = qpath.with_name("queue.moved")
    qpath.rename(moved)
    qpath.write_text("not a directory\n")

    os.kill(server.worker_pids[0], signal.SIGKILL)
    killed = server.wait_for(event("worker_exited", slot=0), EVENT_TIMEOUT)
    assert killed["status"] == -signal.SIGKILL
    delays = []
    for _ in range(3):
        failed = server.wait_for(event("worker_exited", slot=0), EVENT_TIMEOUT)
        assert failed["status"] not in (0, -signal.SIGKILL), failed
        delays.append(failed["restart_in"])
    # Each quick failure doubles the wait (BACKOFF_FIRST, then x2 up to BACKOFF_MAX).
    assert 0 < delays[0] and all(b == 2 * a for a, b in zip(delays, delays[1:])), delays
    assert any(e.get("event") == "stderr" and "FileExistsError" in e["text"] for e in server.log)

    # Meanwhile the other worker serves (a retry reaches its socket).
    with connect_until_banner(HOST, server.port, deadline=20.0, attempt_timeout=1.0) as client:
        assert client.cmd("NOOP")[0] == 250

    qpath.unlink()
    moved.rename(qpath)
    restarted = server.wait_for(event("worker_restarted", slot=0), EVENT_TIMEOUT + delays[-1] * 2)
    assert alive_child_of(int(restarted["pid"]), server.proc.pid)
    ids = {send_one(HOST, server.port, f"healed-{i}") for i in range(6)}
    stop_ok(server)
    assert ids <= set(read_queue(server))


# --- 8. configuration errors --------------------------------------------------------------------


def test_config_check_prints_the_harness_config(serve, tmp_path):
    server = serve()
    r = volley("config", "check", "-c", str(server.config_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    expected = config_mod.to_builtins(config_mod.load(server.config_path))
    assert tomllib.loads(r.stdout) == expected
    stop_ok(server)


def test_serve_with_bad_config_exits_2_with_one_line_and_binds_nothing(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps({
        "listeners": [{"address": f"{HOST}:{port}"}],
        "queue": {"path": str(tmp_path / "queue")},
        "limits": {"max_recipientz": 5},
    }))
    r = volley("serve", "-c", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "volley: limits.max_recipientz: unknown key\n"
    assert not (tmp_path / "queue").exists()  # nothing started, nothing created
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5.0).close()


def test_serve_on_a_taken_port_exits_2_and_starts_no_worker(tmp_path):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "taken.toml"
        cfg.write_text(tomli_w.dumps({
            "listeners": [{"address": f"{HOST}:0"}, {"address": f"{HOST}:{port}"}],
            "queue": {"path": str(tmp_path / "queue")},
            "server": {"workers": 2},
        }))
        r = volley("serve", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == (
        f"volley: listeners: cannot bind {HOST}:{port}: Address already in use\n"
    ), r.stderr


# --- 9. two listeners -------------------------------------------------------------------------


def test_two_listeners_both_accept_mail(serve):
    server = serve({"listeners": [{"address": "127.0.0.1:0"}, {"address": "127.0.0.2:0"}]})
    assert len(server.listeners) == 2
    ids = {}
    for address in server.listeners:
        host, port = config_mod.split_host_port(address)
        assert port > 0
        for i in range(3):
            ids[f"{host}-{i}"] = send_one(host, port, f"{host}-{i}")
    stop_ok(server)
    queued = read_queue(server)
    assert set(queued) == set(ids.values())
    for test_id, msg_id in ids.items():
        assert f"X-Test-Id: {test_id}\r\n".encode() in queued[msg_id][1]


# --- 10. queue ids ------------------------------------------------------------------------------


def test_queue_ids_are_unique_across_workers_and_restarts(serve):
    server = serve()
    before = [send_one(HOST, server.port, f"pre-{i}") for i in range(15)]
    # Restart both workers, so every later id comes from a fresh boot number.
    for slot, pid in enumerate(server.worker_pids):
        kill_worker(server, slot, pid)
    after = [send_one(HOST, server.port, f"post-{i}") for i in range(15)]

    ids = before + after
    assert len(set(ids)) == len(ids) == 30
    boots_before = {i[:8] for i in before}
    boots_after = {i[:8] for i in after}
    assert not boots_before & boots_after, (boots_before, boots_after)
    stop_ok(server)
    assert set(read_queue(server)) == set(ids)
    assert all(len(id_bytes(i)) == 8 for i in ids)
