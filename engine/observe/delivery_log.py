"""The delivery log: one JSON line per attempt and recipient (orjson).

Lines are buffered in memory and written by an executor thread every `interval` or
when the buffer passes `max_buffer` bytes, so no file write ever blocks the event
loop (house rule 4). Each worker appends to the same file with O_APPEND; lines are
written whole, so workers' lines never interleave mid-line.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson

from engine.observe import log


class DeliveryLog:
    def __init__(self, path: str, loop: asyncio.AbstractEventLoop, *, interval: float = 0.25,
                 max_buffer: int = 256 * 1024) -> None:
        self.path = path
        self.loop = loop
        self.interval = interval
        self.max_buffer = max_buffer
        self._buf: list[bytes] = []
        self._size = 0
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = orjson.dumps(record) + b"\n"
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.max_buffer:
            self._flush_soon(0)
        elif self._timer is None:
            self._flush_soon(self.interval)

    def _flush_soon(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._buf or self._fd is None:
            return
        if self._writing is not None and not self._writing.done():
            self._flush_soon(self.interval)  # one write at a time keeps lines in order
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        self._writing = self.loop.run_in_executor(None, self._write_all, self._fd, data)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as err:
            log.error("delivery_log_write_failed", error=str(err))

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await self._writing
        if self._buf and self._fd is not None:
            self._write_all(self._fd, b"".join(self._buf))
            self._buf.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
