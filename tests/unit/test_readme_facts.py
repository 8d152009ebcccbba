"""The README says what the code does: the bulk chunk size is the code's, every
reference points inside the repository, and the `volley blast` usage marks as optional
the options that have a default."""

from __future__ import annotations

import re
from pathlib import Path

from engine.control.bulk import CHUNK
from engine.lab.blast.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_bulk_chunk_size_is_the_codes() -> None:
    # Every "chunks of N messages" about bulk bounce/delete/flush (the suppress import's
    # chunks of lines are another thing).
    said = {int(n.replace(",", "")) for n in re.findall(r"chunks of ([\d,]+) messages", README)}
    assert said == {CHUNK}, f"README says chunks of {sorted(said)}; engine/control/bulk.py has {CHUNK}"


def test_references_stay_inside_the_repository() -> None:
    for target in re.findall(r"\]\(([^)#\s]+)", README):
        if re.match(r"[a-z]+:", target):  # (https:, mailto:)
            continue
        path = (REPO / target).resolve()
        assert path.is_relative_to(REPO) and path.exists(), target
    # A document the reader cannot open is no reference: the first design proposal lives
    # outside the repository.
    assert "design proposal" not in README and "../" not in README


def test_blast_usage_marks_defaulted_options_optional() -> None:
    usage = README.split("### `volley blast`", 1)[1].split("\n\n", 2)[1]
    assert usage.lstrip().startswith("volley blast")
    checked = 0
    for action in build_parser()._actions:
        if action.required:
            continue
        for flag in action.option_strings:
            for m in re.finditer(rf"{re.escape(flag)}(?=[\s\]=|])", usage):
                before = usage[:m.start()]
                # Optional: written inside [ ... ] (not "volley blast --to HOST:PORT").
                assert before.count("[") > before.count("]"), f"{flag} shown as required"
                checked += 1
    assert checked >= 10
