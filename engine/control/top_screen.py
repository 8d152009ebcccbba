"""`volley ctl top`: read a snapshot every interval and draw it (engine/control/top.py).

On a terminal it is a full screen (curses, standard library): q or Ctrl-C ends it with
exit 0, a resize redraws. When stdout is not a terminal it prints the same lines as
plain text, one block per refresh with a blank line after it, so `volley ctl top | tee`
or a log keeps a readable trace.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.control import protocol
from engine.control.top import Snapshot, parse_counters, parse_cpu, screen

if TYPE_CHECKING:
    import curses

Send = Callable[[protocol.Request], dict[str, Any]]
PLAIN_WIDTH = 160  # a pipe has no width: wide enough for the replies, still one line each
QUEUE_ROWS = 100


class Reader:
    """Takes snapshots. The queue's shape costs the server a walk of the queue, so a
    slow one is reused for ten times what it cost (a small queue: read every time)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self._queue: dict[str, Any] = {}
        self._queue_until = 0.0
        self._ticks = float(os.sysconf("SC_CLK_TCK"))

    def _checked(self, req: protocol.Request) -> dict[str, Any]:
        from engine.cmdline import EXIT_FAILURE, CliError

        reply = self.send(req)
        if not reply.get("ok"):
            what = type(req).__struct_config__.tag
            raise CliError(f"ctl top: {what}: {reply.get('error') or 'refused'}", EXIT_FAILURE)
        return reply

    def snapshot(self) -> Snapshot:
        status = self._checked(protocol.Status())
        now = time.monotonic()
        if now >= self._queue_until:
            self._queue = self._checked(protocol.Queue(by="domain", limit=QUEUE_ROWS))
            self._queue_until = now + 10 * (time.monotonic() - now)
        metrics = self._checked(protocol.Metrics())
        cpu: dict[int, float] = {}
        for w in status.get("workers") or []:
            pid = w.get("pid")
            if isinstance(pid, int):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        cpu[int(w.get("slot", 0))] = parse_cpu(f.read(), self._ticks)
                except (OSError, ValueError, IndexError):
                    pass  # another host's server, or the worker just exited: shown as "-"
        return Snapshot(at=time.monotonic(), status=status, queue=self._queue,
                        counters=parse_counters(str(metrics.get("text", ""))), cpu=cpu)


def run_top(send: Send, interval: float, count: int) -> int:
    """Draw until q / Ctrl-C (or `count` refreshes, when count > 0). Exit status 0."""
    reader = Reader(send)
    try:
        if sys.stdout.isatty():
            import curses

            return int(curses.wrapper(_loop, reader, interval, count))
        return _plain(reader, interval, count)
    except KeyboardInterrupt:
        return 0


def _plain(reader: Reader, interval: float, count: int) -> int:
    prev: Snapshot | None = None
    shown = 0
    try:
        while True:
            cur = reader.snapshot()
            lines = screen(prev, cur, width=PLAIN_WIDTH, height=10_000, wall=time.time())
            # The blank line ends a block, so the screen's own blank one is left out.
            sys.stdout.write("".join(line.rstrip() + "\n" for line in lines if line) + "\n")
            sys.stdout.flush()
            prev, shown = cur, shown + 1
            if count and shown >= count:
                return 0
            time.sleep(max(interval - (time.monotonic() - cur.at), 0.0))  # the refresh period
    except BrokenPipeError:  # `| head`: the reader has seen enough
        sys.stderr.close()
        return 0


def _draw(win: curses.window, lines: list[str]) -> None:
    import curses

    win.erase()
    height, width = win.getmaxyx()
    for y, line in enumerate(lines[:height]):
        try:
            # The bottom-right cell cannot be written without scrolling: curses.error.
            win.addnstr(y, 0, line, width - 1 if y == height - 1 else width)
        except curses.error:
            pass
    win.refresh()


def _loop(win: curses.window, reader: Reader, interval: float, count: int) -> int:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal without an invisible cursor
    prev: Snapshot | None = None
    shown = 0
    while True:
        cur = reader.snapshot()
        height, width = win.getmaxyx()
        _draw(win, screen(prev, cur, width=width, height=height, wall=time.time()))
        older, prev, shown = prev, cur, shown + 1
        if count and shown >= count:
            return 0
        due = cur.at + interval
        while (left := due - time.monotonic()) > 0:
            win.timeout(max(int(left * 1000), 1))
            key = win.getch()
            if key in (ord("q"), ord("Q")):
                return 0
            if key == curses.KEY_RESIZE:
                height, width = win.getmaxyx()
                _draw(win, screen(older, cur, width=width, height=height, wall=time.time()))
