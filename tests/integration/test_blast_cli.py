"""`volley blast` as a real process against a sink on loopback: the JSON report, the
plain progress lines (stdout is a pipe, not a terminal), the summary, the exit status,
and Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.inbound.users import set_user
from engine.lab.sink.protocol import Sink, start_sink
from tests.integration.harness import REPO, LoopThread, ServeProcess
from tests.integration.test_blast import _rcpt_and_end_refusals

TIMEOUT = 60


def _sink(peers: LoopThread, **kw: Any) -> Sink:
    sink: Sink = peers.call(start_sink("127.0.0.1", 0, keep_segments=False, **kw))
    peers.sinks.append(sink)  # type: ignore[attr-defined]  # closed by the fixture
    return sink


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _blast(port: int, *args: str, module: str = "engine") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", module, *(["blast"] if module == "engine" else []),
           "--to", f"127.0.0.1:{port}", "--timeout", "10s", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_json_report_is_one_object_and_exit_0_when_all_accepted(peers: LoopThread) -> None:
    sink = _sink(peers)
    done = _blast(sink.port, "-n", "120", "-c", "4", "-m", "25", "-r", "2", "--domains", "3",
                  "--size", "2k", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole of stdout: no progress lines with --json
    assert (report["accepted"], report["sent"], report["failed"], report["unsent"]) == (120, 120, 0, 0)
    assert report["connections"] == 5 and report["stopped"] == "done"
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["options"]["size"] == 2000 and report["options"]["recipients"] == 2
    assert len(sink.messages) == 120 and {len(m.data) for m in sink.messages} == {2000}


def test_refusals_by_code_in_summary_and_exit_1(peers: LoopThread) -> None:
    sink = _sink(peers, script=_rcpt_and_end_refusals())
    done = _blast(sink.port, "-n", "80", "-c", "1", "--domains", "4")
    assert done.returncode == 1, done.stderr
    # d1 is every 4th message: 20 refused at RCPT; of the 60 bodies every 3rd gets 451.
    assert "attempted 80 = accepted 40 + refused 40 (451: 20, 550: 20) + failed 0" in done.stdout
    assert "bodies sent 60 of 80" in done.stdout
    assert "recipients refused (550: 20)" in done.stdout
    assert re.search(r"latency ms .* p50 [\d.]+  p90 [\d.]+  p99 [\d.]+  max [\d.]+", done.stdout)
    assert len(sink.messages) == 40


def test_plain_progress_lines_when_stdout_is_not_a_terminal(peers: LoopThread) -> None:
    sink = _sink(peers)
    # 250 messages at 100/s: about 2.5 s, so at least two once-a-second lines.
    done = _blast(sink.port, "-n", "250", "-c", "2", "--rate", "100", module="engine.lab.blast")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    progress = [ln for ln in lines if re.fullmatch(
        r"accepted [\d,]+  refused 0  failed 0  [\d,]+ msgs/s  [\d.]+s", ln)]
    assert len(progress) >= 2 and "\r" not in done.stdout and "\x1b" not in done.stdout
    assert lines[-4] == "attempted 250 = accepted 250 + refused 0 + failed 0"  # the summary
    assert lines[:len(progress)] == progress  # progress first, then the summary
    assert sink.connections == 2


def test_connection_refused_exits_1_and_says_why(peers: LoopThread) -> None:
    sink = _sink(peers)
    peers.call(sink.close())  # nothing listens on that port now
    done = _blast(sink.port, "-n", "10", "-c", "2", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["unsent"] == 10 and report["stopped"] == "gave up"
    assert report["errors"] == {"connect: ConnectionRefusedError": 6}


def test_usage_errors_exit_2(peers: LoopThread, tmp_path: Path) -> None:
    sink = _sink(peers)
    for args, words in [
        (["--size", "1k:x"], "weight"),
        (["--template"], "--template needs --message"),
        (["--message", str(tmp_path / "absent.eml")], "absent.eml"),
        (["--to-template", "u{x}@d.example"], "{n} and {d}"),
    ]:
        done = _blast(sink.port, *args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
    assert sink.connections == 0


def test_first_interrupt_stops_and_prints_the_summary(peers: LoopThread) -> None:
    sink = _sink(peers)
    cmd = [sys.executable, "-m", "engine", "blast", "--to", f"127.0.0.1:{sink.port}",
           "-n", "100000", "-c", "2", "--rate", "50"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # a progress line: the run is under way
        assert first.startswith("accepted "), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "stopped: interrupted" in out and "Traceback" not in err
    summary = re.search(r"attempted ([\d,]+) = accepted ([\d,]+) \+ refused 0 \+ failed 0;"
                        r"  unsent ([\d,]+)", out)
    assert summary, out
    accepted, unsent = (int(summary.group(i).replace(",", "")) for i in (2, 3))
    assert accepted == len(sink.messages) and accepted + unsent == 100000 and accepted >= 50


def serve_starttls_auth(serve: Callable[..., ServeProcess], tls_files: dict[str, str],
                        tmp_path: Path) -> ServeProcess:
    """`volley serve` with one STARTTLS listener that requires AUTH; user alice:secret."""
    users = str(tmp_path / "users")
    set_user(users, "alice", "secret", ln=10)  # low scrypt cost: a fast test
    return serve({
        "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
        "auth": {"users_file": users},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls", "auth": "required"}],
    })


def test_against_volley_serve_with_starttls_and_auth(
    serve: Callable[..., ServeProcess], tls_files: dict[str, str], tmp_path: Path
) -> None:
    server = serve_starttls_auth(serve, tls_files, tmp_path)
    done = _blast(server.port, "-n", "60", "-c", "3", "-m", "20", "-r", "2", "--domains", "3",
                  "--tls-verify", "--tls-ca", tls_files["ca_file"], "--auth", "alice:secret",
                  "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["accepted"], report["connections"], report["rcpt_refused"]) == (60, 3, {})
    assert report["options"]["auth"] == "alice:***"

    # The same without AUTH: every MAIL is refused, by its code, and the exit status says so.
    done = _blast(server.port, "-n", "10", "-c", "1", "--tls", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["accepted"] == 0 and set(report["refused"]) == {"530"}


def test_progress_bar_redrawn_in_place_on_a_terminal(peers: LoopThread) -> None:
    sink = _sink(peers)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 132, 0, 0))
    cmd = [sys.executable, "-m", "engine", "blast", "--to", f"127.0.0.1:{sink.port}",
           "-n", "300", "-c", "2", "--rate", "300"]  # about a second: several redraws
    env = {k: v for k, v in _env().items() if k not in ("COLUMNS", "LINES")}  # the pty's size
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=terminal, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    os.close(terminal)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = b"".join(chunks).decode()
    redraws = re.findall(r"\r\[([#.]+)\] +(\d+)%  accepted [\d,]+  refused 0", out)
    assert len(redraws) >= 2 and "\x1b[K" in out
    assert len({len(bar) for bar, _ in redraws}) == 1  # one bar width throughout
    percents = [int(p) for _, p in redraws]
    assert percents == sorted(percents) and percents[0] < 100
    assert "attempted 300 = accepted 300 + refused 0 + failed 0" in out  # then the summary
