"""`volley demo` as a real process: the whole loop (lab DNS, sinks, volley serve, blast) on
loopback, its report, and that it leaves nothing running, interrupted or not."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.integration.harness import wait_until

REPO = Path(__file__).resolve().parents[2]


def _start(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Its own process group, so the test can see (and in the end clean up) all it started.
    proc = subprocess.Popen([sys.executable, "-m", "engine", "demo", *args], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
        proc.stdout.close()

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, bool]:
    """(exit status, whether anything of its process group outlived it); kills leftovers."""
    try:
        code = proc.wait(timeout)
        left = _group_alive(proc.pid)
        return code, left
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_demo_delivers_every_message_and_reports(tmp_path: Path) -> None:
    work = tmp_path / "lab"
    proc, lines = _start("--domains", "3", "--messages", "200", "--concurrency", "10", "--keep", str(work))
    code, left = _finish(proc, 100)
    wait_until(lambda: any(line.startswith(("PASS", "FAIL")) for line in lines), 10, "the verdict line")
    text = "\n".join(lines)
    assert code == 0, text
    assert "PASS: 200 of 200 delivered" in text
    assert re.search(r"delivered\s+200\s", text) and re.search(r"accepted 200\b", text)
    assert "queue time" in text and "server CPU" in text and str(work) in text
    # Independent evidence: the relay's own delivery log, one line per delivered message,
    # each to one of the three demo domains.
    records = [json.loads(line) for line in (work / "delivery.jsonl").read_text().splitlines()]
    delivered = [r for r in records if r["outcome"] == "delivered"]
    assert len(delivered) == 200
    assert {r["domain"] for r in delivered} == {"d0.demo.test", "d1.demo.test", "d2.demo.test"}
    assert not left  # the server, its workers and the sinks are all gone


def test_interrupted_demo_stops_everything_and_removes_its_files() -> None:
    proc, lines = _start("--domains", "2", "--messages", "1000000", "--workers", "1")
    try:
        wait_until(lambda: any("working in " in line for line in lines) or proc.poll() is not None,
                   60, "the lab to start")
        assert proc.poll() is None, "\n".join(lines)
        workdir = Path(next(line for line in lines if "working in " in line).rpartition("working in ")[2])
        assert workdir.is_dir()
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C, to the demo only: it must stop the rest
        code, left = _finish(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert code == 130, "\n".join(lines)
    assert not left
    assert not workdir.exists()
