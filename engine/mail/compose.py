"""Newsletter content: compile a request's templates once, render one message per recipient.

`compile_content` checks and compiles every field (TemplateError names the first bad
one); `CompiledContent.render` produces one recipient's whole RFC 5322 message as
bytes with CRLF line ends, ready to queue (RenderError names what failed for them).

Built from parts, the message is:
  text only → text/plain; html only → text/html; both → multipart/alternative (text
  first: RFC 2046 §5.1.4 puts the preferred, richer part last); attachments →
  multipart/mixed around that. Text parts are 7bit when ASCII with short lines, else
  quoted-printable, so such messages are 7-bit clean (`body_8bit` False) unless a
  recipient's address itself is non-ASCII (RFC 6532, which needs SMTPUTF8 anyway).
Headers, in order: Date, Message-ID, From, To, Subject, Reply-To, MIME-Version,
List-Unsubscribe (+ List-Unsubscribe-Post), the custom headers, Content-Type.
The multipart boundaries are chosen once per compile: "=_" and 32 random hex digits.
"=_" never occurs in quoted-printable; a 7bit part containing the boundary is sent
quoted-printable instead (mime.text_body), so no rendered part can end one early.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from engine.mail import mime
from engine.mail.content import CompiledContent, ListUnsubscribe, Unsubscribe, check_lead
from engine.mail.mime import CRLF
from engine.mail.raw import RawContent
from engine.mail.template import (
    HTML_ENV,
    TEXT_ENV,
    FieldTemplate,
    RenderError,
    TemplateError,
    compile_field,
    merge_bindings,
    template_vars,
)

__all__ = [
    "Attachment", "CompiledContent", "ContentSpec", "ListUnsubscribe", "RenderError",
    "TemplateError", "compile_content", "merge_bindings",
]


class Attachment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    filename: str
    content_type: str = "application/octet-stream"
    data: str  # base64 (RFC 4648 §4); line breaks and spaces are ignored


class ContentSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The "content" of an injection request: a whole message (`raw`) or the parts."""

    raw: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    subject: str = ""
    text_body: str | None = None
    html_body: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = {}
    attachments: list[Attachment] = []


# Headers a request may not set, and why (lower-cased names).
_REFUSED: Final = {
    "date": "set by Volley", "message-id": "set by Volley", "mime-version": "set by Volley",
    "content-type": "set by Volley from the parts",
    "content-transfer-encoding": "set by Volley from the parts",
    "content-disposition": "set by Volley from the parts",
    "from": "give it as content.from", "subject": "give it as content.subject",
    "reply-to": "give it as content.reply_to",
    "bcc": "every copy is for one recipient; the envelope decides who receives it",
    "return-path": "added at final delivery (RFC 5321 §4.4)",
}
_UNSUBSCRIBE_NAMES: Final = ("list-unsubscribe", "list-unsubscribe-post")
_ADDRESS_FIELDS: Final = frozenset({"to", "cc", "sender"})
_MAX_NAME: Final = 76


def compile_content(spec: ContentSpec, *, list_unsubscribe: ListUnsubscribe | None = None) -> CompiledContent:
    """Check and compile every template of `spec`. Raises TemplateError naming the field."""
    unsubscribe = Unsubscribe(list_unsubscribe) if list_unsubscribe is not None else None
    if spec.raw is not None:
        given = [name for name, value in (
            ("from", spec.from_), ("subject", spec.subject or None), ("text_body", spec.text_body),
            ("html_body", spec.html_body), ("reply_to", spec.reply_to), ("headers", spec.headers or None),
            ("attachments", spec.attachments or None)) if value is not None]
        if given:
            raise TemplateError("content.raw",
                                f"give either raw or the parts, not both (also given: {', '.join(given)})")
        return RawContent(spec.raw, unsubscribe)
    return _PartsContent(spec, unsubscribe)


class _Header:
    """One header field: its template and how its value is encoded; the finished line
    is kept when the value has no template syntax."""

    __slots__ = ("name", "template", "encode", "line")

    def __init__(self, name: str, template: FieldTemplate, encode: Callable[[str, str], str]) -> None:
        self.name, self.template, self.encode = name, template, encode
        self.line: str | None = None
        if template.constant is not None:
            try:
                self.line = encode(name, template.constant)
            except ValueError as exc:
                raise TemplateError(template.field, str(exc)) from None

    def render(self, variables: dict[str, Any]) -> str:
        if self.line is not None:
            return self.line
        value = self.template.render(variables)
        try:
            return self.encode(self.name, value)
        except ValueError as exc:
            raise RenderError(self.template.field, str(exc)) from None


def _mailbox_line(name: str, value: str) -> str:
    return mime.mailbox(name, *mime.parse_mailbox(value))


class _Body:
    """One text part: its Content-Type line and template; encoded once when constant."""

    __slots__ = ("content_type", "template", "encoded")

    def __init__(self, content_type: str, template: FieldTemplate, boundary: str) -> None:
        self.content_type = f'Content-Type: {content_type}; charset="utf-8"{CRLF}'
        self.template = template
        self.encoded = None if template.constant is None else mime.text_body(template.constant, boundary)

    def render(self, variables: dict[str, Any], boundary: str) -> tuple[str, str]:
        if self.encoded is not None:
            return self.encoded
        return mime.text_body(self.template.render(variables), boundary)


class _PartsContent(CompiledContent):
    def __init__(self, spec: ContentSpec, unsubscribe: Unsubscribe | None) -> None:
        if spec.from_ is None:
            raise TemplateError("content.from", "required (or give the whole message as content.raw)")
        if spec.text_body is None and spec.html_body is None:
            raise TemplateError("content", "give text_body and/or html_body (or the whole message as raw)")
        token = secrets.token_hex(16)
        self._alt, self._mixed = f"=_alt_{token}", f"=_mix_{token}"
        self._unsubscribe = unsubscribe
        self._from = _Header("From", compile_field("content.from", spec.from_), _mailbox_line)
        self._top = [_Header("Subject", compile_field("content.subject", spec.subject), mime.unstructured)]
        if spec.reply_to is not None:
            self._top.append(_Header("Reply-To", compile_field("content.reply_to", spec.reply_to), _mailbox_line))
        self._custom = self._compile_headers(spec.headers, unsubscribe is not None)
        self._auto_to = not any(h.name.lower() == "to" for h in self._custom)
        self._bodies = [
            _Body(ctype, compile_field(f"content.{field}", source, env=env), self._alt)
            for ctype, field, source, env in (("text/plain", "text_body", spec.text_body, TEXT_ENV),
                                              ("text/html", "html_body", spec.html_body, HTML_ENV))
            if source is not None
        ]
        self._attachments = "".join(
            f"{CRLF}--{self._mixed}{CRLF}{_attachment(i, a)}" for i, a in enumerate(spec.attachments))

    @staticmethod
    def _compile_headers(headers: Mapping[str, str], unsubscribe: bool) -> list[_Header]:
        seen: set[str] = set()
        out: list[_Header] = []
        for name, source in headers.items():
            field = f"content.headers.{name}"
            lower = name.lower()
            if not mime.is_field_name(name) or len(name) > _MAX_NAME:
                raise TemplateError(field, f"not a header field name (printable ASCII except ':', at most {_MAX_NAME})")
            if lower in _REFUSED:
                raise TemplateError(field, f"may not be set: {_REFUSED[lower]}")
            if unsubscribe and lower in _UNSUBSCRIBE_NAMES:
                raise TemplateError(field, "may not be set when list_unsubscribe is given")
            if lower in seen:
                raise TemplateError(field, "given twice (header names are case-insensitive)")
            seen.add(lower)
            encode = mime.address_list if lower in _ADDRESS_FIELDS else mime.unstructured
            out.append(_Header(name, compile_field(field, source), encode))
        return out

    def render(self, bindings: Mapping[str, object], *, message_id: str, date: str | None = None) -> bytes:
        variables = template_vars(bindings)
        out = [check_lead(message_id, date), self._from.render(variables)]
        if self._auto_to:
            out.append(_to_line(bindings))
        out.extend(h.render(variables) for h in self._top)
        out.append("MIME-Version: 1.0" + CRLF)
        if self._unsubscribe is not None:
            out.append(self._unsubscribe.render(variables))
        out.extend(h.render(variables) for h in self._custom)
        parts = [body.render(variables, self._alt) for body in self._bodies]
        if not self._attachments:
            self._entity(out, parts, top=True)
        else:
            mixed = self._mixed
            out.append(f'Content-Type: multipart/mixed;{CRLF} boundary="{mixed}"{CRLF}{CRLF}--{mixed}{CRLF}')
            self._entity(out, parts, top=False)
            out.append(self._attachments)
            out.append(f"{CRLF}--{self._mixed}--{CRLF}")
        return "".join(out).encode("utf-8")

    def _entity(self, out: list[str], parts: list[tuple[str, str]], *, top: bool) -> None:
        """The text entity (one part or multipart/alternative), headers first. At the top
        level the message must end with CRLF; inside multipart/mixed the delimiter's
        own CRLF follows (RFC 2046 §5.1.1)."""
        if len(parts) == 1:
            cte, text = parts[0]
            out += [self._bodies[0].content_type, "Content-Transfer-Encoding: ", cte, CRLF, CRLF, text]
            if top and not text.endswith(CRLF):
                # a QP soft line break adds nothing to the decoded text (RFC 2045 §6.7 rule 5)
                out.append("=" + CRLF if cte == "quoted-printable" else CRLF)
            return
        alt = self._alt
        out.append(f'Content-Type: multipart/alternative;{CRLF} boundary="{alt}"{CRLF}{CRLF}')
        for body, (cte, text) in zip(self._bodies, parts):
            out += ["--", alt, CRLF, body.content_type, "Content-Transfer-Encoding: ", cte, CRLF, CRLF, text, CRLF]
        out.append(f"--{alt}--{CRLF}" if top else f"--{alt}--")


def _to_line(bindings: Mapping[str, object]) -> str:
    email, name = bindings.get("email"), bindings.get("name")
    if not isinstance(email, str):
        raise RenderError("to", "no recipient address: `email` must be bound to a string")
    if name is not None and not isinstance(name, str):
        raise RenderError("to", "`name` must be a string")
    try:
        mime.check_address(email)
        mime.check_value(name or "")
        return mime.mailbox("To", name or "", email)
    except ValueError as exc:
        raise RenderError("to", str(exc)) from None


_BASE64_SPACE: Final = re.compile(r"\s+")


def _attachment(index: int, att: Attachment) -> str:
    field = f"content.attachments[{index}]"
    if not att.filename or "\0" in att.filename or "\r" in att.filename or "\n" in att.filename:
        raise TemplateError(f"{field}.filename", "must be a non-empty name without line breaks")
    ctype = att.content_type.lower()
    if not mime.is_media_type(ctype):
        raise TemplateError(f"{field}.content_type", f"{att.content_type!r} is not a media type (type/subtype)")
    if ctype.startswith(("multipart/", "message/")):
        # RFC 2046 §5.1.1, §5.2.1: these may not be base64 encoded
        raise TemplateError(f"{field}.content_type", f"{ctype} cannot be attached base64 encoded")
    try:
        data = base64.b64decode(_BASE64_SPACE.sub("", att.data), validate=True)
    except (binascii.Error, ValueError):
        raise TemplateError(f"{field}.data", "not valid base64") from None
    return mime.attachment_part(att.filename, ctype, data)
