"""engine.smtp.commands: one line → one Command or SmtpSyntaxError carrying its Reply."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.smtp.commands import (
    Auth,
    Bdat,
    Command,
    Data,
    Ehlo,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rset,
    SmtpSyntaxError,
    StartTls,
    Vrfy,
    encode,
    parse_command,
)
from engine.smtp.grammar import xtext_encode

LOCAL64 = "l" * 64
# 63+1+63+1+63+1+60 = 252: the longest domain that still fits the 256-octet Path
# ("<" + "a" + "@" + domain + ">"), RFC 5321 §4.5.3.1.3.
DOMAIN252 = ".".join(["d" * 63, "e" * 63, "f" * 63, "g" * 60])
DOMAIN256 = ".".join(["d" * 63, "e" * 63, "f" * 63, "g" * 63, "hh"])

# --- valid lines ---------------------------------------------------------------------------
VALID: list[tuple[bytes, Command]] = [
    # MAIL
    (b"MAIL FROM:<a@example.com>", Mail("a@example.com")),
    (b"mail from:<a@example.com>", Mail("a@example.com")),
    (b"MAIL FROM: <a@example.com>", Mail("a@example.com")),  # liberal: space after colon
    (b"MAIL FROM:<>", Mail("")),
    (b"MAIL FROM:<> SIZE=0", Mail("", size=0)),
    (b"MAIL FROM:<a@example.com> SIZE=12345", Mail("a@example.com", size=12345)),
    (b"MAIL FROM:<a@example.com> SIZE=99999999999999999999", Mail("a@example.com", size=10**20 - 1)),
    (b"MAIL FROM:<a@example.com> BODY=8BITMIME", Mail("a@example.com", body="8BITMIME")),
    (b"MAIL FROM:<a@example.com> body=7bit", Mail("a@example.com", body="7BIT")),
    (b"MAIL FROM:<a@example.com> SMTPUTF8", Mail("a@example.com", smtputf8=True)),
    (b"MAIL FROM:<a@example.com> RET=full", Mail("a@example.com", ret="FULL")),
    (b"MAIL FROM:<a@example.com> RET=HDRS", Mail("a@example.com", ret="HDRS")),
    (b"MAIL FROM:<a@example.com> ENVID=QQ314159+2Bx", Mail("a@example.com", envid="QQ314159+x")),
    (b"MAIL FROM:<a@example.com> AUTH=<>", Mail("a@example.com", auth="<>")),
    (b"MAIL FROM:<a@example.com> AUTH=e+3Dmc2@example.com", Mail("a@example.com", auth="e=mc2@example.com")),
    (
        b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x1 AUTH=<>",
        Mail("a@example.com", size=10, body="8BITMIME", smtputf8=True, ret="HDRS", envid="x1", auth="<>"),
    ),
    # source routes: accepted, ignored (RFC 5321 §4.1.2, P7)
    (b"MAIL FROM:<@relay.example:a@example.com>", Mail("a@example.com")),
    (b"MAIL FROM:<@r1.example,@r2.example:a@example.com>", Mail("a@example.com")),
    # quoted local parts
    (b'MAIL FROM:<"john doe"@example.com>', Mail('"john doe"@example.com')),
    (b'MAIL FROM:<"a\\"b\\\\c"@example.com>', Mail('"a\\"b\\\\c"@example.com')),
    (b'MAIL FROM:<"a@b"@example.com>', Mail('"a@b"@example.com')),
    (b"MAIL FROM:<!#$%&'*+-/=?^_`{|}~@example.com>", Mail("!#$%&'*+-/=?^_`{|}~@example.com")),
    # address literals
    (b"MAIL FROM:<a@[192.0.2.1]>", Mail("a@[192.0.2.1]")),
    (b"MAIL FROM:<a@[IPv6:2001:db8::1]>", Mail("a@[IPv6:2001:db8::1]")),
    (b"MAIL FROM:<a@[ipv6:::1]>", Mail("a@[ipv6:::1]")),
    (b"MAIL FROM:<a@[IPv6:::ffff:192.0.2.1]>", Mail("a@[IPv6:::ffff:192.0.2.1]")),
    (b"MAIL FROM:<a@[x-tag:some-content]>", Mail("a@[x-tag:some-content]")),
    # length limits
    (b"MAIL FROM:<" + LOCAL64.encode() + b"@example.com>", Mail(LOCAL64 + "@example.com")),
    (b"MAIL FROM:<a@" + DOMAIN252.encode() + b">", Mail("a@" + DOMAIN252)),
    # SMTPUTF8 (RFC 6531)
    (
        "MAIL FROM:<δοκιμή@παράδειγμα.δοκιμή> SMTPUTF8".encode(),
        Mail("δοκιμή@παράδειγμα.δοκιμή", smtputf8=True),
    ),
    (
        "MAIL FROM:<用户@例子.广告> SMTPUTF8 BODY=8BITMIME".encode(),
        Mail("用户@例子.广告", body="8BITMIME", smtputf8=True),
    ),
    # RCPT
    (b"RCPT TO:<b@example.com>", Rcpt("b@example.com")),
    (b"rcpt to: <b@example.com>", Rcpt("b@example.com")),
    (b"RCPT TO:<@hop.example:b@example.com>", Rcpt("b@example.com")),
    (b"RCPT TO:<b@example.com> NOTIFY=NEVER", Rcpt("b@example.com", notify=("NEVER",))),
    (b"RCPT TO:<b@example.com> NOTIFY=never", Rcpt("b@example.com", notify=("NEVER",))),
    (b"RCPT TO:<b@example.com> NOTIFY=SUCCESS", Rcpt("b@example.com", notify=("SUCCESS",))),
    (b"RCPT TO:<b@example.com> NOTIFY=success,Failure", Rcpt("b@example.com", notify=("SUCCESS", "FAILURE"))),
    (
        b"RCPT TO:<b@example.com> NOTIFY=DELAY,FAILURE,SUCCESS",
        Rcpt("b@example.com", notify=("DELAY", "FAILURE", "SUCCESS")),
    ),
    (b"RCPT TO:<b@example.com> ORCPT=rfc822;b@example.com", Rcpt("b@example.com", orcpt="rfc822;b@example.com")),
    (b"RCPT TO:<b@example.com> ORCPT=rfc822;b+2Bx@example.com", Rcpt("b@example.com", orcpt="rfc822;b+x@example.com")),
    (
        b"RCPT TO:<b@example.com> NOTIFY=FAILURE ORCPT=rfc822;o@example.com",
        Rcpt("b@example.com", notify=("FAILURE",), orcpt="rfc822;o@example.com"),
    ),
    (b'RCPT TO:<"x y"@[IPv6:2001:db8::2]>', Rcpt('"x y"@[IPv6:2001:db8::2]')),
    # DATA / BDAT
    (b"DATA", Data()),
    (b"data", Data()),
    (b"BDAT 0", Bdat(0, last=False)),
    (b"BDAT 100", Bdat(100, last=False)),
    (b"BDAT 0 LAST", Bdat(0, last=True)),
    (b"bdat 5 last", Bdat(5, last=True)),
    (b"BDAT 999999999999999", Bdat(999_999_999_999_999, last=False)),
    # the rest
    (b"EHLO mx.example.com", Ehlo("mx.example.com")),
    (b"ehlo [192.0.2.1]", Ehlo("[192.0.2.1]")),
    (b"EHLO  spaced.example ", Ehlo("spaced.example")),
    (b"HELO mx.example.com", Helo("mx.example.com")),
    (b"RSET", Rset()),
    (b"QUIT", Quit()),
    (b"STARTTLS", StartTls()),
    (b"starttls", StartTls()),
    (b"NOOP", Noop()),
    (b"NOOP ignored argument", Noop()),
    (b"HELP", Help()),
    (b"HELP MAIL", Help()),
    (b"VRFY postmaster", Vrfy("postmaster")),
    (b"AUTH PLAIN", Auth("PLAIN")),
    (b"auth login", Auth("LOGIN")),
    (b"AUTH PLAIN AHVzZXIAcGFzcw==", Auth("PLAIN", "AHVzZXIAcGFzcw==")),
    (b"AUTH PLAIN =", Auth("PLAIN", "=")),
]


@pytest.mark.parametrize(("line", "expected"), VALID, ids=[v[0].decode("utf-8", "replace")[:60] for v in VALID])
def test_valid(line: bytes, expected: Command) -> None:
    assert parse_command(line, utf8_rcpt=False) == expected


# --- invalid lines: (line, code, enhanced) ----------------------------------------------------
INVALID: list[tuple[bytes, int, str]] = [
    # MAIL syntax
    (b"MAIL", 501, "5.5.4"),
    (b"MAIL FROM", 501, "5.5.4"),
    (b"MAIL TO:<a@example.com>", 501, "5.5.4"),
    (b"MAIL FROM:a@example.com", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com>SIZE=1", 501, "5.5.4"),
    (b"MAIL FROM:<>x", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com", 553, "5.1.3"),
    (b"MAIL FROM:<a>", 553, "5.1.3"),
    (b"MAIL FROM:<@example.com>", 553, "5.1.3"),
    (b"MAIL FROM:<a@>", 553, "5.1.3"),
    (b"MAIL FROM:<a..b@example.com>", 553, "5.1.3"),
    (b"MAIL FROM:<.a@example.com>", 553, "5.1.3"),
    (b"MAIL FROM:<a@-example.com>", 553, "5.1.3"),
    (b"MAIL FROM:<a@example-.com>", 553, "5.1.3"),
    (b"MAIL FROM:<a@example..com>", 553, "5.1.3"),
    (b"MAIL FROM:<a b@example.com>", 553, "5.1.3"),
    (b'MAIL FROM:<"unterminated@example.com>', 553, "5.1.3"),
    (b"MAIL FROM:<a@" + b"x" * 64 + b".example>", 553, "5.1.3"),  # label > 63
    (b"MAIL FROM:<@relay.example a@example.com>", 553, "5.1.3"),  # malformed source route
    # address literals
    (b"MAIL FROM:<a@[300.1.1.1]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[192.0.2]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[192.0.2.1.5]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[01.2.3.4]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[IPv6:zz::1]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[IPv6:1::2::3]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[IPv6:192.0.2.1]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[IPv6:fe80::1%eth0]>", 553, "5.1.3"),  # zone ids are not IPv6-addr
    (b"MAIL FROM:<a@[:foo]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[x-tag:]>", 553, "5.1.3"),  # General-address-literal needs 1*dcontent
    (b"MAIL FROM:<a@[]>", 553, "5.1.3"),
    (b"MAIL FROM:<a@[a b]>", 553, "5.1.3"),
    # length limits
    (b"MAIL FROM:<" + b"l" * 65 + b"@example.com>", 553, "5.1.3"),
    (b"MAIL FROM:<a@" + DOMAIN252.encode() + b"x>", 553, "5.1.3"),  # Path 257 octets
    (b"MAIL FROM:<a@" + DOMAIN256.encode() + b">", 553, "5.1.3"),
    # parameters
    (b"MAIL FROM:<a@example.com> SIZE", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SIZE=", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SIZE=abc", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SIZE=-1", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SIZE=1.5", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SIZE=123456789012345678901", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> BODY=BINARYMIME", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> BODY", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SMTPUTF8=yes", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> RET=NONE", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> RET", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> ENVID", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> ENVID=a+2b", 501, "5.5.4"),  # hexchar is upper-case only
    (b"MAIL FROM:<a@example.com> ENVID=a+", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> ENVID=" + b"e" * 101, 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> AUTH", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> AUTH=+ZZ", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> =x", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> -X=1", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> X=a=b", 501, "5.5.4"),
    # duplicate parameters: 501, also when the case differs
    (b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> size=1 SIZE=1", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> SMTPUTF8 SMTPUTF8", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.com> BODY=7BIT BODY=8BITMIME", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> NOTIFY=NEVER NOTIFY=NEVER", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> ORCPT=rfc822;x ORCPT=rfc822;y", 501, "5.5.4"),
    # unknown parameters: 555 5.5.4
    (b"MAIL FROM:<a@example.com> FOO=bar", 555, "5.5.4"),
    (b"MAIL FROM:<a@example.com> XYZZY", 555, "5.5.4"),
    (b"MAIL FROM:<a@example.com> NOTIFY=NEVER", 555, "5.5.4"),
    (b"RCPT TO:<b@example.com> SIZE=10", 555, "5.5.4"),
    (b"RCPT TO:<b@example.com> RET=FULL", 555, "5.5.4"),
    # RCPT syntax
    (b"RCPT", 501, "5.5.4"),
    (b"RCPT FROM:<b@example.com>", 501, "5.5.4"),
    (b"RCPT TO:b@example.com", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com>junk", 501, "5.5.4"),
    (b"RCPT TO:<>", 553, "5.1.3"),
    (b"RCPT TO:<b>", 553, "5.1.3"),
    (b"RCPT TO:<b@[999.0.0.1]>", 553, "5.1.3"),
    (b"RCPT TO:<b@example.com> NOTIFY", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,SUCCESS", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> NOTIFY=SOMETIMES", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> NOTIFY=,", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> ORCPT=no-semicolon", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> ORCPT", 501, "5.5.4"),
    (b"RCPT TO:<b@example.com> ORCPT=rfc822;" + b"o" * 500, 501, "5.5.4"),
    # NUL / 8-bit / non-UTF-8
    (b"NOOP \x00", 500, "5.5.2"),
    (b"MAIL FROM:<a\x00@example.com>", 500, "5.5.2"),
    (b"\x00", 500, "5.5.2"),
    (b"MAIL FROM:<a\xff@example.com> SMTPUTF8", 500, "5.5.2"),  # not UTF-8
    (b"EHLO caf\xc3\xa9.example", 500, "5.5.2"),
    (b"NOOP caf\xc3\xa9", 500, "5.5.2"),
    # RFC 6531 §3.7.4.1: a UTF-8 mailbox without SMTPUTF8 is 553 5.6.7, 8-bit elsewhere not.
    ("MAIL FROM:<δοκιμή@example.com>".encode(), 553, "5.6.7"),
    ("RCPT TO:<δοκιμή@example.com>".encode(), 553, "5.6.7"),  # only when the MAIL had SMTPUTF8
    ("MAIL FROM:<a@example.com> ENVID=é".encode(), 501, "5.5.4"),  # not xtext
    ("RCPT TO:<a@example.com> NOTIFY=é".encode(), 501, "5.5.4"),
    ("maıl FROM:<a@example.com> SMTPUTF8".encode(), 500, "5.5.2"),  # "ı".upper() == "I"
    # DATA / BDAT
    (b"DATA now", 501, "5.5.4"),
    (b"BDAT", 501, "5.5.4"),
    (b"BDAT x", 501, "5.5.4"),
    (b"BDAT -1", 501, "5.5.4"),
    (b"BDAT 1 FIRST", 501, "5.5.4"),
    (b"BDAT 1 LAST x", 501, "5.5.4"),
    (b"BDAT  1", 501, "5.5.4"),
    (b"BDAT 1 ", 501, "5.5.4"),
    (b"BDAT 1234567890123456", 501, "5.5.4"),
    # the rest
    (b"EHLO", 501, "5.5.4"),
    (b"EHLO   ", 501, "5.5.4"),
    (b"EHLO a b", 501, "5.5.4"),
    (b"HELO", 501, "5.5.4"),
    (b"RSET now", 501, "5.5.4"),
    (b"QUIT now", 501, "5.5.4"),
    (b"STARTTLS now", 501, "5.5.4"),
    (b"VRFY", 501, "5.5.4"),
    (b"AUTH", 501, "5.5.4"),
    (b"AUTH PLAIN a b", 501, "5.5.4"),
    (b"EXPN staff", 502, "5.5.1"),
    (b"EXPN", 502, "5.5.1"),
    (b"TURN", 502, "5.5.1"),
    (b"ETRN example.com", 502, "5.5.1"),
    (b"SEND FROM:<a@example.com>", 502, "5.5.1"),
    (b"SOML FROM:<a@example.com>", 502, "5.5.1"),
    (b"SAML FROM:<a@example.com>", 502, "5.5.1"),
    (b"FOO", 500, "5.5.1"),
    (b"", 500, "5.5.1"),
    (b" MAIL FROM:<a@example.com>", 500, "5.5.1"),
    (b"GET / HTTP/1.1", 500, "5.5.1"),
    (b"MAILFROM:<a@example.com>", 500, "5.5.1"),
]


@pytest.mark.parametrize(
    ("line", "code", "enhanced"), INVALID, ids=[v[0].decode("utf-8", "replace")[:60] for v in INVALID]
)
def test_invalid(line: bytes, code: int, enhanced: str) -> None:
    with pytest.raises(SmtpSyntaxError) as info:
        parse_command(line)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)


def test_utf8_rcpt_only_when_the_mail_had_smtputf8() -> None:
    line = "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή> NOTIFY=NEVER".encode()
    with pytest.raises(SmtpSyntaxError) as info:
        parse_command(line, utf8_rcpt=False)
    assert (info.value.reply.code, info.value.reply.enhanced) == (553, "5.6.7")  # RFC 6531 §3.7.4.1
    assert parse_command(line, utf8_rcpt=True) == Rcpt("δοκιμή@παράδειγμα.δοκιμή", notify=("NEVER",))
    # An ASCII line is fine either way.
    assert parse_command(b"RCPT TO:<b@example.com>", utf8_rcpt=True) == Rcpt("b@example.com")


def test_utf8_local_part_counts_octets() -> None:
    # 32 two-octet characters = 64 octets: fits; 33 = 66 octets: does not.
    ok = "é" * 32
    assert parse_command(f"MAIL FROM:<{ok}@example.com> SMTPUTF8".encode()).address == f"{ok}@example.com"
    with pytest.raises(SmtpSyntaxError) as info:
        parse_command(f"MAIL FROM:<{ok}é@example.com> SMTPUTF8".encode())
    assert info.value.reply.code == 553


def test_syntax_error_detail_becomes_reply_text() -> None:
    with pytest.raises(SmtpSyntaxError) as info:
        parse_command(b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2")
    assert info.value.reply.code == 501
    assert "SIZE" in info.value.reply.lines[0]
    assert str(info.value) == info.value.reply.lines[0]


# --- client side: encode ∘ parse ------------------------------------------------------------
def _without_auth(command: Command) -> Command:
    # encode() does not forward MAIL's AUTH= (RFC 4954 §5: only a trusted relay may);
    # the parsed value is kept for the log only.
    return msgspec.structs.replace(command, auth=None) if isinstance(command, Mail) else command


@pytest.mark.parametrize(("line", "expected"), VALID, ids=[v[0].decode("utf-8", "replace")[:60] for v in VALID])
def test_encode_round_trip(line: bytes, expected: Command) -> None:
    parsed = parse_command(line, utf8_rcpt=True)
    wire = encode(parsed)
    assert wire.endswith(b"\r\n") and wire.count(b"\r\n") == 1
    assert parse_command(wire[:-2], utf8_rcpt=True) == _without_auth(parsed)


def test_encode_exact_lines() -> None:
    assert encode(Mail("")) == b"MAIL FROM:<>\r\n"
    assert encode(Mail("a@b.example", size=5, body="8BITMIME", smtputf8=True, ret="HDRS", envid="a+b=c")) == (
        b"MAIL FROM:<a@b.example> SIZE=5 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=a+2Bb+3Dc\r\n"
    )
    assert encode(Rcpt("b@x.example", notify=("SUCCESS", "DELAY"), orcpt="rfc822;b@x.example")) == (
        b"RCPT TO:<b@x.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@x.example\r\n"
    )
    assert encode(Bdat(10, last=True)) == b"BDAT 10 LAST\r\n"
    assert encode(Bdat(0, last=False)) == b"BDAT 0\r\n"
    assert encode(StartTls()) == b"STARTTLS\r\n"
    assert encode(Data()) == b"DATA\r\n"
    assert encode(Ehlo("h.example")) == b"EHLO h.example\r\n"
    assert encode(Helo("h.example")) == b"HELO h.example\r\n"
    assert encode(Auth("PLAIN", "AAAA")) == b"AUTH PLAIN AAAA\r\n"
    assert encode(Vrfy("x")) == b"VRFY x\r\n"
    for cls, text in ((Rset, b"RSET"), (Noop, b"NOOP"), (Quit, b"QUIT"), (Help, b"HELP")):
        assert encode(cls()) == text + b"\r\n"


# --- hypothesis: never anything but a Command or SmtpSyntaxError -------------------------------
VERBS = [b"MAIL FROM:", b"RCPT TO:", b"MAIL FROM:<", b"RCPT TO:<", b"DATA", b"BDAT ", b"EHLO ", b"HELO ",
         b"RSET", b"NOOP ", b"QUIT", b"HELP", b"VRFY ", b"STARTTLS", b"AUTH ", b"EXPN "]


def _total(line: bytes, utf8_rcpt: bool) -> None:
    try:
        result = parse_command(line, utf8_rcpt=utf8_rcpt)
    except SmtpSyntaxError as err:
        assert 500 <= err.reply.code <= 555 and err.reply.enhanced.startswith("5.")
    else:
        assert isinstance(result, Command)


@settings(max_examples=200)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_parse_or_syntax_error(line: bytes, utf8_rcpt: bool) -> None:
    _total(line, utf8_rcpt)


@settings(max_examples=200)
@given(st.sampled_from(VERBS), st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)), st.booleans())
def test_verb_plus_junk_parse_or_syntax_error(verb: bytes, tail: bytes, utf8_rcpt: bool) -> None:
    _total(verb + tail, utf8_rcpt)


@settings(max_examples=200)
@given(
    st.sampled_from([b"MAIL FROM:<a@b.example> ", b"RCPT TO:<a@b.example> "]),
    st.lists(
        st.tuples(
            st.sampled_from(["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "NOTIFY", "ORCPT", "X-Y"]),
            st.one_of(st.none(), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)),
        ),
        max_size=4,
    ),
)
def test_parameter_soup_parse_or_syntax_error(prefix: bytes, params: list[tuple[str, str | None]]) -> None:
    tail = " ".join(k if v is None else f"{k}={v}" for k, v in params)
    _total(prefix + tail.encode(), True)


# --- hypothesis: addresses built from the ABNF ------------------------------------------------
ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
LETDIG = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

atom = st.text(st.sampled_from(ATEXT), min_size=1, max_size=12)
dot_string = st.lists(atom, min_size=1, max_size=4).map(".".join)
qtext = st.characters(codec="ascii", min_codepoint=32, max_codepoint=126, exclude_characters='"\\')
quoted_pair = st.characters(codec="ascii", min_codepoint=32, max_codepoint=126).map(lambda c: "\\" + c)
quoted_string = st.lists(st.one_of(qtext, quoted_pair), max_size=12).map(lambda parts: '"' + "".join(parts) + '"')
local_part = st.one_of(dot_string, quoted_string).filter(lambda s: len(s) <= 64)


@st.composite
def labels(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from(LETDIG))
    middle = draw(st.text(st.sampled_from(LETDIG + "-"), max_size=10))
    if not middle:
        return first
    return first + middle + draw(st.sampled_from(LETDIG))


domain = st.lists(labels(), min_size=1, max_size=4).map(".".join)
ipv4_literal = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
ipv6_literal = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]")
mailbox = st.tuples(local_part, st.one_of(domain, domain, ipv4_literal, ipv6_literal)).map("@".join)
source_route = st.lists(domain, min_size=1, max_size=2).map(lambda ds: ",".join("@" + d for d in ds) + ":")
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30)


@st.composite
def mail_commands(draw: st.DrawFn) -> Mail:
    return Mail(
        draw(st.one_of(st.just(""), mailbox)),
        size=draw(st.one_of(st.none(), st.integers(0, 10**20 - 1))),
        body=draw(st.sampled_from([None, "7BIT", "8BITMIME"])),
        smtputf8=draw(st.booleans()),
        ret=draw(st.sampled_from([None, "FULL", "HDRS"])),
        envid=draw(st.one_of(st.none(), printable)),
    )


@st.composite
def rcpt_commands(draw: st.DrawFn) -> Rcpt:
    notify = draw(
        st.one_of(
            st.none(),
            st.just(("NEVER",)),
            st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, max_size=3, unique=True).map(tuple),
        )
    )
    orcpt = draw(st.one_of(st.none(), mailbox.map(lambda a: "rfc822;" + a)))
    return Rcpt(draw(mailbox), notify=notify, orcpt=orcpt)


@settings(max_examples=200)
@given(mail_commands(), st.one_of(st.just(""), source_route))
def test_generated_mail_parses_and_round_trips(mail: Mail, route: str) -> None:
    wire = encode(mail)
    assert parse_command(wire[:-2]) == mail
    if mail.address:
        # The same command with a source route in front: accepted, and the route ignored.
        routed = wire.replace(b"FROM:<", f"FROM:<{route}".encode(), 1)
        assert parse_command(routed[:-2]) == mail


@settings(max_examples=200)
@given(rcpt_commands())
def test_generated_rcpt_parses_and_round_trips(rcpt: Rcpt) -> None:
    assume(len(xtext_encode(rcpt.orcpt or "")) <= 500)  # RFC 3461 §4.2 limit is on the wire
    wire = encode(rcpt)
    assert parse_command(wire[:-2]) == rcpt
