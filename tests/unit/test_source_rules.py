"""ARCHITECTURE rule 1: engine/smtp is a pure protocol machine, with no I/O and no clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SMTP_DIR = Path(__file__).resolve().parents[2] / "engine" / "smtp"
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "lmdb", "time", "selectors", "threading"})
SOURCES = sorted(SMTP_DIR.glob("*.py"))


def imported_roots(source: str) -> set[str]:
    """Top-level package of every import, anywhere in the module (also inside functions)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
    return roots


def test_sources_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"server.py", "commands.py", "grammar.py", "buffer.py", "replies.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_io_or_clock_imports(path: Path) -> None:
    bad = imported_roots(path.read_text(encoding="utf-8")) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import asyncio",
        "import time as t",
        "from socket import socket",
        "import os, ssl",
        "def f():\n    import lmdb",
        "from selectors import DefaultSelector",
        "import threading.local",
        "__import__('time')",
        "importlib.import_module('asyncio')",
    ],
)
def test_checker_catches_forbidden_imports(snippet: str) -> None:
    # Negative control: the rule above would fail on each of these.
    assert imported_roots(snippet) & FORBIDDEN


def test_checker_allows_pure_imports() -> None:
    assert not imported_roots("import re, enum\nfrom engine.smtp import grammar\nimport msgspec") & FORBIDDEN
