"""The control socket of a real `volley serve` (supervisor + 2 workers): access by file
mode, refusal of bad requests, reading the queue, bulk changes, metrics, drain.

Delivery is off here (mail stays queued, so the queue can be inspected); the tests
that steer delivery are in test_control_relay.py."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from engine.control.protocol import MAX_LINE
from tests.integration.control_helpers import ask, ctl, ctl_json, read_line
from tests.integration.harness import REPO, base_config, wait_until
from tests.integration.relay_helpers import body, send, send_many


def test_status_names_workers_listeners_and_queue(serve):
    server = serve()
    send(server.port, ["a@one.test"], body("s1"))
    reply = ask(server.config_path.parent / "volley.sock", {"cmd": "status"})
    assert reply["ok"] is True
    assert sorted(w["pid"] for w in reply["workers"]) == sorted(server.worker_pids)
    assert reply["listeners"] == server.listeners
    assert all(w["out_limit"] is None for w in reply["workers"])  # delivery is off here
    assert reply["queue"]["messages"] == 1
    assert set(reply["rates"]) == {"1m", "5m", "15m"}
    human = ctl(server, "status").stdout
    assert str(server.worker_pids[0]) in human


def test_bad_requests_get_error_replies_and_the_connection_lives(serve):
    server = serve()
    path = str(server.config_path.parent / "volley.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        for line, words in [
            (b"this is not json\n", "not JSON"),
            (b'{"cmd": "explode"}\n', "unknown command"),
            (b'[1, 2]\n', "JSON object"),
            (b'{"cmd": "list", "limit": "many"}\n', "limit"),
            (b'{"cmd": "list", "limit": 0}\n', "limit"),
            (b'{"cmd": "show", "id": "zz"}\n', "not a queue id"),
            (b'{"cmd": "show", "id": "00000000deadbeef"}\n', "no queued message"),
            (b'{"cmd": "suspend"}\n', "domain"),
            (b'{"cmd": "delete"}\n', "give an id, a filter, or all"),
            (b'{"cmd": "throttle", "domain": "x.test"}\n', "max_connections"),
        ]:
            s.sendall(line)
            reply = json.loads(read_line(s))
            assert reply["ok"] is False and words in reply["error"], (line, reply)
        s.sendall(b'{"cmd": "status"}\n')  # the same connection still answers
        assert json.loads(read_line(s))["ok"] is True
    # A line too long to frame is answered, then the connection ends; the server lives.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(b'{"cmd": "status", "x": "' + b"a" * (MAX_LINE + 10) + b'"}\n')
        assert b"longer than" in read_line(s)
    assert ask(path, {"cmd": "status"})["ok"] is True


def _connect_as(uid: int, gid: int, path: str) -> str:
    """Connect as another user (a forked child that drops to uid/gid); what it got."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only system calls, then _exit
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(30)
                s.connect(path)
                try:
                    s.sendall(b'{"cmd": "status"}\n')
                except BrokenPipeError:
                    # A refused peer is answered at accept and the socket closed, maybe
                    # before the request is written; the reply is still there to read.
                    pass
                got = b""
                while len(got) < 100 and (chunk := s.recv(100 - len(got))):
                    got += chunk  # a reply may arrive in more than one read under load
                os.write(write, got or b"EOF")
            except PermissionError:
                os.write(write, b"EACCES")
            except OSError as err:  # say what went wrong instead of an empty answer
                os.write(write, f"ERR {err!r}".encode()[:200])
        finally:
            os._exit(0)
    os.close(write)
    got = b""
    while chunk := os.read(read, 100):
        got += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return got.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
@pytest.mark.parametrize("group", ["", "nogroup"])
def test_socket_mode_decides_who_may_connect(serve, group):
    # A directory anyone may traverse, so only the socket's own mode decides.
    where = Path(tempfile.mkdtemp(prefix="vctl", dir="/tmp"))
    where.chmod(0o711)
    sock = where / "volley.sock"
    server = serve({"control": {"socket": str(sock), "group": group}})
    mode = stat.S_IMODE(sock.stat().st_mode)
    nobody = 65534
    result = _connect_as(nobody, nobody, str(sock))
    if group:
        assert mode == 0o660 and sock.stat().st_gid == nobody
        assert '"ok":true' in result, result
    else:
        assert mode == 0o600
        assert result == "EACCES", result
    assert ask(sock, {"cmd": "status"})["ok"] is True  # the owner always may
    server.stop()
    assert not sock.exists()
    where.rmdir()


def test_start_refused_when_the_socket_path_is_taken(tmp_path):
    taken = tmp_path / "volley.sock"
    taken.write_text("not a socket")
    config = tmp_path / "volley.toml"
    config.write_text(tomli_w.dumps(base_config(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "engine", "serve", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "is not a socket" in proc.stderr, proc.stderr
    assert taken.read_text() == "not a socket"  # never removed


def test_a_stale_socket_is_replaced(serve, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed supervisor leaves
    serve({"control": {"socket": str(path)}})
    assert ask(path, {"cmd": "status"})["ok"] is True


def test_list_show_queue_and_bulk_changes(serve):
    server = serve()
    ids = send_many(server.port, [([f"r{i}@{'one' if i % 3 else 'two'}.test"], body(f"m{i}"))
                                  for i in range(9)])
    listed = ctl_json(server, "list", "--limit", "5")
    assert len(listed["messages"]) == 5 and listed["next"]
    rest = ctl_json(server, "list", "--after", listed["next"])
    assert sorted(m["id"] for m in listed["messages"] + rest["messages"]) == sorted(ids)
    two = ctl_json(server, "list", "--domain", "two.test")
    assert len(two["messages"]) == 3
    shown = ctl_json(server, "show", ids[0])["message"]
    assert ["Subject", "relay test"] in shown["headers"]
    assert shown["recipients"][0]["address"] == "r0@two.test"
    summary = ctl_json(server, "queue")
    assert {r["key"]: r["total"] for r in summary["rows"]} == {"one.test": 6, "two.test": 3}
    assert "one.test" in ctl(server, "queue").stdout

    dry = ctl_json(server, "delete", "--domain", "two.test", "--dry-run")
    assert dry["matched"] == 3 and dry["done"] == 0
    assert ask(server.config_path.parent / "volley.sock", {"cmd": "status"})["queue"]["messages"] == 9
    gone = ctl_json(server, "delete", "--domain", "two.test")
    assert gone["done"] == 3
    assert len(ctl_json(server, "list")["messages"]) == 6
    bounced = ctl_json(server, "bounce", ids[1], "--reason", "test")
    assert bounced["done"] == 1
    # The bounce queued a DSN to the sender in place of the message.
    left = ctl_json(server, "list")["messages"]
    assert ids[1] not in {m["id"] for m in left}
    dsns = [m for m in left if m["sender"] == ""]
    assert len(dsns) == 1 and dsns[0]["domains"] == ["home.test"]


def test_metrics_parse_and_count_what_was_received(serve):
    server = serve()
    send_many(server.port, [(["a@one.test"], body(f"x{i}")) for i in range(3)])

    def received() -> float:
        text = ctl(server, "metrics").stdout
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return families["volley_messages_received"].samples[0].value

    wait_until(lambda: received() == 3, 30, "three messages counted")
    text = ctl(server, "metrics").stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["volley_queue_messages"].samples[0].value == 3
    assert families["volley_workers"].samples[0].value == 2
    assert families["volley_delivery_latency_seconds"].type == "histogram"


def test_metrics_over_http(serve):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    serve({"metrics": {"listen": f"127.0.0.1:{port}"}})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"volley_messages_received", "volley_queue_messages"} <= names


def test_drain_stops_accepting_and_shutdown_stops(serve):
    server = serve()
    reply = ctl_json(server, "drain")
    assert reply["drained"] is True and reply["remaining"] == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=10)
    ctl(server, "shutdown")
    assert server.proc.wait(timeout=60) == 0
