"""Micro benchmark: one recipient's newsletter rendered from compiled content.

A ~1 KB text+html newsletter with three substitutions (first name, a code, the address
in the unsubscribe URL), a List-Unsubscribe with one-click: the per-recipient work of
an HTTP injection, which compiles once per request and renders once per recipient.
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from engine.mail.compose import ContentSpec, ListUnsubscribe, compile_content, merge_bindings

PARAGRAPH = "This week in the newsletter: releases, a talk from the meetup and three small fixes.\n"
TEXT = "Hello {{ first }},\n\n" + PARAGRAPH * 5 + "Your code: {{ code }}\n"
HTML = "<html><body><p>Hello {{ first }},</p>\n" + f"<p>{PARAGRAPH}</p>" * 4 + "<p>Code: {{ code }}</p></body></html>\n"
SPEC = ContentSpec(from_="Volley News <news@news.example.com>", subject="Your weekly news, {{ first }}",
                   text_body=TEXT, html_body=HTML, headers={"X-Campaign": "weekly-42"})
UNSUBSCRIBE = ListUnsubscribe(url="https://news.example.com/u?e={{ email|urlencode }}",
                              mailto="mailto:unsubscribe@news.example.com")
BINDINGS = merge_bindings({"code": "WEEK42"}, {"first": "Jane"}, "jane.doe@example.org", "Jane Doe")


def test_render_one_recipient(benchmark: BenchmarkFixture) -> None:
    assert 900 <= len(TEXT) + len(HTML) <= 1200
    compiled = compile_content(SPEC, list_unsubscribe=UNSUBSCRIBE)

    def render() -> bytes:
        return compiled.render(BINDINGS, message_id="<t1.abcdef@news.example.com>")

    message = benchmark(render)
    assert b"Hello Jane," in message and b"e=jane.doe%40example.org" in message


def test_compile_content(benchmark: BenchmarkFixture) -> None:
    compiled = benchmark(compile_content, SPEC, list_unsubscribe=UNSUBSCRIBE)
    assert compiled.body_8bit is False
