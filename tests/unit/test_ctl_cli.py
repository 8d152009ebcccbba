"""`volley ctl` against a small real AF_UNIX server that records what it is sent.

The server here is a stand-in (one canned reply line per connection); the real control
server has its own integration tests. What is checked is the client side: the request
each command line becomes, how replies and failures are printed, and exit codes.
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import cli
from engine.control import client, formats, protocol, render
from engine.control.cli_ctl import rate

REPO = Path(__file__).resolve().parents[2]
NOW = time.time()


class FakeControl:
    """Answers every connection with `reply` (bytes as is, a dict as one JSON line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reply: bytes | dict[str, Any] = {"ok": True}
        self.requests: list[dict[str, Any]] = []
        self.hold = threading.Event()  # set: keep the connection open without replying
        self.release = threading.Event()
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake.requests.append(orjson.loads(self.rfile.readline()))
                if fake.hold.is_set():
                    fake.release.wait(30)
                    return
                r = fake.reply
                try:
                    self.wfile.write(r if isinstance(r, bytes) else orjson.dumps(r) + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on an oversized reply, as it should

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        # A short poll interval: shutdown() waits for the loop to notice, once per test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[FakeControl]:
    fake = FakeControl(tmp_path / "c.sock")
    yield fake
    fake.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["ctl", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def wire(req: protocol.Request) -> dict[str, Any]:
    """A request as the protocol itself encodes it (every field, defaults included)."""
    decoded: dict[str, Any] = orjson.loads(protocol.encode_request(req))
    return decoded


ID = "00000000000001a4"

REQUESTS = [
    (["status"], protocol.Status()),
    (["queue", "--by", "sender", "--limit", "7"], protocol.Queue(by="sender", limit=7)),
    (["list", "--domain", "example.com", "--state", "deferred", "--limit", "20", "--after", ID],
     protocol.List(domain="example.com", state="deferred", limit=20, after=ID)),
    (["list", "--sender", "<>"], protocol.List(sender="<>")),
    (["show", ID], protocol.Show(id=ID)),
    (["flush"], protocol.Flush()),
    (["flush", "--domain", "example.com"], protocol.Flush(domain="example.com")),
    (["flush", ID], protocol.Flush(id=ID)),
    (["suspend", "example.com", "--duration", "2h", "--reason", "maintenance"],
     protocol.Suspend(domain="example.com", duration=7200.0, reason="maintenance")),
    (["suspend", "example.com"], protocol.Suspend(domain="example.com")),
    (["resume", "example.com"], protocol.Resume(domain="example.com")),
    (["bounce", "--domain", "example.com", "--sender", "a@b.example", "--state", "deferred",
      "--dry-run", "--reason", "spam run"],
     protocol.Bounce(domain="example.com", sender="a@b.example", state="deferred",
                     dry_run=True, reason="spam run")),
    (["bounce", ID], protocol.Bounce(id=ID)),
    (["delete", "--all", "--dry-run"], protocol.Delete(all=True, dry_run=True)),
    (["delete", "--state", "suspended"], protocol.Delete(state="suspended")),
    (["throttle", "example.com", "--max-connections", "3", "--rate", "600/m"],
     protocol.Throttle(domain="example.com", max_connections=3, rate=10.0)),
    (["throttle", "example.com", "--rate", "2"], protocol.Throttle(domain="example.com", rate=2.0)),
    (["throttle", "example.com", "--clear"], protocol.Throttle(domain="example.com", clear=True)),
    (["mx"], protocol.Mx()),
    (["mx", "example.com"], protocol.Mx(domain="example.com")),
    (["mx", "--flush"], protocol.Mx(flush=True)),
    (["reload"], protocol.Reload()),
    (["drain", "--timeout-queue", "10m"], protocol.Drain(timeout=600.0)),
    (["drain"], protocol.Drain()),
    (["shutdown"], protocol.Shutdown()),
    (["metrics"], protocol.Metrics()),
]


@pytest.mark.parametrize(("argv", "expected"), REQUESTS, ids=[" ".join(a) for a, _ in REQUESTS])
def test_command_sends_request(ctl: FakeControl, capsys: pytest.CaptureFixture[str],
                               argv: list[str], expected: protocol.Request) -> None:
    code, _, err = run(capsys, "--socket", str(ctl.path), *argv)
    assert (code, err) == (0, "")
    assert ctl.requests == [wire(expected)]


def test_options_after_the_command(ctl: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    ctl.reply = {"ok": True, "messages": 3}
    code, out, _ = run(capsys, "flush", "--socket", str(ctl.path), "--json")
    assert code == 0
    assert orjson.loads(out) == {"ok": True, "messages": 3}


def test_json_prints_reply_and_exit_follows_ok(ctl: FakeControl,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ctl.reply = {"ok": True, "queue": {"messages": 5}, "extra": [1, "x"]}
    code, out, _ = run(capsys, "--socket", str(ctl.path), "--json", "status")
    assert (code, orjson.loads(out)) == (0, ctl.reply)
    assert "\n  " in out  # indented for a human, still JSON for jq
    ctl.reply = {"ok": False, "error": "no such message"}
    code, out, _ = run(capsys, "--socket", str(ctl.path), "--json", "show", ID)
    assert (code, orjson.loads(out)) == (1, ctl.reply)


def test_refused_reply_is_one_line_exit_1(ctl: FakeControl,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ctl.reply = {"ok": False, "error": "no such message: 00000000000001a4"}
    code, out, err = run(capsys, "--socket", str(ctl.path), "show", ID)
    assert (code, out) == (1, "")
    assert err == "volley: no such message: 00000000000001a4\n"


def test_nothing_listening(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.sock"
    code, out, err = run(capsys, "--socket", str(missing), "status")
    assert (code, out) == (1, "")
    assert err == (f"volley: nothing answers on {missing} (no such socket); "
                   "is volley serve running?\n")
    # A socket file whose server is gone: bound, never listening.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
        code, _, err = run(capsys, "--socket", str(stale), "queue")
    assert code == 1
    assert err == (f"volley: nothing answers on {stale} (connection refused); "
                   "is volley serve running?\n")


def test_permission_denied_is_named() -> None:
    # Root (as in CI containers) passes any file mode, so the mapping is checked directly.
    assert client.unavailable_reason(PermissionError(errno.EACCES, "x")) == "permission denied"
    assert client.unavailable_reason(PermissionError(errno.EPERM, "x")) == "permission denied"


def test_config_socket_is_honoured(ctl: FakeControl, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "volley.toml"
    conf.write_text('[control]\nsocket = "c.sock"\n')  # relative: to the CWD, as serve binds it
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "-c", str(conf), "reload")
    assert (code, err) == (0, "")
    assert ctl.requests == [{"cmd": "reload"}]
    # --socket wins over the file.
    code, _, err = run(capsys, "-c", str(conf), "--socket", str(tmp_path / "other.sock"), "reload")
    assert code == 1 and "other.sock" in err


def test_default_socket_path() -> None:
    assert client.socket_path(None, None) == "var/volley.sock"
    assert client.socket_path(None, "/x.sock") == "/x.sock"


def test_bad_config_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[control\n")
    code, _, err = run(capsys, "-c", str(conf), "status")
    assert code == 2
    assert err.startswith(f"volley: {conf}: not valid TOML") and err.count("\n") == 1


BAD_ARGS = [
    (["throttle", "example.com"], "give --max-connections and/or --rate, or --clear"),
    (["flush", "--domain", "example.com", ID], "give --domain or an ID, not both"),
    (["bounce"], "give an ID, a filter"),
    (["delete", ID, "--domain", "example.com"], "not both"),
    (["suspend", "example.com", "--duration", "soon"], "argument --duration"),
    (["suspend", "example.com", "--duration", "0s"], "must be positive"),
    (["throttle", "example.com", "--rate", "5/fortnight"], "argument --rate"),
    (["throttle", "example.com", "--max-connections", "0"], "argument --max-connections"),
    (["throttle", "example.com", "--rate", "nan"], "argument --rate"),
    (["--timeout", "-1", "status"], "argument --timeout"),
    (["list", "--limit", "20000"], "limit: must be 1..10000"),
    (["list", "--state", "lost"], "argument --state"),
    (["show"], "required: ID"),
    (["frobnicate"], "invalid choice"),
    ([], "required: CMD"),
]


@pytest.mark.parametrize(("argv", "text"), BAD_ARGS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGS])
def test_argument_errors_exit_2_one_line(ctl: FakeControl, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], text: str) -> None:
    code, out, err = run(capsys, "--socket", str(ctl.path), *argv)
    assert (code, out) == (2, "")
    assert err.startswith("volley: ctl") and err.count("\n") == 1 and text in err, err
    assert ctl.requests == []  # refused before connecting


def test_timeout_without_reply(ctl: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    ctl.hold.set()
    code, _, err = run(capsys, "--socket", str(ctl.path), "--timeout", "0.2", "status")
    assert code == 1
    assert err == (f"volley: no reply from {ctl.path} within 0.2s "
                   "(--timeout to wait longer, 0 for ever)\n")


def test_reply_not_json(ctl: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    ctl.reply = b"220 mx.example ESMTP\r\n"
    code, _, err = run(capsys, "--socket", str(ctl.path), "status")
    assert code == 1 and "reply is not JSON" in err and "220 mx.example" in err
    ctl.reply = b""  # closed without a line
    code, _, err = run(capsys, "--socket", str(ctl.path), "status")
    assert code == 1 and "connection closed before a reply" in err


def test_big_reply_read_whole(ctl: FakeControl) -> None:
    rows = [{"id": f"{i:016x}", "sender": "s@example.com", "last_reply": "x" * 200}
            for i in range(5000)]  # ~1.3 MiB: many recv() calls
    ctl.reply = {"ok": True, "messages": rows, "next": None}
    reply = client.request(str(ctl.path), protocol.List(limit=5000), timeout=30)
    assert reply["messages"] == rows


def test_reply_without_newline_is_bounded(ctl: FakeControl) -> None:
    ctl.reply = b"x" * (client.MAX_REPLY + 2 * 256 * 1024)
    with pytest.raises(client.ControlError, match="without a newline"):
        client.request(str(ctl.path), protocol.Status(), timeout=30)


def test_subprocess_queue_table(ctl: FakeControl, tmp_path: Path) -> None:
    ctl.reply = QUEUE_REPLY
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ctl", "--socket", str(ctl.path), "queue", "--limit", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert ctl.requests == [{"cmd": "queue", "by": "domain", "limit": 2}]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["DOMAIN", "T", "5", "10", "20", "40", "80+", "OLDEST", "STATE",
                                "NEXT", "NOTE"]
    assert lines[1].split()[:7] == ["gmail.example", "1200", "1000", "150", "50", "0", "0"]
    assert "suspended" in lines[2] and "by alice" in lines[2] and "maintenance" in lines[2]
    assert "(showing 2 of 40 rows)" in lines[-1]


# --- rendering -------------------------------------------------------------------------

QUEUE_REPLY = {
    "ok": True, "by": "domain", "buckets": ["5", "10", "20", "40", "80+"],
    "rows": [
        {"key": "gmail.example", "total": 1200, "ages": [1000, 150, 50, 0, 0], "oldest": 1500.0,
         "next_attempt": NOW + 125, "ready": 1000, "deferred": 200, "state": "deferred"},
        {"key": "yahoo.example", "total": 30, "ages": [0, 0, 0, 10, 20], "oldest": NOW - 7380,
         "next_attempt": None, "ready": 0, "deferred": 0, "state": "suspended",
         "reason": "maintenance", "until": NOW + 3600, "by_who": "alice"},
    ],
    "totals": {"units": 1230, "ready": 1000, "deferred": 200, "suspended": 30, "domains": 40},
    "rows_total": 40,
}

STATUS_REPLY = {
    "ok": True, "version": "0.5.0", "pid": 4242, "uptime": 7380.0, "hostname": "mx1.example",
    "listeners": ["0.0.0.0:25", "[::]:587"],
    "workers": [{"slot": 0, "pid": 4243, "age": 7379.0, "restarts": 0, "sessions_in": 12,
                 "sessions_out": 340, "inflight": 412, "out_limit": 500, "out_waiting": 3},
                {"slot": 1, "pid": 4300, "age": 65.0, "restarts": 2, "sessions_in": 3,
                 "sessions_out": 17, "inflight": 20, "out_limit": 500, "out_waiting": 0}],
    "queue": {"messages": 900, "units": 1230, "bytes": 5 * 1024 * 1024 + 1, "ready": 1000,
              "deferred": 200, "suspended": 30},
    "rates": {"1m": {"received": 120.5, "delivered": 118.0, "deferred": 2.0, "bounced": 0.0},
              "5m": {"received": 100.0, "delivered": 99.0, "deferred": 1.0, "bounced": 0.0}},
    "suspensions": [{"domain": "yahoo.example", "by": "alice", "reason": "maintenance",
                     "since": NOW - 60, "until": None}],
    "throttles": [{"domain": "gmail.example", "max_connections": 5, "rate": 10.0}],
    "backoffs": [],
}


def test_status_render() -> None:
    text = render.render("status", STATUS_REPLY, now=NOW)
    assert text.startswith("volley 0.5.0 on mx1.example, pid 4242, up 2h03m\n")
    draining = render.render("status", {**STATUS_REPLY, "draining": True}, now=NOW)
    assert draining.startswith("volley 0.5.0 on mx1.example, pid 4242, up 2h03m, DRAINING\n")
    assert "listeners  0.0.0.0:25, [::]:587" in text
    assert "900 messages, 1230 delivery units, 5.0MiB: 1000 ready, 200 deferred, 30 suspended" in text
    worker = next(line for line in text.splitlines() if " 4300 " in line)
    assert worker.split() == ["1", "4300", "1m05s", "2", "3", "17", "20", "500", "0"]
    busy = next(line for line in text.splitlines() if " 4243 " in line)
    assert busy.split()[-4:] == ["340", "412", "500", "3"]
    assert any(line.split() == ["1m", "120", "118", "2.00", "0"] for line in text.splitlines())
    assert "yahoo.example" in text and "until resumed" in text and "1m ago" in text
    assert any(line.split() == ["gmail.example", "5", "10/s"] for line in text.splitlines())
    assert "backing off: none" in text


def test_queue_by_age_render() -> None:
    reply = {"ok": True, "by": "age", "buckets": ["5", "10+"], "rows_total": 2,
             "rows": [{"key": "5", "total": 7, "ready": 5, "deferred": 2},
                      {"key": "10+", "total": 1, "ready": 0, "deferred": 1}],
             "totals": {"units": 8, "ready": 5, "deferred": 3, "suspended": 0, "domains": None}}
    lines = render.render("queue", reply, now=NOW).splitlines()
    assert [line.split() for line in lines[:3]] == [
        ["AGE", "T", "READY", "DEFERRED"], ["5", "7", "5", "2"], ["10+", "1", "0", "1"]]
    assert lines[3] == "8 delivery units: 5 ready, 3 deferred, 0 suspended"


def test_list_render_and_next_page() -> None:
    reply = {"ok": True, "next": "00000000000001a5", "scanned": 10, "messages": [
        {"id": ID, "sender": "", "received_at": NOW - 300, "size": 2048, "recipients": 3,
         "pending": 2, "domains": ["a.example", "b.example", "c.example"], "state": "deferred",
         "attempts": 4, "next_attempt": NOW + 720, "last_reply": "451 4.7.1 try\nlater"},
    ]}
    lines = render.render("list", reply, now=NOW).splitlines()
    assert lines[0].split()[:3] == ["ID", "AGE", "SIZE"]
    assert lines[1].split()[:6] == [ID, "5m", "2.0KiB", "<>", "2/3", "a.example,"]
    assert "b.example +1" in lines[1] and "in 12m" in lines[1] and "451 4.7.1 try later" in lines[1]
    assert lines[2] == "more: volley ctl list --after 00000000000001a5"
    assert render.render("list", {"ok": True, "messages": []}) == "no messages match\n"


def test_show_render() -> None:
    reply = {"ok": True, "message": {
        "id": ID, "sender": "a@b.example", "received_at": NOW - 90, "size": 512,
        "body_type": "8BITMIME", "smtputf8": False, "ret": "HDRS", "envid": None,
        "client_ip": "192.0.2.7", "helo": "client.example", "auth_user": "bulk",
        "recipients": [{"address": "x@c.example", "state": "deferred", "attempts": 2,
                        "next_attempt": NOW + 60, "last_reply": "421 busy",
                        "notify": ["FAILURE", "DELAY"], "orcpt": None}],
        "headers": [["Subject", "Hello"], ["From", "a@b.example"]]}}
    text = render.render("show", reply, now=NOW)
    assert f"id:        {ID}\n" in text
    assert "envid:     -\n" in text and "smtputf8:  no\n" in text
    assert "client:    192.0.2.7 helo client.example\n" in text
    assert "(1m30s ago)" in text
    row = next(line for line in text.splitlines() if line.startswith("x@c.example"))
    assert row.split() == ["x@c.example", "deferred", "2", "in", "1m", "FAILURE,", "DELAY", "-",
                           "421", "busy"]
    assert text.endswith("Subject: Hello\nFrom: a@b.example\n")


def test_simple_renders() -> None:
    assert render.render("flush", {"ok": True, "messages": 7}) == "flushed 7 messages (made due now)\n"
    assert render.render("flush", {"ok": True, "messages": 1}) == "flushed 1 message (made due now)\n"
    assert render.render("bounce", {"ok": True, "matched": 12, "done": 0, "dry_run": True,
                                    "seconds": 0.01}) == "dry run: 12 messages would be bounced\n"
    assert render.render("delete", {"ok": True, "matched": 12, "done": 12, "dry_run": False,
                                    "seconds": 1.25}) == "deleted 12 of 12 matched messages in 1.2s\n"
    assert render.render("throttle", {"ok": True, "throttle": None}) == "throttle cleared\n"
    assert render.render("throttle", {"ok": True, "throttle": {
        "domain": "a.example", "max_connections": None, "rate": 0.5}}) == \
        "throttle a.example: max connections -, rate 30/m\n"
    assert render.render("resume", {"ok": True, "resumed": True, "released": 4}) == \
        "resumed; 4 messages released\n"
    assert render.render("drain", {"ok": True, "drained": True, "remaining": 0,
                                   "seconds": 75.0}) == "queue drained in 1m15s; 0 messages remaining\n"
    assert render.render("metrics", {"ok": True, "text": "volley_up 1\n"}) == "volley_up 1\n"
    assert render.render("mx", {"ok": True, "flushed": 3}) == "flushed 3 cached MX entries\n"


def test_mx_render_one_row_per_host() -> None:
    reply = {"ok": True, "entries": [
        {"domain": "a.example", "kind": "mx", "ttl": 300, "reply": None, "hosts": [
            {"name": "mx1.a.example", "preference": 10, "addresses": ["192.0.2.1", "2001:db8::1"]},
            {"name": "mx2.a.example", "preference": 20, "addresses": ["192.0.2.2"]}]},
        {"domain": "nx.example", "kind": "nxdomain", "ttl": 60, "reply": "550 5.1.2 no such domain",
         "hosts": []}]}
    lines = render.render("mx", reply, now=NOW).splitlines()
    assert lines[0].split() == ["DOMAIN", "KIND", "TTL", "PREF", "HOST", "ADDRESSES", "REPLY"]
    assert lines[1].split() == ["a.example", "mx", "5m", "10", "mx1.a.example", "192.0.2.1,",
                                "2001:db8::1"]
    assert lines[2].split() == ["20", "mx2.a.example", "192.0.2.2"]
    assert lines[3].split()[:3] == ["nx.example", "nxdomain", "1m"] and "550 5.1.2" in lines[3]


@pytest.mark.parametrize("cmd", protocol.COMMANDS)
def test_render_survives_missing_fields(cmd: str) -> None:
    # A server that dropped or has not yet filled optional fields: "-" instead of a crash.
    assert isinstance(render.render(cmd, {"ok": True}, now=NOW), str)


def test_unknown_reply_shape_falls_back_to_json(ctl: FakeControl,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ctl.reply = {"ok": True, "rows": "not a list", "buckets": 5}
    code, out, err = run(capsys, "--socket", str(ctl.path), "queue")
    assert code == 0 and "cannot render the reply" in err
    assert orjson.loads(out) == ctl.reply


def test_table_aligns_numbers_right() -> None:
    text = formats.table([{"k": "a", "n": 5}, {"k": "bbb", "n": 1234}, {"k": None, "n": None}],
                         [formats.Column("KEY", "k"), formats.Column("N", "n")])
    assert text == "KEY     N\na       5\nbbb  1234\n-       -\n"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (45, "45s"), (60, "1m"), (185, "3m05s"), (7380, "2h03m"), (3600, "1h"),
    (86400 * 4 + 3600 * 7 + 59, "4d07h"), (-90, "1m30s")])
def test_short_duration(seconds: float, text: str) -> None:
    assert formats.short_duration(seconds) == text


def test_sizes_and_relative_times() -> None:
    assert [formats.human_size(n) for n in (0, 1023, 1536, 5 * 1024**2, 3 * 1024**3)] == \
        ["0B", "1023B", "1.5KiB", "5.0MiB", "3.0GiB"]
    assert formats.relative(NOW + 720, NOW) == "in 12m"
    assert formats.relative(NOW - 180, NOW) == "3m ago"
    assert formats.relative(NOW + 0.4, NOW) == "now"
    assert formats.relative(None, NOW) == "-"


@pytest.mark.parametrize(("text", "per_second"), [
    ("10/s", 10.0), ("600/m", 10.0), ("36000/h", 10.0), ("2.5", 2.5), ("90/min", 1.5)])
def test_rate_parse(text: str, per_second: float) -> None:
    assert rate(text) == pytest.approx(per_second)

