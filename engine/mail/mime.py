"""The pieces of an RFC 5322 / MIME message that composition builds by hand.

The `email` package's generator costs far more than rendering a template, so the
message is assembled from strings here. RFC 2047 encoded words are written here too
(email.header.Header loses characters such as form feeds); the package is used only
for address lists with non-ASCII names typed
into a custom header (To, Cc), which need its address parser. Every function returns text with
CRLF line ends (RFC 5322 §2.1) and no line over 998 octets (§2.1.1); a value that
cannot be made so raises ValueError with the problem, for the caller to name the field.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.parse
from email import policy
from typing import Final

CRLF: Final = "\r\n"
MAX_LINE: Final = 998  # octets, without the CRLF (RFC 5322 §2.1.1)
_FOLD_AT: Final = 76   # encoded words and base64 lines (RFC 2047 §2, RFC 2045 §6.8)

# RFC 5322 §3.6.8: a field name is printable US-ASCII except ":".
_FTEXT_NAME: Final = re.compile(r"[!-9;-~]+")
# RFC 2045 §5.1 token / token, the characters a media type may use.
_MEDIA_TYPE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+/[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# A filename that fits in a quoted-string as is (RFC 2045 §5.1): printable ASCII but " and \.
_PLAIN_FILENAME: Final = re.compile(r"[ !#-\[\]-~]+")
# Atoms separated by single spaces: a display name written as is (RFC 5322 §3.2.5).
_PHRASE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_ADDRESS_BAD: Final = re.compile(r"[\s<>(),;:\"\\\x00-\x1f\x7f]")

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: list[object] = [-1, ""]


def is_field_name(name: str) -> bool:
    return _FTEXT_NAME.fullmatch(name) is not None


def is_media_type(value: str) -> bool:
    return _MEDIA_TYPE.fullmatch(value) is not None


def date_now() -> str:
    """RFC 5322 §3.3 date-time in UTC for now; computed once per second."""
    second = int(time.time())
    if _date_cache[0] != second:
        t = time.gmtime(second)
        _date_cache[1] = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year}"
                          f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
        _date_cache[0] = second
    return str(_date_cache[1])


def check_value(value: str) -> None:
    """A header value must not carry its own line ends: they would start a new field
    (header injection: "x\\r\\nBcc: ..."). NUL is never allowed in a message."""
    if "\r" in value or "\n" in value:
        raise ValueError("contains a line break, which would start a new header field")
    if "\0" in value:
        raise ValueError("contains a NUL character")


def unstructured(name: str, value: str) -> str:
    """`Name: value` CRLF for an unstructured field (Subject, X-*). Printable ASCII that
    fits is written as is; anything else becomes RFC 2047 encoded words, one per line."""
    check_value(value)
    if (value.isascii() and value.isprintable() and "=?" not in value and value == value.strip()
            and len(name) + 2 + len(value) <= MAX_LINE):
        return f"{name}: {value}{CRLF}" if value else f"{name}:{CRLF}"
    return f"{name}: {encoded_words(value)}{CRLF}"


def encoded_words(value: str) -> str:
    """`value` as RFC 2047 "B" encoded words of at most 72 characters (§2 allows 75),
    folded one per line. Every character, whitespace and controls included, survives:
    the whitespace between adjacent encoded words is not part of the text (§6.2).
    (email.header.Header drops form feeds and other characters str.splitlines breaks at.)"""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for ch in value:
        n = len(ch.encode("utf-8"))
        if size + n > 45:  # 45 octets are 60 base64 characters
            words.append(_b_word("".join(chunk)))
            chunk, size = [], 0
        chunk.append(ch)
        size += n
    if chunk or not words:
        words.append(_b_word("".join(chunk)))
    return (CRLF + " ").join(words)


def _b_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def address_list(name: str, value: str) -> str:
    """A custom address field (To, Cc) given as text. Non-ASCII display names need the
    address parser to encode only the phrases, so the `email` header registry does it."""
    check_value(value)
    if value.isascii() and len(name) + 2 + len(value) <= MAX_LINE:
        return f"{name}: {value}{CRLF}"
    folded = policy.SMTP.header_factory(name, value).fold(policy=policy.SMTP)
    return str(folded)


def parse_mailbox(value: str) -> tuple[str, str]:
    """("Display Name", "local@domain") of "Name <local@domain>" or "local@domain"."""
    check_value(value)
    value = value.strip()
    display = ""
    if value.endswith(">") and "<" in value:
        cut = value.rindex("<")
        display, value = value[:cut].strip(), value[cut + 1:-1].strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = re.sub(r"\\(.)", r"\1", display[1:-1])
    check_address(value)
    return display, value


def check_address(address: str) -> None:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or _ADDRESS_BAD.search(address):
        raise ValueError(f"{address!r} is not an email address (local@domain)")


def mailbox(name: str, display: str, address: str) -> str:
    """`Name: "Display" <address>` CRLF. A display name that is not printable ASCII
    becomes encoded words (RFC 2047 §5(3)). An internationalised address stays UTF-8
    (RFC 6532; it needs SMTPUTF8 anyway)."""
    if not display:
        line = f"{name}: {address}"
    elif _PHRASE.fullmatch(display) and "=?" not in display:
        line = f"{name}: {display} <{address}>"
    elif display.isascii() and display.isprintable() and "=?" not in display:
        quoted = display.replace("\\", "\\\\").replace('"', '\\"')
        line = f'{name}: "{quoted}" <{address}>'
    else:
        line = f"{name}: {encoded_words(display)} <{address}>"
    if len(line) > MAX_LINE and display:  # a very long name: encoded words fold it
        line = f"{name}: {encoded_words(display)} <{address}>"
    if len(line) > MAX_LINE and any(len(x.encode()) > MAX_LINE for x in line.split(CRLF)):
        raise ValueError(f"longer than {MAX_LINE} octets")
    return line + CRLF


def text_body(text: str, boundary: str) -> tuple[str, str]:
    """(Content-Transfer-Encoding, body with CRLF line ends) for one text part.

    7bit when the text is ASCII with lines of at most 998 octets (RFC 5322 §2.1.1) and
    without the multipart boundary; otherwise quoted-printable (RFC 2045 §6.7), whose
    lines are at most 76 and which can never contain the boundary (it starts with "=_",
    and QP writes "=" as "=3D")."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if (text.isascii() and "\0" not in text and boundary not in text
            and (len(text) <= MAX_LINE or max(map(len, text.split("\n"))) <= MAX_LINE)):
        return "7bit", text.replace("\n", CRLF)
    encoded = binascii.b2a_qp(text.encode("utf-8"), quotetabs=False, istext=True, header=False)
    return "quoted-printable", encoded.decode("ascii").replace("\n", CRLF)


def normalise_newlines(text: str) -> str:
    """Every line end as CRLF, whatever the template used (JSON strings carry "\\n")."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", CRLF)


def attachment_part(filename: str, content_type: str, data: bytes) -> str:
    """A whole attachment body part (headers, blank line, base64 in 76-column lines)."""
    name_params = _filename_params("filename", filename)
    type_params = _filename_params("name", filename)
    encoded = base64.encodebytes(data).decode("ascii").replace("\n", CRLF)
    return (f"Content-Type: {content_type};{type_params}{CRLF}"
            f"Content-Disposition: attachment;{name_params}{CRLF}"
            f"Content-Transfer-Encoding: base64{CRLF}{CRLF}{encoded}")


def _filename_params(param: str, filename: str) -> str:
    """`filename="a.pdf"`, or RFC 2231 `filename*=utf-8''...` for other names, split into
    numbered continuations (§3) so no line is long; each starts a folded line."""
    if _PLAIN_FILENAME.fullmatch(filename) and len(filename) <= 50:
        return f'{CRLF} {param}="{filename}"'
    quoted = urllib.parse.quote(filename, safe="", encoding="utf-8")
    if len(quoted) <= 50:
        return f"{CRLF} {param}*=utf-8''{quoted}"
    pieces, i = [], 0
    while i < len(quoted):
        end = min(i + 50, len(quoted))
        # never split a %XX escape
        while end < len(quoted) and "%" in quoted[end - 2:end]:
            end -= 1
        pieces.append(quoted[i:end])
        i = end
    first = f"{CRLF} {param}*0*=utf-8''{pieces[0]}"
    return first + "".join(f";{CRLF} {param}*{n}*={piece}" for n, piece in enumerate(pieces[1:], 1))
