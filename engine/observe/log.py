"""JSON-lines logging to stderr (orjson).

One line per event so operators and tests can follow the process with a plain line
reader; the supervisor's `ready` line is how tests and benchmarks learn the bound
ports (never a sleep).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import orjson

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_threshold = 20
_role = "supervisor"


def configure(level: str, role: str | None = None) -> None:
    global _threshold, _role
    _threshold = _LEVELS.get(level, 20)
    if role is not None:
        _role = role


def enabled(level: str) -> bool:
    return _LEVELS[level] >= _threshold


def log(level: str, event: str, **fields: Any) -> None:
    """Write one JSON line; never raises (a log failure must not end a session)."""
    if _LEVELS[level] < _threshold:
        return
    record = {"ts": round(time.time(), 3), "level": level, "event": event, "role": _role,
              "pid": os.getpid(), **fields}
    try:
        sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
        sys.stderr.buffer.flush()
    except (OSError, ValueError):
        # stderr closed or full: losing a log line beats losing the worker.
        return


def info(event: str, **fields: Any) -> None:
    log("info", event, **fields)


def warning(event: str, **fields: Any) -> None:
    log("warning", event, **fields)


def error(event: str, **fields: Any) -> None:
    log("error", event, **fields)


def debug(event: str, **fields: Any) -> None:
    log("debug", event, **fields)
