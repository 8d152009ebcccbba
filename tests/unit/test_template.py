"""The template sandbox: what renders, what is refused, and that refusals name the field."""

from __future__ import annotations

import pytest

from engine.mail.compose import ContentSpec, compile_content
from engine.mail.template import (
    HTML_ENV,
    MAX_OUTPUT,
    RenderError,
    TemplateError,
    compile_field,
    merge_bindings,
    template_vars,
)

FIELD = "content.text_body"


def render(source: str, **bindings: object) -> str:
    return compile_field(FIELD, source).render(template_vars(bindings))


def test_substitutions_render_and_a_source_without_syntax_is_kept_as_is() -> None:
    assert render("Hello {{ first }}!", first="Anne") == "Hello Anne!"
    plain = compile_field(FIELD, "no { template } here\n")
    assert plain.constant == "no { template } here\n"


def test_undefined_variables_their_attributes_and_none_render_empty() -> None:
    assert render("[{{ missing }}|{{ missing.deeper.still }}|{{ missing['k'] }}|{{ nothing }}]",
                  nothing=None) == "[|||]"
    assert render("{% for x in missing %}x{% endfor %}done") == "done"


def test_the_trailing_line_break_of_a_body_is_kept() -> None:
    assert render("line {{ n }}\n", n=1) == "line 1\n"


def test_a_syntax_error_is_a_template_error_naming_the_field_and_line() -> None:
    with pytest.raises(TemplateError) as info:
        compile_field("content.subject", "fine\n{{ oops ")
    assert info.value.field == "content.subject"
    assert str(info.value).startswith("content.subject: line 2:")
    with pytest.raises(TemplateError, match="content.html_body: line 1: .*nosuch"):
        compile_field("content.html_body", "{{ x|nosuch }}")


def test_a_runtime_error_is_a_render_error_naming_the_field_and_line() -> None:
    with pytest.raises(RenderError) as info:
        render("one\ntwo {{ 1 / zero }}", zero=0)
    assert info.value.field == FIELD
    assert "line 2" in str(info.value) and "ZeroDivisionError" in str(info.value)


LEAK_MARKERS = ("<class", "<function", "<built-in", "object at 0x", "__builtins__", "os.", "environ")

# Probes for the Python internals the sandbox must not hand out.
PROBES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ email['__class__'] }}",
    "{{ email|attr('__class__') }}",
    "{{ (email|attr('__class__')).__base__ }}",
    "{{ '{0.__class__}'.format(email) }}",
    "{{ email.upper }}",
    "{{ range }}",
    "{{ config }}{{ request.application }}{{ lipsum() }}",
    "{% include 'x' %}",
    "{% import 'macros' as m %}",
    "{% from 'macros' import m %}",
    "{% extends 'base' %}",
    "{% set items = [1] %}{{ items.append(2) }}",
    "{{ items.append(2) }}{{ opts.update(a=1) }}",
    "{{ 'x' * 100000000 }}",
    "{{ 10 ** 100000 }}",
    "{{ range(100000000)|list }}",
]


@pytest.mark.parametrize("probe", PROBES)
def test_sandbox_probes_fail_safely_and_never_leak(probe: str) -> None:
    items: list[int] = [1]
    opts: dict[str, int] = {}
    try:
        out = render(probe, email="a@example.org", items=items, opts=opts)
    except (TemplateError, RenderError) as exc:
        assert exc.field == FIELD
        out = str(exc)
    else:
        assert out == ""  # only undefined names (config, request) may render, as nothing
    for marker in LEAK_MARKERS:
        assert marker not in out
    assert items == [1] and opts == {}  # no render changes the bindings the next one sees


def test_include_and_import_are_refused_at_compile_time() -> None:
    for source in ("{% include 'x' %}", "{% import 'x' as y %}", "a\n{% extends 'b' %}"):
        with pytest.raises(TemplateError, match="not allowed: templates come only from the request"):
            compile_field(FIELD, source)


def test_sandbox_refusal_through_compile_content_names_the_subject() -> None:
    with pytest.raises(TemplateError) as info:
        compile_content(ContentSpec(from_="a@example.com", subject="{{ ''.__class__ }}", text_body="x"))
    assert info.value.field == "content.subject"
    compiled = compile_content(ContentSpec(from_="a@example.com", subject="{{ s['__class__'] }}", text_body="x"))
    with pytest.raises(RenderError) as rinfo:
        compiled.render({"email": "b@example.org", "s": "text"}, message_id="<1@example.com>")
    assert rinfo.value.field == "content.subject" and "refused by the sandbox" in str(rinfo.value)


def test_html_autoescapes_substitutions_text_does_not_and_safe_opts_out() -> None:
    bindings = template_vars({"name": "<b>Tom & Jerry</b>"})
    html = compile_field("content.html_body", "<p>{{ name }}|{{ name|safe }}</p>", env=HTML_ENV)
    assert html.render(bindings) == "<p>&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;|<b>Tom & Jerry</b></p>"
    assert compile_field(FIELD, "{{ name }}").render(bindings) == "<b>Tom & Jerry</b>"


def test_loops_filters_and_ranges_within_the_caps_work() -> None:
    out = render("{% for a in articles %}{{ loop.index }}. {{ a.title|upper }}\n{% endfor %}{{ range(3)|join(',') }}",
                 articles=[{"title": "one"}, {"title": "two"}])
    assert out == "1. ONE\n2. TWO\n0,1,2"
    assert render("{{ 'ab' * 3 }} {{ 2 ** 10 }}") == "ababab 1024"


def test_one_fields_output_is_capped() -> None:
    chunk = "x" * 1000
    with pytest.raises(RenderError, match="renders to more than"):
        render("{% for i in range(10000) %}{% for j in range(2) %}{{ c }}{% endfor %}{% endfor %}", c=chunk)
    assert MAX_OUTPUT < 10000 * 2 * len(chunk)


def test_bindings_precedence_recipient_over_shared_email_and_name_over_both() -> None:
    merged = merge_bindings({"first": "All", "team": "News", "email": "x"}, {"first": "Zoë", "name": "y"},
                            "zoe@example.org", None)
    assert merged == {"first": "Zoë", "team": "News", "email": "zoe@example.org", "name": ""}
    assert merge_bindings(None, None, "a@b.example", "Ann") == {"email": "a@b.example", "name": "Ann"}
