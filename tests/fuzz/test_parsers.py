"""Fuzzing the parsers that read what a peer sends: the command line parser (server
side), the reply parser (client side), xtext and the DSN parameters.

The property is the same everywhere: any input yields a value or the parser's own
error carrying a well-formed SMTP reply, and nothing else: no IndexError, no
UnicodeError, no hang. Each test replays the corpus first, then generated input.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.smtp.client_replies import ClientProtocolError, RemoteReply, ReplyParser
from engine.smtp.commands import Command, Mail, Rcpt, SmtpSyntaxError, encode, parse_command
from engine.smtp.grammar import xtext_decode, xtext_encode
from engine.smtp.replies import Reply
from tests.fuzz.conftest import FUZZ, corpus

VERBS = [b"MAIL FROM:", b"RCPT TO:", b"EHLO ", b"HELO ", b"BDAT ", b"AUTH ", b"DATA", b"RSET",
         b"NOOP ", b"VRFY ", b"QUIT", b"STARTTLS", b"HELP", b"mail from:", b"EXPN "]
PARAMS = [b" SIZE=", b" BODY=", b" RET=", b" ENVID=", b" NOTIFY=", b" ORCPT=", b" SMTPUTF8",
          b" AUTH=", b" LAST", b" =", b"+", b"<", b">", b"@", b'"', b"\\", b"[", b"]", b":",
          b",", b"%", b"!", b";", b"\xc3\xa9", b"\xff", b"\x00", b"\r", b"\n", b" "]

command_like = st.builds(
    lambda verb, parts: verb + b"".join(parts),
    st.sampled_from(VERBS),
    st.lists(st.one_of(st.sampled_from(PARAMS), st.binary(max_size=12),
                       st.text(alphabet="abc.-+=0123456789", max_size=12).map(str.encode)),
             max_size=12),
)


def _well_formed(reply: Reply) -> None:
    assert 400 <= reply.code <= 599
    assert all("\r" not in line and "\n" not in line for line in reply.lines)


def _parse(raw: bytes, utf8_rcpt: bool) -> None:
    try:
        command = parse_command(raw, utf8_rcpt=utf8_rcpt)
    except SmtpSyntaxError as err:
        _well_formed(err.reply)
        return
    assert isinstance(command, Command)
    if isinstance(command, (Mail, Rcpt)):
        # What was accepted must come back out on the client side as one clean line.
        line = encode(command)
        assert line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2]


@pytest.mark.parametrize("raw", corpus("commands.txt"))
@pytest.mark.parametrize("utf8_rcpt", [False, True])
def test_corpus_commands_parse_or_refuse(raw: bytes, utf8_rcpt: bool) -> None:
    _parse(raw, utf8_rcpt)


@FUZZ
@given(st.one_of(command_like, st.binary(max_size=600)), st.booleans())
def test_any_command_line_parses_or_is_refused_with_a_reply(raw: bytes, utf8_rcpt: bool) -> None:
    _parse(raw, utf8_rcpt)


def _replies(chunks: list[bytes]) -> tuple[list[tuple[int, tuple[str, ...]]], str | None]:
    parser = ReplyParser()
    got: list[tuple[int, tuple[str, ...]]] = []
    for chunk in chunks:
        parser.feed(chunk)
        try:
            while (reply := parser.next_reply()) is not None:
                assert isinstance(reply, RemoteReply) and 200 <= reply.code <= 599
                got.append((reply.code, tuple(reply.lines)))
        except ClientProtocolError as err:
            _well_formed(err.reply)
            return got, err.reply.lines[0]
    return got, None


reply_like = st.lists(
    st.one_of(
        st.builds(lambda c, sep, text: c + sep + text + b"\r\n",
                  st.sampled_from([b"220", b"250", b"354", b"421", b"550", b"999", b"25", b"2500", b"abc"]),
                  st.sampled_from([b" ", b"-", b""]), st.binary(max_size=20)),
        st.binary(max_size=30),
    ),
    max_size=10,
).map(b"".join)


@pytest.mark.parametrize("stream", corpus("replies.txt"))
def test_corpus_replies_parse_or_fail_cleanly(stream: bytes) -> None:
    whole = _replies([stream])
    assert _replies([bytes([b]) for b in stream]) == whole


@FUZZ
@given(reply_like, st.data())
def test_any_reply_stream_parses_the_same_however_it_is_cut(stream: bytes, data: st.DataObject) -> None:
    whole = _replies([stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert _replies(pieces) == whole


@FUZZ
@given(st.integers(1, 4), st.binary(min_size=1, max_size=64))
def test_a_reply_that_never_ends_is_cut_at_a_bound(lines_per_feed: int, filler: bytes) -> None:
    """A server that sends "250-..." for ever: the parser fails with its own error once
    a bound is passed, instead of buffering without end."""
    parser = ReplyParser()
    line = b"250-" + filler.replace(b"\n", b"") + b"\r\n"
    for _ in range(10_000):
        parser.feed(line * lines_per_feed)
        try:
            assert parser.next_reply() is None
        except ClientProtocolError as err:
            _well_formed(err.reply)
            assert parser.buffered < 2_000_000
            return
    raise AssertionError("an endless multi-line reply was never cut")


@FUZZ
@given(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=80))
def test_xtext_round_trips_every_octet_string(value: str) -> None:
    encoded = xtext_encode(value)
    assert encoded.isascii() and "=" not in encoded and " " not in encoded
    assert xtext_decode(encoded) == value


@FUZZ
@given(st.text(max_size=40))
def test_xtext_decode_accepts_or_says_not_xtext(value: str) -> None:
    try:
        decoded = xtext_decode(value)
    except ValueError as err:
        assert "xtext" in str(err)
    else:
        assert isinstance(decoded, str)


@FUZZ
@given(
    st.sampled_from([b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>"]),
    st.lists(st.tuples(st.sampled_from([b"RET", b"ENVID", b"NOTIFY", b"ORCPT", b"SIZE", b"BODY"]),
                       st.one_of(st.none(), st.binary(max_size=24))), max_size=4),
)
def test_dsn_parameters_parse_or_are_refused_with_a_reply(
        head: bytes, params: list[tuple[bytes, bytes | None]]) -> None:
    raw = head + b"".join(b" " + k + (b"=" + v if v is not None else b"") for k, v in params)
    _parse(raw, utf8_rcpt=False)


local_like = st.lists(st.sampled_from(['"', "@", "\\", "%", "!", ":", ",", " ", "a", ".", "<", ">", "é"]),
                      max_size=12).map("".join)


@FUZZ
@given(local_like, st.sampled_from(["here.example", "[127.0.0.1]", "[IPv6:::1]", "x.y-z.example"]),
       st.sampled_from(["", "@evil.example:", "@evil.example,@other.example:"]), st.booleans())
def test_the_domain_after_the_last_at_is_the_one_written_after_the_mailbox(
        local: str, domain: str, route: str, utf8: bool) -> None:
    """P7: whatever the local part holds (quoted @, routes, %, !), an accepted
    address routes to the domain written after it, never to one hidden in it."""
    raw = f"RCPT TO:<{route}{local}@{domain}>".encode()
    try:
        command = parse_command(raw, utf8_rcpt=utf8)
    except SmtpSyntaxError as err:
        _well_formed(err.reply)
        return
    assert isinstance(command, Rcpt)
    assert command.address.rpartition("@")[2] == domain, (raw, command.address)
    assert "evil" not in command.address  # a source route is dropped (RFC 5321 §3.3)
