"""What every `volley` command line shares: exit codes, `CliError`, and argument types.

`volley` itself (engine.cli), `volley ctl` (engine.control.cli_ctl) and the lab's
commands (blast, sink, demo) all import this one leaf module, so a duration, a size or
a HOST:PORT is read the same way everywhere and no command imports another to get at
a helper. The engine's config units are imported inside the functions: `volley
--version` and `--help` should not pay for msgspec and the TOML writer.
"""

from __future__ import annotations

import argparse
import math

PROG = "volley"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line; `code` is the process exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def is_number(text: str) -> bool:
    """A finite decimal: "nan" and "inf" parse as floats but mean nothing here."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def duration(text: str) -> float:
    """"2h", "30m", "90s" or bare seconds → seconds (the config's duration units)."""
    from engine.config import parse_duration

    try:
        seconds = float(text) if is_number(text) else float(parse_duration(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return seconds


def positive_duration(text: str) -> float:
    seconds = duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return seconds


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def host_port(text: str) -> tuple[str, int]:
    """"127.0.0.1:25" or "[::1]:25", read as `[[listeners]] address` is."""
    from engine.config import split_host_port

    try:
        return split_host_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
