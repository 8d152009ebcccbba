"""engine.smtp.replies: the catalogue is named by code (ARCHITECTURE rule 13); wire format."""

from __future__ import annotations

import re

import pytest

from engine.smtp import replies
from engine.smtp.replies import Reply, format_reply

CATALOGUE = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
NAME = re.compile(r"R(?P<code>[2-5][0-9]{2})_[A-Z0-9_]+")
ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def test_catalogue_is_not_empty() -> None:
    assert len(CATALOGUE) > 30


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_name_matches_code(name: str) -> None:
    reply = CATALOGUE[name]
    m = NAME.fullmatch(name)
    assert m is not None, f"{name}: replies are named R<code>_<WHAT>"
    assert int(m.group("code")) == reply.code


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_enhanced_code_agrees_with_class(name: str) -> None:
    reply = CATALOGUE[name]
    if reply.enhanced == "":
        # RFC 2034 §3: only the greeting, 334 and 354 go without one.
        assert reply.code in (220, 334, 354), name
        return
    assert ENHANCED.fullmatch(reply.enhanced), name
    assert reply.enhanced[0] == str(reply.code)[0], name


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_each_catalogue_reply_is_one_well_formed_line(name: str) -> None:
    wire = CATALOGUE[name].to_bytes()
    assert wire.endswith(b"\r\n") and wire.count(b"\r\n") == 1
    assert b"\r" not in wire[:-2] and b"\n" not in wire[:-2]
    assert len(wire) <= 512  # RFC 5321 §4.5.3.1.5 reply line


def test_single_line() -> None:
    assert format_reply(Reply(250, "2.0.0", "OK")) == b"250 2.0.0 OK\r\n"
    assert Reply(250, "2.0.0", "OK").to_bytes() == b"250 2.0.0 OK\r\n"


def test_multi_line_without_enhanced_code() -> None:
    assert format_reply(Reply(250, "", ("a", "b"))) == b"250-a\r\n250 b\r\n"
    assert format_reply(Reply(250, "", ("mx.example", "PIPELINING", "8BITMIME"))) == (
        b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    )


def test_multi_line_enhanced_code_on_each_line() -> None:
    # RFC 2034 §4: the enhanced code is repeated on every line of a multi-line reply.
    assert format_reply(Reply(550, "5.1.1", ("no such user", "try another"))) == (
        b"550-5.1.1 no such user\r\n550 5.1.1 try another\r\n"
    )


def test_greeting_and_challenge_have_no_enhanced_code() -> None:
    assert Reply(220, "", "mx ESMTP").to_bytes() == b"220 mx ESMTP\r\n"
    assert replies.R334_EMPTY.to_bytes() == b"334 \r\n"


def test_utf8_text_is_encoded() -> None:
    assert Reply(250, "2.0.0", "Grüße").to_bytes() == "250 2.0.0 Grüße\r\n".encode()


def test_lines_and_with_text() -> None:
    reply = Reply(501, "5.5.4", "Syntax")
    assert reply.lines == ("Syntax",)
    changed = reply.with_text(("one", "two"))
    assert (changed.code, changed.enhanced, changed.lines) == (501, "5.5.4", ("one", "two"))
    assert reply.text == "Syntax"  # frozen: with_text makes a new Reply


def test_is_positive() -> None:
    assert replies.R354_START_DATA.is_positive
    assert replies.R250_OK.is_positive
    assert not replies.R421_TOO_MANY_ERRORS.is_positive
    assert not replies.R554_NO_VALID_RCPTS.is_positive
