"""What both kinds of compiled content share: the CompiledContent interface, the
Date and Message-ID lines, and List-Unsubscribe (RFC 2369) with one-click (RFC 8058).

One-click: List-Unsubscribe-Post: List-Unsubscribe=One-Click is added exactly when an
https URL is given (RFC 8058 §3.1 requires one). Every `url` is therefore required to
start with a literal "https://", checked when compiled; `mailto` with "mailto:". Both
are templates, so a URL can carry `{{ email|urlencode }}` or a token; a rendered URI
with spaces, angle brackets, quotes or non-ASCII is refused (urlencode them).
RFC 8058 §4 also asks for a DKIM signature covering both fields: the signer's headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from engine.mail import mime
from engine.mail.mime import CRLF
from engine.mail.template import TEXT_ENV, FieldTemplate, RenderError, TemplateError, compile_field

_URI_BAD: Final = re.compile(r"[\s<>\"\x00-\x1f\x7f-\U0010ffff]")
_MESSAGE_ID: Final = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
POST_LINE: Final = "List-Unsubscribe-Post: List-Unsubscribe=One-Click" + CRLF


class CompiledContent:
    """A request's content, compiled once; `render` once per recipient."""

    body_8bit: bool = False  # whether rendered messages can hold 8-bit text (record body_type)

    def render(self, bindings: Mapping[str, object], *, message_id: str, date: str | None = None) -> bytes:
        """One recipient's whole message (CRLF line ends). `bindings` holds the merged
        substitutions with `email` and `name` (template.merge_bindings); `message_id`
        comes with its angle brackets; `date` defaults to now. Raises RenderError."""
        raise NotImplementedError


class ListUnsubscribe(msgspec.Struct, forbid_unknown_fields=True):
    url: str | None = None
    mailto: str | None = None


def date_line(date: str | None) -> str:
    if date is None:
        return f"Date: {mime.date_now()}{CRLF}"
    if "\r" in date or "\n" in date:
        raise RenderError("date", "contains a line break")
    return f"Date: {date}{CRLF}"


def message_id_line(message_id: str) -> str:
    if _MESSAGE_ID.fullmatch(message_id) is None:
        raise RenderError("message_id", f"{message_id!r} is not <id-left@id-right> (RFC 5322 §3.6.4)")
    return f"Message-ID: {message_id}{CRLF}"


def check_lead(message_id: str, date: str | None) -> str:
    """The Date and Message-ID lines that open every message built from parts."""
    return date_line(date) + message_id_line(message_id)


class Unsubscribe:
    """The compiled List-Unsubscribe fields; the lines are kept when nothing is templated."""

    def __init__(self, spec: ListUnsubscribe) -> None:
        if spec.url is None and spec.mailto is None:
            raise TemplateError("list_unsubscribe", "give url and/or mailto")
        self.url = self._compile("list_unsubscribe.url", spec.url, "https://",
                                 "must be an https:// URL: one-click unsubscribe (RFC 8058 §3.1) needs"
                                 " https; give other addresses as mailto")
        self.mailto = self._compile("list_unsubscribe.mailto", spec.mailto, "mailto:",
                                    "must be a mailto: URI (RFC 6068)")
        self.line: str | None = None
        if (self.url is None or self.url.constant is not None) and (
                self.mailto is None or self.mailto.constant is not None):
            try:
                self.line = self.render({})
            except RenderError as exc:
                raise TemplateError(exc.field, exc.problem) from None

    @staticmethod
    def _compile(field: str, source: str | None, scheme: str, problem: str) -> FieldTemplate | None:
        if source is None:
            return None
        if not source[:len(scheme)].lower() == scheme:
            raise TemplateError(field, problem)
        return compile_field(field, source, env=TEXT_ENV)

    def render(self, variables: dict[str, Any]) -> str:
        if self.line is not None:
            return self.line
        uris = [f"<{_uri(t, variables)}>" for t in (self.url, self.mailto) if t is not None]
        # RFC 2369 §2 allows folding between the entries; each stays on its own line.
        line = "List-Unsubscribe: " + ("," + CRLF + " ").join(uris) + CRLF
        if any(len(x) > mime.MAX_LINE for x in line.split(CRLF)):
            raise RenderError("list_unsubscribe", f"a line longer than {mime.MAX_LINE} octets")
        return line + POST_LINE if self.url is not None else line


def _uri(template: FieldTemplate, variables: dict[str, Any]) -> str:
    uri = template.render(variables)
    bad = _URI_BAD.search(uri)
    if bad is not None:
        raise RenderError(template.field, f"{bad.group()!r} cannot appear in a URI (RFC 3986):"
                                          " write substitutions as {{ value|urlencode }}")
    return uri
