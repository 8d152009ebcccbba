"""`volley blast --auth`: SMTP AUTH (RFC 4954) once per connection, PLAIN or LOGIN.

PLAIN (RFC 4616) goes in one line with an initial response; LOGIN (the de-facto
mechanism, draft-murchison-sasl-login) answers the server's two 334 challenges
("Username:", "Password:") with the base64 user name and password. The mechanism is
picked from the EHLO reply's AUTH list: PLAIN when offered (one round trip), else
LOGIN, unless `--auth-mech` forces one. A connection whose AUTH is not offered or is
refused sends no message; the run counts why under errors ("auth 535", ...).

The lines are built once per run; the steps are a mixin of the per-connection state
machine (engine.lab.blast.protocol), kept here so that module stays about messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from engine.lab.blast.shared import Shared

__all__ = ["MECHANISMS", "AuthSteps", "BlastAuth", "offered_mechanisms"]

MECHANISMS = ("plain", "login")  # what --auth-mech takes; automatic order: PLAIN first


def offered_mechanisms(ehlo: bytes) -> frozenset[bytes]:
    """The SASL mechanisms in an EHLO reply (all its lines, "250-" prefixes included),
    upper-case. Also reads the pre-RFC 4954 "AUTH=LOGIN" form some servers still send."""
    found: set[bytes] = set()
    for line in ehlo.upper().split(b"\r\n"):
        words = line[4:].replace(b"=", b" ", 1).split()
        if words and words[0] == b"AUTH":
            found.update(words[1:])
    return frozenset(found)


class BlastAuth:
    """Credentials as wire lines (built once per run) and the choice of mechanism."""

    __slots__ = ("plain", "login", "forced")

    def __init__(self, credentials: str, mechanism: str = "") -> None:
        # (Imported here: `volley --help` loads this module for MECHANISMS, not the client.)
        from engine.smtp.client_wire import auth_login, auth_plain

        user, sep, password = credentials.partition(":")
        if not sep or not user:
            raise ValueError("auth must be user:password")
        if mechanism and mechanism.lower() not in MECHANISMS:
            raise ValueError(f"auth_mech must be one of {', '.join(MECHANISMS)} (or empty: automatic)")
        self.plain = auth_plain(user, password)  # (ValueError for a NUL in either)
        self.login = auth_login(user, password)  # command, user line, password line
        self.forced = mechanism.upper().encode()

    def choose(self, ehlo: bytes) -> tuple[bytes, str]:
        """(b"PLAIN" or b"LOGIN", "") for this EHLO reply, or (b"", why not)."""
        offered = offered_mechanisms(ehlo)
        if self.forced:
            if self.forced in offered:
                return self.forced, ""
            return b"", f"AUTH {self.forced.decode()} not offered"
        for mech in (b"PLAIN", b"LOGIN"):
            if mech in offered:
                return mech, ""
        return b"", "AUTH PLAIN/LOGIN not offered" if offered else "AUTH not offered"


class AuthSteps:
    """BlastConnection's AUTH steps: after the (last) EHLO, before the first message."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by BlastConnection
        s: Shared
        authed: bool

        def _write(self, data: bytes) -> None: ...
        def _expect(self, n: int, handler: Callable[[list[tuple[int, bytes]]], None]) -> None: ...
        def _give_up(self, kind: str) -> None: ...
        def _next_message(self) -> None: ...

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
        self.authed = True
        self._next_message()
