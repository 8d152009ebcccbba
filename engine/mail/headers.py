"""The header section of a stored message, read without a per-byte Python loop.

A message as Volley stores it has CRLF line ends (RFC 5321 §2.3.8). `split_message`
finds the end of the header section with one `bytes.find` and cuts it into fields with
one regex split: a field ends at a CRLF not followed by WSP (folding, RFC 5322 §2.2.3).
Everything stays bytes: 8-bit and UTF-8 header text (RFC 6532) passes through as is.

    fields, body_at = split_message(message)
    last_field(fields, "subject")       # b" Hello" (the raw value, folding kept)
    from_domain(fields)                 # "example.com" or None
"""

from __future__ import annotations

import re
from typing import NamedTuple

# A field ends at a CRLF that does not start a continuation line.
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
_UNFOLD = re.compile(rb"\r\n(?=[ \t])")
# Quoted strings and (non-nested) comments hide '@' and '<' that are not an address.
_QUOTED = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)", re.S)
_ANGLE = re.compile(rb"<([^<>]*)>")
_DOMAIN_OF = re.compile(rb"@([^\s@<>,;:\"()\[\]]+|\[[^\]]*\])")


class Field(NamedTuple):
    """One header field: `name` lower-cased for lookups, `raw` the whole field as
    written (name, colon, value, folding) without its final CRLF."""

    name: str
    raw: bytes

    @property
    def value(self) -> bytes:
        """What follows the colon, folding kept."""
        return self.raw[self.raw.find(b":") + 1:]


def header_end(message: bytes) -> tuple[int, int]:
    """(end of the header section, start of the body). A message beginning with CRLF
    has no header; one without an empty line is all header and an empty body."""
    if message.startswith(b"\r\n"):
        return 0, 2
    at = message.find(b"\r\n\r\n")
    if at < 0:
        end = len(message) - 2 if message.endswith(b"\r\n") else len(message)
        return end, len(message)
    return at, at + 4


def split_message(message: bytes) -> tuple[list[Field], int]:
    """(header fields in order, offset of the body in `message`)."""
    end, body_at = header_end(message)
    if end == 0:
        return [], body_at
    fields = []
    for raw in _FIELD_END.split(message[:end]):
        colon = raw.find(b":")
        # A line without a colon is not a field (RFC 5322 §2.2); it keeps an empty
        # name so that it is carried along but never matches a lookup.
        name = raw[:colon].strip(b" \t").decode("ascii", "replace").lower() if colon > 0 else ""
        fields.append(Field(name, raw))
    return fields, body_at


def unfold(value: bytes) -> bytes:
    """The value with its folding CRLFs removed (RFC 5322 §2.2.3); the WSP stays."""
    return _UNFOLD.sub(b"", value) if b"\r\n" in value else value


def all_fields(fields: list[Field], name: str) -> list[Field]:
    """Every field called `name` (any case), in message order."""
    key = name.lower()
    return [f for f in fields if f.name == key]


def last_field(fields: list[Field], name: str) -> bytes | None:
    """The raw value of the last field called `name`, or None."""
    key = name.lower()
    for f in reversed(fields):
        if f.name == key:
            return f.value
    return None


def address_domains(value: bytes) -> list[str]:
    """The domain of every address in an address-list value (From:, To:, ...),
    lower-cased, trailing dot dropped; a UTF-8 domain (RFC 6532) becomes its A-label
    form (RFC 5890) so it compares with configured ASCII domains."""
    text = _COMMENT.sub(b" ", _QUOTED.sub(b'""', unfold(value)))
    angles = _ANGLE.findall(text)
    if angles:
        # Only the angle-addrs: a display name's bare "@" is not an address.
        text = b" ".join(angles)
    domains = []
    for raw in _DOMAIN_OF.findall(text):
        domains.append(_a_label(raw.rstrip(b".")))
    return domains


def _a_label(raw: bytes) -> str:
    if raw.isascii():
        return raw.decode("ascii").lower()
    try:
        return raw.decode("utf-8").encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return raw.decode("utf-8", "replace").lower()  # will align with no ASCII domain


def from_domain(fields: list[Field]) -> str | None:
    """The one domain of the author (RFC 5322 §3.6.2 From:), or None when there is no
    From:, several From: fields, or mailboxes of different domains: a message whose
    author domain is not one name has no domain a signature can align with (RFC 7489 §6.6.1)."""
    froms = all_fields(fields, "from")
    if len(froms) != 1:
        return None
    domains = set(address_domains(froms[0].value))
    return domains.pop() if len(domains) == 1 else None
