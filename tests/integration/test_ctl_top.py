"""`volley ctl top` against a real `volley serve` relaying to a sink while `volley blast`
sends: on an 80x24 terminal (tmux: send-keys, capture-pane), and with stdout a pipe.

The figure checked is the destination row's SENT (transactions answered 2xx, from the
workers' pool rows): it may lag the sink by a refresh but never runs ahead of it, and it
reaches the sink's own count when the flow is over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.lab.sink.protocol import start_sink
from tests.integration.control_helpers import relay_overrides
from tests.integration.harness import REPO, ServeProcess, wait_until

A_IP = "127.0.0.2"
WAIT = 60.0
N = 240
TMUX = shutil.which("tmux")


def zone() -> dict[str, Any]:
    return {"a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": [A_IP]}}


def relay(serve: Any, peers: Any, dns_zone: Any) -> tuple[Any, ServeProcess]:
    sink = peers.call(start_sink(A_IP, 0))
    peers.sinks.append(sink)
    server = serve(relay_overrides(dns_zone(zone()).port, sink.port))
    return sink, server


def blast(server: ServeProcess) -> subprocess.Popen[bytes]:
    """N messages to a.test, rate-limited so the flow spans several refreshes."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "blast", "--to", f"127.0.0.1:{server.port}",
         "-n", str(N), "-c", "2", "--rate", "60", "--to-template", "u{n}@a.test"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _top_cmd(server: ServeProcess) -> list[str]:
    return [sys.executable, "-m", "engine", "ctl", "-c", str(server.config_path), "top"]


def sent_on(screen: str, domain: str) -> int | None:
    """The SENT column of the domain's row, None while it has no row."""
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == domain:
            return int(cells[5])
    return None


class Tmux:
    """A private tmux server (its own socket) holding one 80x24 window."""

    def __init__(self, tmp: Path, command: str) -> None:
        assert TMUX is not None
        self.base = [TMUX, "-L", f"volley-top-{os.getpid()}", "-f", "/dev/null"]
        subprocess.run([*self.base, "new-session", "-d", "-x", "80", "-y", "24", "-s", "top",
                        command], check=True, cwd=tmp, env=_env())

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", "top"], check=True,
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "top", *keys], check=True)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (`make system-deps` installs "
                    "it when run as root)")
def test_top_on_an_80x24_terminal_shows_what_the_sink_received_and_q_exits_0(
        serve, peers, dns_zone, tmp_path):
    sink, server = relay(serve, peers, dns_zone)
    status = tmp_path / "status"
    cmd = " ".join(_top_cmd(server)) + f"; echo $? > {status}"
    tmux = Tmux(tmp_path, cmd)
    try:
        wait_until(lambda: "DESTINATION" in tmux.screen(), WAIT, "the top screen")
        sender = blast(server)
        seen: list[tuple[int, int]] = []  # (SENT on the screen, the sink's count after it)

        def caught_up() -> bool:
            screen = tmux.screen()
            after = len(sink.messages)
            sent = sent_on(screen, "a.test")
            if sent is not None:
                # Never ahead of the sink: the sink counts before it answers 250.
                assert sent <= after, (sent, after, screen)
                seen.append((sent, after))
            return sent == N

        wait_until(caught_up, WAIT, f"a.test's row showing {N} sent")
        assert sender.wait(WAIT) == 0
        screen = tmux.screen()
        assert len(sink.messages) == N and sent_on(screen, "a.test") == N
        lines = screen.splitlines()
        assert lines[0].startswith("volley top  ") and "2 workers" in lines[0]
        assert all(len(line) <= 80 for line in lines)
        assert seen and seen[0][0] < N  # it was watched while the flow was on
        tmux.keys("q")
        wait_until(lambda: status.exists() and status.read_text().strip() != "", WAIT,
                   "top to exit on q")
        assert status.read_text().strip() == "0"
    finally:
        tmux.close()


def test_top_without_a_terminal_prints_plain_blocks_and_ctrl_c_exits_0(serve, peers, dns_zone):
    _, server = relay(serve, peers, dns_zone)
    with subprocess.Popen(_top_cmd(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_env(), cwd=server.config_path.parent) as proc:
        try:
            blocks = _blocks(proc, 2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    for block in blocks:
        assert block[0].startswith("volley top  ")
        assert not any("\x1b" in line for line in block)  # no terminal escapes
        assert any(line.startswith("DESTINATION ") for line in block)
    # The first block has nothing to compare with; the second has rates (nothing flows).
    assert blocks[0][1].startswith("in -/s") and blocks[1][1].startswith("in 0.0/s")


def _blocks(proc: subprocess.Popen[str], count: int) -> list[list[str]]:
    """`count` whole blocks of the output, each ended by a blank line."""
    assert proc.stdout is not None
    blocks: list[list[str]] = [[]]
    while len(blocks) <= count:
        line = proc.stdout.readline()
        assert line, "top ended before its blocks"
        if line == "\n":
            blocks.append([])
        else:
            blocks[-1].append(line.rstrip("\n"))
    return blocks[:count]
