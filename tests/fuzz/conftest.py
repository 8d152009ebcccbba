"""Fuzzing settings: a short, fixed round in `make test`, a long one in `make fuzz`.

The number of examples per test comes from VOLLEY_FUZZ_EXAMPLES (default 150;
`make fuzz` sets 20,000). `derandomize` makes every run draw the same examples, so a
failure in CI is a failure on every machine and never a flake; the corpus files in
corpus/ are replayed as explicit cases on every run, before any generated input.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("VOLLEY_FUZZ_EXAMPLES", "150"))
CORPUS = Path(__file__).parent / "corpus"

settings.register_profile(
    "volley-fuzz",
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("volley-fuzz")


def corpus(name: str) -> list[bytes]:
    """The cases of corpus/NAME: one per line, written as Python bytes escapes
    (\\r, \\n, \\x00, ...); blank lines and lines starting with # are skipped."""
    cases = []
    for line in (CORPUS / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            cases.append(line.encode("utf-8").decode("unicode_escape").encode("latin-1"))
    return cases
