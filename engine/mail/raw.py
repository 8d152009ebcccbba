"""`raw` content: the whole RFC 5322 message is one template.

The source is split at its first blank line before compiling: the header block and
the body are two templates. In the header block a substitution may not contain a line
break (it would start a new field: header injection), and lines the template leaves
empty (a false `{% if %}` on its own line) are dropped, since the blank line that ends
the header is the one in the source. The rendered message must have a From: field
(RFC 5322 §3.6); Date and Message-ID are added when missing, List-Unsubscribe when
requested (and refused if the message has its own). Line ends become CRLF; a line over
998 octets is refused (RFC 5322 §2.1.1): a raw message is sent as written, so its MIME
encoding is the sender's. `body_8bit` is True: substitutions are only known per
recipient, so any message could hold 8-bit text (`not message.isascii()` tells for one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from engine.mail import mime
from engine.mail.content import CompiledContent, Unsubscribe, date_line, message_id_line
from engine.mail.template import (
    HEADER_ENV,
    TEXT_ENV,
    RenderError,
    TemplateError,
    compile_field,
    has_syntax,
    template_vars,
)

FIELD: Final = "content.raw"
_CRLF: Final = mime.CRLF


class RawContent(CompiledContent):
    body_8bit = True

    def __init__(self, source: str, unsubscribe: Unsubscribe | None) -> None:
        text = source.replace("\r\n", "\n").replace("\r", "\n")
        head, sep, body = text.partition("\n\n")
        if not sep:
            raise TemplateError(FIELD, "no blank line between the header and the body (RFC 5322 §2.1)")
        self._head = compile_field(FIELD, head, env=HEADER_ENV)
        if has_syntax(body):
            # A comment holding the header's lines keeps the body's line numbers in
            # errors those of the whole message, and renders to nothing.
            body = "{#" + "\n" * (head.count("\n") + 2) + "#}" + body
        self._body = compile_field(FIELD, body, env=TEXT_ENV)
        self._unsubscribe = unsubscribe

    def render(self, bindings: Mapping[str, object], *, message_id: str, date: str | None = None) -> bytes:
        variables = template_vars(bindings)
        lines, names = _header_lines(self._head.render(variables))
        if "from" not in names:
            raise RenderError(FIELD, "the message has no From: header field (RFC 5322 §3.6)")
        out: list[str] = []
        if "date" not in names:
            out.append(date_line(date))
        if "message-id" not in names:
            out.append(message_id_line(message_id))
        out.extend(line + _CRLF for line in lines)
        if self._unsubscribe is not None:
            if "list-unsubscribe" in names or "list-unsubscribe-post" in names:
                raise RenderError(FIELD, "has its own List-Unsubscribe and list_unsubscribe is given too")
            out.append(self._unsubscribe.render(variables))
        out.append(_CRLF)
        out.append(_body(self._body.render(variables)))
        return "".join(out).encode("utf-8")


def _too_long(line: str) -> bool:
    return len(line) > mime.MAX_LINE or (len(line) * 4 > mime.MAX_LINE and len(line.encode()) > mime.MAX_LINE)


def _header_lines(head: str) -> tuple[list[str], set[str]]:
    """The header block's non-empty lines, checked, and the lower-cased field names."""
    lines = [line for line in head.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line]
    names: set[str] = set()
    for n, line in enumerate(lines, 1):
        if line[0] in " \t":
            if n == 1:
                raise RenderError(FIELD, "the header starts with a continuation line")
        else:
            name, colon, _ = line.partition(":")
            if not colon or not mime.is_field_name(name):
                raise RenderError(FIELD, f"header line {n} is not 'Name: value': {line[:60]!r}")
            names.add(name.lower())
        if "\0" in line:
            raise RenderError(FIELD, f"header line {n} contains a NUL character")
        if _too_long(line):
            raise RenderError(FIELD, f"header line {n} is longer than {mime.MAX_LINE} octets (RFC 5322 §2.1.1)")
    return lines, names


def _body(body: str) -> str:
    body = mime.normalise_newlines(body)
    if len(body) > mime.MAX_LINE:
        for n, line in enumerate(body.split(_CRLF), 1):
            if _too_long(line):
                raise RenderError(FIELD, f"body line {n} is longer than {mime.MAX_LINE} octets"
                                         " (RFC 5322 §2.1.1): encode that part quoted-printable or base64")
    if "\0" in body:
        raise RenderError(FIELD, "the body contains a NUL character")
    if body and not body.endswith(_CRLF):
        body += _CRLF  # what the SMTP client would add; the stored copy is what is signed
    return body
