"""`volley blast --auth`: SMTP AUTH (RFC 4954) once per connection, PLAIN or LOGIN.

PLAIN (RFC 4616) goes in one line with an initial response; LOGIN (the de-facto
mechanism, draft-murchison-sasl-login) answers the server's two 334 challenges
("Username:", "Password:") with the base64 user name and password. The mechanism is
picked from the EHLO reply's AUTH list: PLAIN when offered (one round trip), else
LOGIN, unless `--auth-mech` forces one. A connection whose AUTH is not offered or is
refused sends no message; the run counts why under errors ("auth 535", ...).

The lines are built once per run, here; the exchange itself is `auth_steps.AuthSteps`,
a mixin of the per-connection state machine.
"""

from __future__ import annotations

__all__ = ["MECHANISMS", "BlastAuth", "offered_mechanisms"]

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
