"""The text of a DSN's fields (engine/delivery/dsn.py has the theory of operation and
the choices): remote text made safe (controls, non-ASCII), xtext decoding, RFC 5322
folding within 78/998 octets, the Status and Diagnostic-Code values, the returned header
section and the line-clean test that decides whether the original can be embedded. Pure.
"""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime
from email.utils import format_datetime

from engine.smtp.replies import Reply

_STATUS_CLASS = {"failed": "5", "delayed": "4", "delivered": "2", "relayed": "2", "expanded": "2"}

SOFT_WIDTH = 78  # RFC 5322 §2.1.1 SHOULD
HARD_LIMIT = 998  # RFC 5322 §2.1.1 MUST (octets, excluding CRLF)
_CHUNK = 800  # longest unbreakable piece, octets
_MAX_RUN = 64  # longer runs of spaces are shortened, so no line can pass 998

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_SPACE_RUN = re.compile(f" {{{_MAX_RUN + 1},}}")


def _clean(text: str, utf8: bool) -> str:
    """Remote or stored text made safe for a field: controls → space; ASCII unless utf8."""
    text = _CONTROL.sub(" ", text)
    return text if utf8 else _NON_ASCII.sub("?", text)


def _xtext_decode(value: str) -> str | None:
    """RFC 3461 §4 xtext ("+2B" → "+"); None when malformed."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            hexpair = value[i + 1 : i + 3]
            if len(hexpair) != 2 or not all(h in "0123456789ABCDEFabcdef" for h in hexpair):
                return None
            out.append(chr(int(hexpair, 16)))
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _decoded(value: str, utf8: bool) -> str:
    """ENVID / ORCPT address decoded from xtext (RFC 3464 §2.2.1, §2.3.1 show the
    decoded form) when that gives printable text; the stored form otherwise."""
    dec = _xtext_decode(value)
    if dec is None or _CONTROL.search(dec) or (not utf8 and _NON_ASCII.search(dec)):
        return _clean(value, utf8)
    return dec


def _split_long(word: str) -> list[str]:
    """Split a space-free run into pieces of at most _CHUNK octets (whole characters)."""
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for ch in word:
        n = len(ch.encode("utf-8"))
        if size + n > _CHUNK:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    pieces.append("".join(cur))
    return pieces


def _field(name: str, value: str) -> list[str]:
    """ "Name: value" folded before spaces (RFC 5322 §2.2.3) into lines ≤ 78 octets
    where the text allows and ≤ 998 always; no line is whitespace only. Trailing
    spaces are dropped and runs over 64 spaces shortened to 64 (a bound on the line)."""
    lines: list[str] = []
    cur = f"{name}:"
    first = True
    value = _SPACE_RUN.sub(" " * _MAX_RUN, value.rstrip(" "))
    for word in value.split(" "):
        for piece in _split_long(word) if len(word.encode("utf-8")) > _CHUNK else [word]:
            add = " " + piece
            width = len(cur.encode("utf-8")) + len(add.encode("utf-8"))
            if piece and not first and width > SOFT_WIDTH:
                lines.append(cur)
                cur = add
            else:
                cur += add
            first = False
    lines.append(cur)
    return lines


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, tz=UTC))


def _addr_type(address: str) -> str:
    return "utf-8" if _NON_ASCII.search(address) else "rfc822"


def _status(reply: Reply, action: str) -> str:
    """RFC 3464 §2.3.4 Status: the reply's enhanced code, its class made to match the
    action (a failed recipient with a 4.4.7 is reported 5.4.7)."""
    status = reply.enhanced if _ENHANCED.fullmatch(reply.enhanced) else f"{reply.code // 100}.0.0"
    if not _ENHANCED.fullmatch(status):
        status = "4.0.0"
    return _STATUS_CLASS[action] + status[1:]


def _diagnostic(reply: Reply) -> str:
    """RFC 3464 §2.3.6: "smtp; " + the reply as received (lines joined by spaces)."""
    text = " ".join(reply.lines)
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else f"{reply.code}"
    return f"smtp; {head} {text}" if text else f"smtp; {head}"


def _headers_of(original: bytes) -> bytes:
    """The header section: `original` up to the first empty line, CRLF-normalised,
    each line ≤ 998 octets (longer lines, impossible after inbound checks, are split
    by CRLF SP)."""
    if original.startswith(b"\r\n"):
        return b""
    end = original.find(b"\r\n\r\n")
    head = original if end < 0 else original[: end + 2]
    out: list[bytes] = []
    for line in _LINE_BREAK.split(head):
        while len(line) > HARD_LIMIT:
            out.append(line[:HARD_LIMIT])
            line = b" " + line[HARD_LIMIT:]
        out.append(line)
    if out and out[-1] == b"":
        out.pop()
    return b"".join(x + b"\r\n" for x in out)


def _line_clean(data: bytes) -> bool:
    """Only CRLF line ends and no line over 998 octets (safe to embed verbatim, P5)."""
    rest = data.replace(b"\r\n", b"")
    if b"\r" in rest or b"\n" in rest:
        return False
    return all(len(x) <= HARD_LIMIT for x in data.split(b"\r\n"))


def _wrap(text: str, indent: str = "") -> list[str]:
    """Human-readable lines ≤ 76 characters (long words broken)."""
    return textwrap.wrap(text, width=76, subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False) or [""]
