"""`volley blast`'s progress line on a real terminal (a pseudo-terminal of a known size) and
on a pipe: the bar shows on any terminal, sized by the terminal itself, never by COLUMNS."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios
from collections.abc import Iterator

import pytest

from engine.lab.blast.cli import ProgressLine
from engine.lab.blast.run import Progress


@pytest.fixture
def terminal() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """(the writing side of an 80x24 pseudo-terminal as a text stream, its master fd)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n" rewriting: read back what was written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    out = open(slave, "w", encoding="utf-8", closefd=True)  # noqa: SIM115 (closed below)
    try:
        yield out, master
    finally:
        out.close()
        os.close(master)


def _read(master: int) -> str:
    return os.read(master, 65536).decode()


def _progress(done: int, total: int = 2000) -> Progress:
    return Progress(elapsed=1.5, total=total, attempted=done, sent=done, accepted=done - 40,
                    refused=30, failed=10, connections=10)


@pytest.mark.parametrize("columns", [None, "", "200", "30"])
def test_the_bar_shows_on_an_80_column_terminal_whatever_columns_says(
        terminal: tuple[io.TextIOWrapper, int], columns: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    out, master = terminal
    line = ProgressLine(out, True, 0.0)
    for done in (0, 1000, 1999):
        line(_progress(done))
        drawn = _read(master)
        assert drawn.startswith("\r[") and drawn.endswith("\x1b[K"), drawn
        shown = drawn[1:-3]
        assert "%" in shown and "accepted" in shown
        assert len(shown) <= 79  # never wraps on the real width (not 200, not 30)
    assert " 50%" in _read_once(line, out, master, 1000)


def _read_once(line: ProgressLine, out: io.TextIOWrapper, master: int, done: int) -> str:
    line(_progress(done))
    return _read(master)


def test_no_bar_and_no_redrawing_when_stdout_is_not_a_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    line = ProgressLine(out, False, 0.0)
    line(_progress(1000))
    line(_progress(2000))
    line.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert all("[" not in x and "\r" not in x and "\x1b" not in x for x in lines)
    assert lines[0].startswith("accepted 960  refused 30  failed 10")
