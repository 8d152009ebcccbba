"""The AUTH exchange of one blast connection (RFC 4954): PLAIN in one line, LOGIN in three.

A mixin of the per-connection state machine (engine.lab.blast.protocol), kept apart so
that module stays about messages; the wire lines come from `auth.BlastAuth`, built once
per run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from engine.lab.blast.shared import Shared

__all__ = ["AuthSteps"]


class AuthSteps:
    """BlastConnection's AUTH steps: after the (last) EHLO, before the first message."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by BlastConnection
        s: Shared

        def _write(self, data: bytes) -> None: ...
        def _expect(self, n: int, handler: Callable[[list[tuple[int, bytes]]], None]) -> None: ...
        def _give_up(self, kind: str) -> None: ...
        def _authenticated(self) -> None: ...

    def _authenticate(self, ehlo: bytes) -> None:
        auth = self.s.auth
        assert auth is not None
        mech, why = auth.choose(ehlo)
        if not mech:
            return self._give_up(why)
        if mech == b"PLAIN":
            self._write(auth.plain)
            self._expect(1, self._on_auth)
        else:
            self._write(auth.login[0])
            self._expect(1, self._on_login_user)

    def _on_login_user(self, r: list[tuple[int, bytes]]) -> None:
        self._login_step(r, 1, self._on_login_password)

    def _on_login_password(self, r: list[tuple[int, bytes]]) -> None:
        self._login_step(r, 2, self._on_auth)

    def _login_step(self, r: list[tuple[int, bytes]], line: int,
                    then: Callable[[list[tuple[int, bytes]]], None]) -> None:
        """Answer a 334 challenge with login[line]. The challenges' text is not checked
        (servers vary in case): the order says which is which, as in Postfix's and
        Cyrus SASL's clients."""
        if r[0][0] != 334:
            return self._give_up(f"auth {r[0][0]}")
        assert self.s.auth is not None
        self._write(self.s.auth.login[line])
        self._expect(1, then)

    def _on_auth(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if code != 235:
            return self._give_up(f"auth {code}")
        self._authenticated()
