"""VERP tokens and Message-IDs (engine/mail/verp.py): round trips, case, what is not ours."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from engine.mail import verp

FBL = "fbl@bounces.example.com"


def test_token_round_trip_and_alphabet() -> None:
    token = verp.encode_token("Ann.Lee@example.org", "spring-2026", "acme")
    assert re.fullmatch(r"[a-z0-9]+", token)
    assert verp.decode_token(token) == ("Ann.Lee@example.org", "spring-2026", "acme")
    # A receiver that upper-cases (or keeps) the local part still hands back our token.
    assert verp.decode_token(token.upper()) == ("Ann.Lee@example.org", "spring-2026", "acme")


@given(st.emails(), st.text(max_size=64), st.text(max_size=64))
def test_token_round_trip_any_text(recipient: str, campaign: str, tenant: str) -> None:
    campaign, tenant = campaign.replace("\0", ""), tenant.replace("\0", "")
    token = verp.encode_token(recipient, campaign, tenant)
    assert re.fullmatch(r"[a-z2-7]+", token)
    assert verp.decode_token(token) == (recipient, campaign, tenant)


@given(st.text(max_size=200))
def test_decode_never_raises(text: str) -> None:
    verp.decode_token(text)
    verp.token_of_message_id(text)
    verp.token_of_address(FBL, text)


def test_not_a_token() -> None:
    assert verp.decode_token("") is None
    assert verp.decode_token("abc") is None
    assert verp.decode_token("hello+world") is None
    # base32 of something without the two NUL separators or an @
    assert verp.decode_token("nbswy3dp") is None


def test_verp_address_and_back() -> None:
    token = verp.encode_token("a@example.org", "c1")
    address = verp.verp_address(FBL, token)
    assert address == f"fbl+{token}@bounces.example.com"
    assert verp.token_of_address(FBL, address) == token
    assert verp.token_of_address(FBL, address.upper()) == token
    assert verp.token_of_address(FBL, FBL) is None
    assert verp.token_of_address(FBL, f"other+{token}@bounces.example.com") is None
    assert verp.token_of_address(FBL, f"fbl+{token}@elsewhere.example") is None
    assert verp.token_of_address("", address) is None
    assert verp.is_feedback_address(FBL, "FBL@Bounces.Example.COM")
    assert verp.is_feedback_address(FBL, address.upper())
    assert not verp.is_feedback_address(FBL, "someone@bounces.example.com")
    assert not verp.is_feedback_address("", FBL)


def test_local_part_may_pass_64_octets_but_never_the_path_limit() -> None:
    # RFC 5321 §4.5.3.1.1 (64) is exceeded by most tokens; §4.5.3.1.3 (256 path) never.
    token = verp.encode_token("a.rather.long.name@example.org", "newsletter-2026-05")
    address = verp.verp_address(FBL, token)
    assert len(address.partition("@")[0]) > 64
    huge = verp.encode_token("x" * 200 + "@example.org")
    assert verp.verp_address(FBL, huge) == FBL


def test_message_id() -> None:
    token = verp.encode_token("a@example.org", "c1", "t1")
    mid = verp.message_id(token, "mx.example.com")
    assert mid.startswith(f"<{token}.") and mid.endswith("@mx.example.com>")
    assert verp.message_id(token, "h") != verp.message_id(token, "h")
    assert verp.token_of_message_id(mid) == token
    assert verp.token_of_message_id(mid.upper()) == token
    assert verp.token_of_message_id("<CAF1234.5678@mail.gmail.com>") is None
    assert verp.token_of_message_id("no-at-sign") is None


def test_our_smtp_parser_takes_a_long_verp_recipient() -> None:
    # RFC 5321 §4.5.3.1: a recipient's local part is held to the path limit only.
    from engine.smtp.commands import Rcpt, SmtpSyntaxError, parse_command

    address = verp.verp_address(FBL, verp.encode_token("a.rather.long.name@example.org", "c" * 40))
    assert len(address.partition("@")[0]) > 64
    assert parse_command(f"RCPT TO:<{address}>".encode()) == Rcpt(address)
    try:
        parse_command(f"RCPT TO:<{'l' * 250}@example.com>".encode())
    except SmtpSyntaxError as err:
        assert err.reply.code == 553
    else:
        raise AssertionError("a path over 256 octets was accepted")
