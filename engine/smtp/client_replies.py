"""Client side: server reply bytes → `RemoteReply` values (bounded, split-proof), and
the EHLO reply → `Capabilities`.

RFC 5321 §4.2:
    Greeting   = ...
    Reply-line = *( Reply-code "-" [ textstring ] CRLF )
                    Reply-code [ SP textstring ] CRLF
    Reply-code = %x32-35 %x30-35 %x30-39

The parser is fed whatever a read delivered (`feed`) and hands out complete replies one
at a time (`next_reply`), so the delivery adapter can match pipelined replies in order no
matter how the server's writes were split or coalesced: feeding one byte at a time gives
the same replies as feeding everything at once (a hypothesis test checks it).

Every malformation raises `ClientProtocolError`, whose Reply is a temporary failure
(451 4.5.0): a server that cannot speak SMTP is not a reason to bounce mail. The error
is sticky: once raised, every later `next_reply` raises it again, because nothing after
a framing error can be matched to a command.

Liberal where it costs nothing (be liberal in what you accept): a line may end with a bare
LF (Postfix's smtp client accepts that too), and the last line may be the bare code
("250" with no SP), which the ABNF allows.
"""

from __future__ import annotations

import re
from typing import Final, NoReturn

import msgspec

from engine.smtp.replies import Reply

# RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets with its CRLF; real servers
# exceed it (long EHLO keyword lists, verbose rejection texts), so allow four times that.
MAX_REPLY_LINE: Final = 2048
# No RFC limit on lines per reply; an EHLO answer has about 15. Bound the buffer anyway.
MAX_REPLY_LINES: Final = 100

# RFC 3463 §2 / RFC 2034: status-code = class "." subject "." detail, where
# class = "2" / "4" / "5" and subject, detail = 1*3digit.
# Matched as the first token of a line's text (followed by SP or the line's end).
_ENHANCED = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |\Z)")
# RFC 5321 §4.2: Reply-code [ SP / "-" ] at the start of every line; the second and third
# digits are not range-checked (servers send odd codes; the first digit decides).
_CODE = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\Z)")


class RemoteReply(Reply, frozen=True):
    """A Reply as the server sent it.

    `text` holds the lines with the code, separator and (if present) the enhanced code
    removed; `raw` holds every line verbatim without its line ending, for the delivery
    log and the DSN's Diagnostic-Code (RFC 3464 §2.3.6: the remote reply text verbatim).
    Octets that are not UTF-8 are kept as backslash escapes.
    """

    raw: tuple[str, ...] = ()


class ClientProtocolError(Exception):
    """The server broke SMTP framing or sequencing; `reply` is what its recipients get.

    A remote fault, so the reply is transient: the delivery code defers the recipients
    and closes the connection (nothing later on it can be trusted).
    """

    def __init__(self, reply: Reply, detail: str | None = None) -> None:
        super().__init__(detail or reply.lines[0])
        self.reply = reply if detail is None else reply.with_text(detail)


R451_MALFORMED_REPLY: Final = Reply(451, "4.5.0", "Malformed reply from remote server")
R451_REPLY_TOO_LONG: Final = Reply(451, "4.5.0", "Remote server reply line too long")
R451_TOO_MANY_LINES: Final = Reply(451, "4.5.0", "Remote server reply has too many lines")
R451_MIXED_CODES: Final = Reply(451, "4.5.0", "Remote server reply changes code between lines")


def _decode(octets: bytes | bytearray) -> str:
    return octets.decode("utf-8", "backslashreplace")


class ReplyParser:
    """Incremental RFC 5321 reply parser. Not thread-safe; one per connection.

    After STARTTLS the adapter must check `buffered == 0` once the 220 is parsed (bytes
    after it were injected in plaintext: the "NO STARTTLS" response-injection attacks)
    and start a new parser on the TLS stream.
    """

    __slots__ = ("_buf", "_code", "_error", "_lines", "_partial", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed line
        self._lines: list[bytearray] = []  # completed lines of the reply being read
        self._partial = 0  # wire octets of those lines
        self._code = 0
        self._error: ClientProtocolError | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes from the server. Never raises; problems surface in `next_reply`."""
        if self._pos and (self._pos == len(self._buf) or self._pos > 65536):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets received but not yet part of a returned reply."""
        return len(self._buf) - self._pos + self._partial

    def next_reply(self) -> RemoteReply | None:
        """The next complete reply, or None until more bytes arrive.

        Raises ClientProtocolError (sticky) for a line over MAX_REPLY_LINE octets, a reply
        over MAX_REPLY_LINES lines, a line not starting with a 2xx-5xx code followed by
        SP, "-" or the line end, or a continuation line whose code differs.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        lines = self._lines
        while True:
            start = self._pos
            end = buf.find(b"\n", start)
            if end < 0:
                # Fail as soon as the line is certainly too long, so a server cannot make
                # us buffer without bound; the same verdict as when its LF arrives.
                if len(buf) - start >= MAX_REPLY_LINE:
                    self._fail(R451_REPLY_TOO_LONG)
                return None
            if end + 1 - start > MAX_REPLY_LINE:
                self._fail(R451_REPLY_TOO_LONG)
            self._pos = end + 1
            stop = end - 1 if end > start and buf[end - 1] == 13 else end
            if _CODE.match(buf, start, stop) is None:
                self._fail(R451_MALFORMED_REPLY)
            code = buf[start] * 100 + buf[start + 1] * 10 + buf[start + 2] - 5328  # 48 * 111
            if lines and code != self._code:
                self._fail(R451_MIXED_CODES)
            self._code = code
            lines.append(buf[start:stop])
            if len(lines) > MAX_REPLY_LINES:
                self._fail(R451_TOO_MANY_LINES)
            if stop == start + 3 or buf[start + 3] == 32:  # SP or the bare code: last line
                self._lines = []
                self._partial = 0
                return _build(code, lines)
            self._partial += end + 1 - start

    def _fail(self, reply: Reply) -> NoReturn:
        self._error = ClientProtocolError(reply)
        raise self._error


def _build(code: int, lines: list[bytearray]) -> RemoteReply:
    raw_first = _decode(lines[0])
    first = raw_first[4:]
    m = _ENHANCED.match(first)
    enhanced = m.group(1) if m else ""
    if m:
        first = first[m.end() :]
    if len(lines) == 1:  # the common case
        return RemoteReply(code, enhanced, first, raw=(raw_first,))
    raw = (raw_first, *[_decode(line) for line in lines[1:]])
    texts = [first]
    for line in raw[1:]:
        text = line[4:]
        # RFC 2034: every line carries the code; strip it wherever it is the same as
        # on the first line (KumoMTA does the same), keep any other token as text.
        if enhanced:
            m = _ENHANCED.match(text)
            if m and m.group(1) == enhanced:
                text = text[m.end() :]
        texts.append(text)
    return RemoteReply(code, enhanced, tuple(texts), raw=raw)


# --- EHLO ------------------------------------------------------------------------
class Capabilities(msgspec.Struct, frozen=True):
    """What the server's EHLO reply offers (RFC 5321 §4.1.1.1). The default is HELO's: none."""

    pipelining: bool = False  # RFC 2920
    size: int | None = None  # RFC 1870: None = not offered, 0 = offered, no fixed maximum
    chunking: bool = False  # RFC 3030
    smtputf8: bool = False  # RFC 6531
    eightbitmime: bool = False  # RFC 6152
    starttls: bool = False  # RFC 3207
    dsn: bool = False  # RFC 3461
    enhancedstatuscodes: bool = False  # RFC 2034
    auth: frozenset[str] = frozenset()  # RFC 4954 SASL mechanisms, upper-case


def parse_ehlo(reply: Reply) -> Capabilities:
    """Capabilities from a 250 reply to EHLO.

    RFC 5321 §4.1.1.1: the first line greets, each further line is
    `ehlo-keyword *( SP ehlo-param )`. Keywords are case-insensitive; unknown ones are
    ignored. "AUTH=…" (a pre-RFC 4954 form some servers still send) counts as AUTH.

    Raises ValueError if `reply` is not a 250 (the caller falls back to HELO).
    """
    if reply.code != 250:
        raise ValueError(f"EHLO was refused with {reply.code}")
    keywords: set[str] = set()
    size: int | None = None
    mechanisms: set[str] = set()
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        key = keyword.upper()
        if key == "SIZE":
            value = params.strip()
            # A missing or unreadable limit is treated as "no fixed maximum".
            size = int(value) if value.isdigit() and value.isascii() and len(value) <= 20 else 0
        elif key == "AUTH" or key.startswith("AUTH="):
            mechanisms.update(m.upper() for m in (key[5:] + " " + params).split() if m)
        else:
            keywords.add(key)
    return Capabilities(
        pipelining="PIPELINING" in keywords,
        size=size,
        chunking="CHUNKING" in keywords,
        smtputf8="SMTPUTF8" in keywords,
        eightbitmime="8BITMIME" in keywords,
        starttls="STARTTLS" in keywords,
        dsn="DSN" in keywords,
        enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
        auth=frozenset(mechanisms),
    )
