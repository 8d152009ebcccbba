"""engine.smtp.grammar: xtext (RFC 3461 §4) and address literals (RFC 5321 §4.1.3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.smtp import grammar
from engine.smtp.grammar import valid_address_literal, xtext_decode, xtext_encode

# xtext carries octets: "+XX" decodes to one character U+0000..U+00FF.
octet_text = st.text(st.characters(max_codepoint=0xFF, exclude_categories=()), max_size=60)


@settings(max_examples=200)
@given(octet_text)
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert grammar.XTEXT.fullmatch(encoded) is not None
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text


@settings(max_examples=200)
@given(st.text(max_size=30).filter(lambda t: any(ord(c) > 0xFF for c in t)))
def test_xtext_refuses_what_it_cannot_carry(text: str) -> None:
    # "€" used to become "+20AC", which decodes to " AC": never corrupt silently.
    with pytest.raises(ValueError):
        xtext_encode(text)


@settings(max_examples=200)
@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40))
def test_xtext_decode_is_total_on_printable_ascii(value: str) -> None:
    try:
        decoded = xtext_decode(value)
    except ValueError:
        assert grammar.XTEXT.fullmatch(value) is None
    else:
        # Decoding then encoding gives the canonical form, which decodes the same.
        assert xtext_decode(xtext_encode(decoded)) == decoded


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("", ""),
        ("abc", "abc"),
        ("+2B", "+"),
        ("+3D", "="),
        ("a+20b", "a b"),
        ("+00+7F+FF", "\x00\x7f\xff"),
        ("rfc822;user@example.com", "rfc822;user@example.com"),
    ],
)
def test_xtext_decode_examples(value: str, decoded: str) -> None:
    assert xtext_decode(value) == decoded


@pytest.mark.parametrize(
    "value", ["+", "+2", "a+", "+2b", "+GG", "+ 2B", "a=b", "=", "a b", "\x7f", "é", "tab\there", "+-1"]
)
def test_invalid_xtext_rejected(value: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(value)


def test_xtext_encode_examples() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("\r\n") == "+0D+0A"
    assert xtext_encode("é") == "+E9"


@pytest.mark.parametrize(
    "literal",
    [
        "[192.0.2.1]",
        "[0.0.0.0]",
        "[255.255.255.255]",
        "[IPv6:2001:db8::1]",
        "[IPv6:::]",
        "[IPv6:::1]",
        "[ipv6:2001:DB8:0:0:0:0:0:1]",
        "[IPv6:::ffff:192.0.2.1]",
        "[IPv6:2001:db8::192.0.2.1]",
        "[x-tag:anything]",
        "[tag9:a:b:c]",
    ],
)
def test_valid_address_literals(literal: str) -> None:
    assert valid_address_literal(literal)


@pytest.mark.parametrize(
    "literal",
    [
        "[256.0.0.1]",
        "[192.0.2]",
        "[192.0.2.1.1]",
        "[01.2.3.4]",
        "[192.0.2.1 ]",
        "[example.com]",
        "[IPv6:]",
        "[IPv6:zz::1]",
        "[IPv6:1::2::3]",
        "[IPv6:1:2:3:4:5:6:7:8:9]",
        "[IPv6:192.0.2.1]",
        "[IPv6:fe80::1%eth0]",
        "[IPv6:fe80::1%25eth0]",
        "[:content]",
        "[-:content]",
        "[tag-:content]",
        "[x-tag:]",
    ],
)
def test_invalid_address_literals(literal: str) -> None:
    assert not valid_address_literal(literal)


def test_path_patterns_keep_ascii_and_utf8_apart() -> None:
    assert grammar.PATH.fullmatch("<δ@example.com>") is None
    assert grammar.PATH_UTF8.fullmatch("<δ@παράδειγμα.example>") is not None
    assert grammar.PATH.fullmatch("<@a.example,@b.example:u@c.example>") is not None
