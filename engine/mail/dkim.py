"""DKIM signing (RFC 6376; Ed25519 per RFC 8463). INTERFACE STUB: being implemented."""

from __future__ import annotations

from collections.abc import Sequence

from engine.config import DkimConfig


class DkimKeyError(ValueError):
    """A [[dkim]] key that does not load; the message names the entry and the file."""


class DkimSigner:
    """Every configured key, loaded once; signs messages whose From: domain aligns."""

    def __init__(self) -> None:
        self.keys: list[object] = []

    @classmethod
    def from_config(cls, entries: Sequence[DkimConfig]) -> DkimSigner:
        """Load every key. Raises DkimKeyError naming `dkim[i].key_file` and the path."""
        return cls()

    def __bool__(self) -> bool:
        return bool(self.keys)

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The DKIM-Signature field(s) to prepend to `message` (CRLF-terminated each),
        one per key aligned with the From: domain; b"" when none aligns."""
        return b""
