"""SMTP replies: the value type, the catalogue named by code, and wire formatting.

Every reply carries an enhanced status code (RFC 2034, codes from RFC 3463), so the
catalogue names each by its basic code: a test checks that each name matches its code.
"""

from __future__ import annotations

import msgspec


class Reply(msgspec.Struct, frozen=True):
    code: int
    enhanced: str  # "2.0.0"; "" only for the greeting and 334 challenges (RFC 2034 §3)
    text: str | tuple[str, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    def to_bytes(self) -> bytes:
        # Catalogue replies are formatted once at import; only replies built at run
        # time (queue ids, capabilities) are formatted per use.
        wire = _WIRE.get(id(self))
        return wire if wire is not None else format_reply(self)

    def with_text(self, text: str | tuple[str, ...]) -> Reply:
        return Reply(self.code, self.enhanced, text)


def format_reply(reply: Reply) -> bytes:
    """RFC 5321 4.2.1: every line but the last is "code-text", the last "code text"."""
    text = reply.text
    if type(text) is str:  # one line: the run-time replies of the hot path (queue ids)
        if reply.enhanced:
            return f"{reply.code} {reply.enhanced} {text}\r\n".encode()
        return f"{reply.code} {text}\r\n".encode()
    lines = reply.lines
    prefix = f"{reply.code}"
    enh = f"{reply.enhanced} " if reply.enhanced else ""
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        sep = " " if i == last else "-"
        out.append(f"{prefix}{sep}{enh}{line}\r\n")
    return "".join(out).encode("utf-8")


# --- the catalogue -----------------------------------------------------------------
# HELP lists what this session offers (engine/smtp/sequence.py help_reply): these are the
# commands every session takes; BDAT, STARTTLS and AUTH join them once EHLO offered them.
R214_HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
R220_READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
R221_BYE = Reply(221, "2.0.0", "Bye")
R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R250_OK = Reply(250, "2.0.0", "OK")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_RESET = Reply(250, "2.0.0", "Reset OK")
R252_CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
R334_EMPTY = Reply(334, "", "")
R354_START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
R421_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
R421_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
R421_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
R421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
R421_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
R421_AUTH_BLOCKED = Reply(421, "4.7.0", "Too many authentication failures from your address, try later")
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
R452_QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
R452_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
R454_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
R500_UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
R500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R500_BAD_BYTES = Reply(500, "5.5.2", "Command contains NUL, bare CR or LF, or 8-bit bytes")
# RFC 6531 §3.7.4.1 with RFC 5248's X.6.7: a UTF-8 mailbox outside an SMTPUTF8 transaction.
R553_NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address needs MAIL FROM with SMTPUTF8")
R501_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R501_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
R501_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
R502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
R503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R503_ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
R503_NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
R503_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R503_BDAT_OPEN = Reply(503, "5.5.1", "BDAT transaction in progress: send BDAT LAST or RSET first")
R503_NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
R504_AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R530_TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R538_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
R550_BARE_LINE_ENDING = Reply(550, "5.6.0", "Message refused: bare CR or LF; lines must end with CRLF")
R550_DATA_LINE_TOO_LONG = Reply(550, "5.5.2", "Message refused: line longer than 1000 octets")
R554_RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
R552_MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
R553_BAD_ADDRESS = Reply(553, "5.1.3", "Bad address syntax")
R553_UTF8_NOT_ALLOWED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
R554_NO_VALID_RCPTS = Reply(554, "5.5.1", "No valid recipients: need an accepted RCPT command first")
R554_TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop suspected")
R554_PREGREET = Reply(554, "5.5.1", "Protocol error: you talked before the greeting")
# RFC 5321 §4.1.1.11 / RFC 1869 §6: the reply names the parameter ("MAIL FROM parameter
# FOO not recognized"): commands.py fills in the verb and the keyword.
R555_UNKNOWN_PARAM = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameter not recognized or not implemented")


# id() is a safe key: catalogue replies live as long as the module, so no other live
# object can share their id.
_WIRE: dict[int, bytes] = {}
_WIRE.update(
    {id(v): format_reply(v) for k, v in dict(globals()).items() if k[:1] == "R" and isinstance(v, Reply)}
)
