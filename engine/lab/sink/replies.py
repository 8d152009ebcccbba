"""The replies a sink gives when no script replaces them (protocol.py has the theory of
operation): the default answer to each command from the connection's state, and the
optional smarthost mode's AUTH PLAIN rules on top of it.

`SinkReplies` is the part of `SinkProtocol` that decides them; the attributes it declares
are the connection's own, set up by `SinkProtocol.__init__`.
"""

from __future__ import annotations

import base64
import re
import ssl

from engine.lab.sink.state import Sink

_BDAT = re.compile(r"(?i)^\d+(?: +LAST)? *$")  # RFC 3030 §3: BDAT <size> [LAST]


class SinkReplies:
    """The default reply to one command, from the connection's state (no I/O)."""

    sink: Sink
    auth: dict[str, str] | None
    authed: bool
    pipelining: bool
    chunking: bool
    tls_ctx: ssl.SSLContext | None
    tls: bool
    mail_from: str | None
    rcpts: list[str]

    def _auth_default(self, verb: str, arg: str, default: str) -> str:
        # The optional smarthost mode: AUTH PLAIN with an initial response, TLS only.
        assert self.auth is not None
        if verb == "EHLO" and self.tls:
            return default.replace("250 ", "250-AUTH PLAIN\r\n250 ", 1) if "\r\n" in default \
                else default
        if verb == "AUTH":
            if not self.tls:
                return "538 5.7.11 encryption required"
            mech, _, initial = arg.partition(" ")
            if mech.upper() != "PLAIN" or not initial:
                return "504 5.5.4 only AUTH PLAIN with an initial response"
            try:
                _, user, password = base64.b64decode(initial).decode().split("\0")
            except ValueError:
                return "501 5.5.2 bad response"
            if self.auth.get(user) != password:
                return "535 5.7.8 authentication failed"
            self.authed = True
            self.sink.auth_users.append(user)
            return "235 2.7.0 ok"
        if verb == "MAIL" and not self.authed:
            return "530 5.7.0 authentication required"
        return default

    def _default(self, verb: str, arg: str, addr: re.Match[str] | None) -> str:
        if verb == "MAIL":
            return "250 2.1.0 ok" if addr else "501 5.5.4 syntax: MAIL FROM:<address>"
        if verb == "RCPT":
            if self.mail_from is None:
                return "503 5.5.1 MAIL first"
            return "250 2.1.5 ok" if addr else "501 5.5.4 syntax: RCPT TO:<address>"
        if verb == "DATA":
            if self.mail_from is None or not self.rcpts:
                return "554 5.5.1 no valid recipients" if self.mail_from else "503 5.5.1 MAIL first"
            return "354 end with <CRLF>.<CRLF>"
        if verb == "EHLO":
            ext = ["8BITMIME", "SIZE 104857600"]
            if self.pipelining:
                ext.append("PIPELINING")
            if self.chunking:
                ext.append("CHUNKING")
            if self.tls_ctx is not None and not self.tls:
                ext.append("STARTTLS")
            return "\r\n".join(["250-sink.test"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"])
        if verb == "HELO":
            return "250 sink.test"
        if verb == "BDAT":
            if not self.chunking:
                return "502 5.5.1 not supported"
            if not _BDAT.match(arg):
                return "501 5.5.4 syntax: BDAT size [LAST]"
            return "250 2.0.0 ok" if self.rcpts else "503 5.5.1 RCPT first"
        if verb in ("RSET", "NOOP"):
            return "250 2.0.0 ok"
        if verb == "QUIT":
            return "221 2.0.0 bye"
        if verb == "STARTTLS":
            if self.tls_ctx is None or self.tls:
                return "502 5.5.1 not available"
            return "220 2.0.0 go ahead"
        return "500 5.5.2 unknown command"
