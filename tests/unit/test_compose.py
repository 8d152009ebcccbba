"""Composed messages parsed back with the standard library's email parser, and the
refusals that keep them well-formed (header injection, long lines, one-click rules)."""

from __future__ import annotations

import base64
import email
import os
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.policy import default

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.mail.compose import (
    Attachment,
    ContentSpec,
    ListUnsubscribe,
    RenderError,
    TemplateError,
    compile_content,
    merge_bindings,
)

MID = "<t1.abc@news.example.com>"
DATE = "Mon, 06 May 2024 10:00:00 +0000"
BINDINGS = merge_bindings({"first": "All", "code": "c0de"}, {"first": "Anne"}, "anne@example.org", "Anne Smith")


def wire_ok(message: bytes) -> None:
    """CRLF after every line, no bare CR or LF, no line over 998 octets (RFC 5322 §2.1)."""
    assert message.endswith(b"\r\n")
    lines = message.split(b"\r\n")[:-1]
    for line in lines:
        assert b"\n" not in line and b"\r" not in line
        assert len(line) <= 998


def build(spec: ContentSpec, bindings: dict[str, object] = BINDINGS, **kw: object) -> tuple[bytes, EmailMessage]:
    raw = compile_content(spec, **kw).render(bindings, message_id=MID, date=DATE)  # type: ignore[arg-type]
    wire_ok(raw)
    msg = email.message_from_bytes(raw, policy=default)
    assert isinstance(msg, EmailMessage) and not msg.defects
    return raw, msg


def text_of(part: EmailMessage) -> str:
    return str(part.get_content()).replace("\r\n", "\n")


SPEC = dict(from_="Volley News <news@news.example.com>", subject="Hello {{ first }}")
TEXT = "Hi {{ first }},\nyour code is {{ code }}.\n"
HTML = "<p>Hi {{ first }}, code {{ code }}</p>\n"


def test_text_only_is_a_single_text_plain_message_with_every_header() -> None:
    _, msg = build(ContentSpec(**SPEC, text_body=TEXT))
    assert msg.get_content_type() == "text/plain" and msg.get_content_charset() == "utf-8"
    assert text_of(msg) == "Hi Anne,\nyour code is c0de.\n"
    assert msg["Subject"] == "Hello Anne"
    assert msg["From"] == "Volley News <news@news.example.com>"
    assert msg["To"] == "Anne Smith <anne@example.org>"
    assert msg["Message-ID"] == MID and msg["Date"] == DATE and msg["MIME-Version"] == "1.0"
    assert msg["Content-Transfer-Encoding"] == "7bit"


def test_html_only_is_text_html() -> None:
    _, msg = build(ContentSpec(**SPEC, html_body=HTML))
    assert msg.get_content_type() == "text/html"
    assert text_of(msg) == "<p>Hi Anne, code c0de</p>\n"


def test_text_and_html_are_multipart_alternative_text_first() -> None:
    _, msg = build(ContentSpec(**SPEC, text_body=TEXT, html_body=HTML))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert text_of(parts[0]) == "Hi Anne,\nyour code is c0de.\n"
    assert text_of(parts[1]) == "<p>Hi Anne, code c0de</p>\n"


ATTACHMENTS = [
    (os.urandom(3000), "report.pdf", "application/pdf"),
    (b"", "empty.txt", "text/plain"),
    (b"\x00\xff" * 10, "résumé – ünïcödé naam dat lang genoeg is om te splitsen.bin", "application/octet-stream"),
]


@pytest.mark.parametrize("bodies", [(TEXT, None), (None, HTML), (TEXT, HTML)])
def test_attachments_are_multipart_mixed_around_the_text(bodies: tuple[str | None, str | None]) -> None:
    atts = [Attachment(filename=name, content_type=ctype, data=base64.b64encode(data).decode())
            for data, name, ctype in ATTACHMENTS]
    raw, msg = build(ContentSpec(**SPEC, text_body=bodies[0], html_body=bodies[1], attachments=atts))
    assert msg.get_content_type() == "multipart/mixed"
    first = next(msg.iter_parts())
    expected = "multipart/alternative" if None not in bodies else ("text/plain" if bodies[0] else "text/html")
    assert first.get_content_type() == expected
    body = msg.get_body(("plain",) if bodies[0] else ("html",))
    assert body is not None and "Anne" in text_of(body)
    got = list(msg.iter_attachments())
    assert [(p.get_payload(decode=True), p.get_filename(), p.get_content_type()) for p in got] == ATTACHMENTS
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78  # base64 lines of 76


def test_attachment_data_with_line_breaks_is_accepted_and_bad_base64_refused() -> None:
    data = base64.encodebytes(os.urandom(200)).decode()  # 76-column lines with \n
    _, msg = build(ContentSpec(**SPEC, text_body="x", attachments=[Attachment(filename="a.bin", data=data)]))
    assert next(msg.iter_attachments()).get_content() == base64.b64decode(data)
    for bad, field in ((Attachment(filename="a", data="%%%"), "data"),
                       (Attachment(filename="", data=""), "filename"),
                       (Attachment(filename="a", content_type="pdf", data=""), "content_type"),
                       (Attachment(filename="a", content_type="message/rfc822", data=""), "content_type")):
        with pytest.raises(TemplateError) as info:
            compile_content(ContentSpec(**SPEC, text_body="x", attachments=[bad]))
        assert info.value.field == f"content.attachments[0].{field}"


def test_non_ascii_subject_names_and_bodies_are_encoded_and_decode_back() -> None:
    b = merge_bindings(None, {"first": "Zoë"}, "zoe@example.org", "Zoë, Ärzte \"und\" Co")
    spec = ContentSpec(from_='"Nieuws, B.V." <nieuws@example.nl>', subject="Grüße {{ first }} 🎉",
                       text_body="Grüße {{ first }}\n", html_body="<p>Grüße {{ first }}</p>",
                       reply_to="Antwörten <reply@example.nl>", headers={"X-Note": "für {{ first }}"})
    raw, msg = build(spec, b)
    assert raw.isascii()
    assert msg["Subject"] == "Grüße Zoë 🎉"
    assert msg["To"].addresses[0].display_name == "Zoë, Ärzte \"und\" Co"
    assert msg["To"].addresses[0].addr_spec == "zoe@example.org"
    assert msg["From"].addresses[0].display_name == "Nieuws, B.V."
    assert msg["Reply-To"].addresses[0].display_name == "Antwörten"
    assert msg["X-Note"] == "für Zoë"
    assert text_of(msg.get_body(("plain",))) == "Grüße Zoë\n"  # type: ignore[arg-type]
    assert compile_content(spec).body_8bit is False


def test_long_lines_are_quoted_printable_and_the_boundary_cannot_occur_in_a_part() -> None:
    compiled = compile_content(ContentSpec(**SPEC, text_body="{{ long }}\n{{ trap }}", html_body="<p>x</p>"))
    boundary = compiled._alt  # type: ignore[attr-defined]
    b = dict(BINDINGS, long="word " * 400, trap=f"--{boundary}--")
    raw = compiled.render(b, message_id=MID, date=DATE)
    wire_ok(raw)
    msg = email.message_from_bytes(raw, policy=default)
    plain = msg.get_body(("plain",))
    assert plain is not None and plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(plain) == "word " * 400 + f"\n--{boundary}--"
    assert len(list(msg.iter_parts())) == 2


def test_a_long_ascii_subject_and_name_are_folded_within_the_line_limit() -> None:
    subject = "x" * 1500
    raw, msg = build(ContentSpec(**dict(SPEC, subject=subject), text_body="x"),
                     dict(BINDINGS, name="N" * 1200, email="r@example.org"))
    assert msg["Subject"] == subject
    assert display_name(raw, msg) == "N" * 1200


def test_headers_given_replace_the_default_to_and_custom_headers_are_kept() -> None:
    spec = ContentSpec(**SPEC, text_body="x", headers={"To": "Members <members@list.example>",
                                                       "X-Campaign": "spring-{{ code }}"})
    raw, msg = build(spec)
    assert raw.count(b"\r\nTo:") == 1 and msg["To"] == "Members <members@list.example>"
    assert msg["X-Campaign"] == "spring-c0de"


@pytest.mark.parametrize("name", ["Date", "message-id", "MIME-Version", "Content-Type",
                                  "Content-Transfer-Encoding", "From", "Subject", "Bcc"])
def test_headers_volley_sets_cannot_be_overridden(name: str) -> None:
    with pytest.raises(TemplateError) as info:
        compile_content(ContentSpec(**SPEC, text_body="x", headers={name: "v"}))
    assert info.value.field == f"content.headers.{name}"


@pytest.mark.parametrize("name", ["Bad Name", "X:Y", "Ünï", ""])
def test_a_header_name_must_be_ftext(name: str) -> None:
    with pytest.raises(TemplateError, match="not a header field name"):
        compile_content(ContentSpec(**SPEC, text_body="x", headers={name: "v"}))


def test_duplicate_header_names_are_refused() -> None:
    with pytest.raises(TemplateError, match="given twice"):
        compile_content(ContentSpec(**SPEC, text_body="x", headers={"X-A": "1", "x-a": "2"}))


@pytest.mark.parametrize(("spec", "field"), [
    (ContentSpec(**SPEC, text_body="x", headers={"X-Tag": "{{ evil }}"}), "content.headers.X-Tag"),
    (ContentSpec(from_="a@example.com", subject="Hi {{ evil }}", text_body="x"), "content.subject"),
    (ContentSpec(from_="{{ evil }} <a@example.com>", text_body="x"), "content.from"),
    (ContentSpec(**SPEC, reply_to="r{{ evil }}@example.com", text_body="x"), "content.reply_to"),
])
def test_header_injection_through_a_substitution_is_refused(spec: ContentSpec, field: str) -> None:
    compiled = compile_content(spec)
    with pytest.raises(RenderError) as info:
        compiled.render(dict(BINDINGS, evil="x\r\nBcc: victim@example.net"), message_id=MID)
    assert info.value.field == field and "line break" in str(info.value)
    with pytest.raises(RenderError) as to_info:
        compiled.render(dict(BINDINGS, evil="", name="Eve\nBcc: v@example.net"), message_id=MID)
    assert to_info.value.field == "to"


def test_a_line_break_in_a_constant_header_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="content.subject: contains a line break"):
        compile_content(ContentSpec(from_="a@example.com", subject="one\ntwo", text_body="x"))


def test_required_parts_and_raw_or_parts() -> None:
    with pytest.raises(TemplateError, match="content.from: required"):
        compile_content(ContentSpec(text_body="x"))
    with pytest.raises(TemplateError, match="^content: give text_body and/or html_body"):
        compile_content(ContentSpec(from_="a@example.com"))
    with pytest.raises(TemplateError, match="content.raw: give either raw or the parts"):
        compile_content(ContentSpec(raw="From: a@example.com\n\nx", subject="s"))
    with pytest.raises(TemplateError, match="content.from: .*not an email address"):
        compile_content(ContentSpec(from_="Just A Name", text_body="x"))


def test_date_defaults_to_now_and_a_bad_message_id_is_refused() -> None:
    compiled = compile_content(ContentSpec(**SPEC, text_body="x"))
    msg = email.message_from_bytes(compiled.render(BINDINGS, message_id=MID), policy=default)
    assert msg["Date"].datetime.utcoffset().total_seconds() == 0
    with pytest.raises(RenderError, match="message_id"):
        compiled.render(BINDINGS, message_id="no-brackets@example.com")
    with pytest.raises(RenderError) as info:
        compiled.render({"name": "x"}, message_id=MID)
    assert info.value.field == "to"


def test_list_unsubscribe_with_https_and_mailto_is_one_click() -> None:
    lu = ListUnsubscribe(url="https://u.example.com/u?e={{ email|urlencode }}&c={{ code }}",
                         mailto="mailto:unsub+{{ code }}@example.com?subject=unsubscribe")
    _, msg = build(ContentSpec(**SPEC, text_body="x"), list_unsubscribe=lu)
    assert msg["List-Unsubscribe"] == ("<https://u.example.com/u?e=anne%40example.org&c=c0de>, "
                                       "<mailto:unsub+c0de@example.com?subject=unsubscribe>")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_list_unsubscribe_mailto_only_has_no_post_header() -> None:
    _, msg = build(ContentSpec(**SPEC, text_body="x"), list_unsubscribe=ListUnsubscribe(mailto="mailto:u@example.com"))
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>" and msg["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(("lu", "field"), [
    (ListUnsubscribe(url="http://u.example.com/x"), "list_unsubscribe.url"),
    (ListUnsubscribe(url="{{ link }}"), "list_unsubscribe.url"),
    (ListUnsubscribe(mailto="u@example.com"), "list_unsubscribe.mailto"),
    (ListUnsubscribe(), "list_unsubscribe"),
    (ListUnsubscribe(url="https://u.example.com/a b"), "list_unsubscribe.url"),
])
def test_list_unsubscribe_refusals(lu: ListUnsubscribe, field: str) -> None:
    with pytest.raises(TemplateError) as info:
        compile_content(ContentSpec(**SPEC, text_body="x"), list_unsubscribe=lu)
    assert info.value.field == field


def test_a_substitution_that_breaks_the_uri_is_a_render_error() -> None:
    compiled = compile_content(ContentSpec(**SPEC, text_body="x"),
                               list_unsubscribe=ListUnsubscribe(url="https://u.example.com/{{ first }}"))
    with pytest.raises(RenderError, match="list_unsubscribe.url: ' ' cannot appear in a URI"):
        compiled.render(dict(BINDINGS, first="A B"), message_id=MID)
    with pytest.raises(TemplateError, match="may not be set when list_unsubscribe"):
        compile_content(ContentSpec(**SPEC, text_body="x", headers={"List-Unsubscribe": "<mailto:a@b.c>"}),
                        list_unsubscribe=ListUnsubscribe(mailto="mailto:u@example.com"))


RAW = ("From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\nSubject: Hi {{ first }}\n"
       "{% if tag %}X-Tag: {{ tag }}{% endif %}\n\nDear {{ first }},\nbody\n")


def test_raw_content_is_rendered_with_crlf_and_date_and_message_id_added() -> None:
    compiled = compile_content(ContentSpec(raw=RAW), list_unsubscribe=ListUnsubscribe(mailto="mailto:u@example.com"))
    assert compiled.body_8bit is True
    raw = compiled.render(dict(BINDINGS, first="Jürgen", tag=""), message_id=MID, date=DATE)
    wire_ok(raw)
    msg = email.message_from_bytes(raw, policy=default)
    assert msg["Message-ID"] == MID and msg["Date"] == DATE and msg["Subject"] == "Hi Jürgen"
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>" and "X-Tag" not in msg
    assert raw.endswith("\r\n\r\nDear Jürgen,\r\nbody\r\n".encode())
    own = compile_content(ContentSpec(raw=f"Message-ID: <own@x.example>\r\nDate: {DATE}\r\nFrom: a@x.example\r\n\r\nb"))
    out = own.render(BINDINGS, message_id=MID)
    assert out.count(b"Message-ID:") == 1 and b"<own@x.example>" in out and out.endswith(b"\r\n\r\nb\r\n")


def test_raw_content_refusals() -> None:
    with pytest.raises(TemplateError, match="content.raw: no blank line"):
        compile_content(ContentSpec(raw="From: a@example.com\nSubject: x"))
    with pytest.raises(RenderError, match="content.raw: the message has no From"):
        compile_content(ContentSpec(raw="Subject: x\n\nbody")).render(BINDINGS, message_id=MID)
    injected = compile_content(ContentSpec(raw="From: a@example.com\nSubject: {{ s }}\n\nbody"))
    with pytest.raises(RenderError, match="content.raw: a substitution in the header block contains a line break"):
        injected.render(dict(BINDINGS, s="x\r\nBcc: victim@example.net"), message_id=MID)
    long_line = compile_content(ContentSpec(raw="From: a@example.com\n\n{{ 'x' * 1200 }}"))
    with pytest.raises(RenderError, match="body line 1 is longer than 998"):
        long_line.render(BINDINGS, message_id=MID)
    with pytest.raises(RenderError, match="has its own List-Unsubscribe"):
        compile_content(ContentSpec(raw="From: a@example.com\nList-Unsubscribe: <mailto:x@y.z>\n\nb"),
                        list_unsubscribe=ListUnsubscribe(mailto="mailto:u@example.com")).render(
                            BINDINGS, message_id=MID)
    with pytest.raises(TemplateError, match="content.raw: line 5"):
        compile_content(ContentSpec(raw="From: a@example.com\n\nline 3\nline 4\n{{ oops"))


def display_name(raw: bytes, msg: EmailMessage) -> str:
    """The To: display name. Encoded words are decoded the RFC 2047 §6.2 way, ignoring
    the folding between adjacent words (the newer parser puts a space there in a phrase)."""
    value = raw.split(b"\r\nTo: ", 1)[1].split(b" <r@example.org>", 1)[0].decode().replace("\r\n ", " ")
    if value.startswith("=?"):
        return str(make_header(decode_header(value)))
    return str(msg["To"].addresses[0].display_name)


# Any text but the surrogates UTF-8 cannot carry.
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
# A header value cannot hold CR, LF (a new field) or NUL: those are refused, tested above.
LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=LINE_TEXT, text=ANY_TEXT, html=ANY_TEXT, name=LINE_TEXT)
def test_any_unicode_round_trips_within_the_line_limit(subject: str, text: str, html: str, name: str) -> None:
    compiled = compile_content(ContentSpec(from_="a@example.com", subject="{{ s }}", text_body="{{ t }}",
                                           html_body="{{ h|safe }}"))
    bindings = {"s": subject, "t": text, "h": html, "email": "r@example.org", "name": name}
    raw = compiled.render(bindings, message_id=MID, date=DATE)
    wire_ok(raw)
    msg = email.message_from_bytes(raw, policy=default)
    assert msg["Subject"] == subject
    assert display_name(raw, msg) == name
    plain, rich = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and rich is not None

    def normal(s: str) -> str:
        return s.replace("\r\n", "\n").replace("\r", "\n")

    assert text_of(plain) == normal(text)
    assert text_of(rich) == normal(html)


def test_the_content_decodes_from_json_with_from_and_unknown_keys_refused() -> None:
    spec = msgspec.json.decode(b'{"from": "a@example.com", "text_body": "x", "headers": {"X-A": "1"},'
                               b' "attachments": [{"filename": "f", "data": ""}]}', type=ContentSpec)
    assert spec.from_ == "a@example.com" and spec.attachments[0].content_type == "application/octet-stream"
    assert msgspec.json.encode(spec).startswith(b'{"raw":null,"from":"a@example.com"')
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `txt_body`"):
        msgspec.json.decode(b'{"from": "a@example.com", "txt_body": "x"}', type=ContentSpec)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.attachments\[0\]"):
        msgspec.json.decode(b'{"attachments": [{"filename": "f"}]}', type=ContentSpec)
