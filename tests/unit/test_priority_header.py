"""Volley-Priority (engine/inbound/campaign_tags.py take_fields): a trusted client's
sets the priority; everyone's is taken out of the message; nothing else changes."""

from __future__ import annotations

import pytest

from engine.inbound.campaign_tags import Tags, take_fields

BODY = b"\r\nVolley-Priority: 1 (in the body: text)\r\n"


def test_trusted_priority_is_taken_with_the_campaign_tags() -> None:
    msg = (b"Subject: reset\r\nVolley-Priority: 9\r\nX-Volley-Campaign: pw\r\n"
           b"To: <a@b.test>\r\n" + BODY)
    assert take_fields(msg, "ip", trusted=True) == Tags(
        "pw", "", 9, b"Subject: reset\r\nTo: <a@b.test>\r\n" + BODY)


@pytest.mark.parametrize("field", [b"Volley-Priority: 0", b"VOLLEY-PRIORITY:\t 7 ",
                                   b"volley-priority:\r\n 3"])
def test_case_space_and_folding(field: bytes) -> None:
    tags = take_fields(b"A: 1\r\n" + field + b"\r\n" + BODY, "ip", trusted=True)
    assert tags.priority == int(field.split(b":")[1].strip())
    assert tags.content == b"A: 1\r\n" + BODY


def test_the_last_field_counts_and_bad_values_are_dropped() -> None:
    msg = b"Volley-Priority: 2\r\nVolley-Priority: 8\r\nS: x\r\n" + BODY
    assert take_fields(msg, "ip", trusted=True).priority == 8
    for bad in (b"", b"10", b"-1", b"high", b"9 9", b"\xd9\xa9"):  # the last: an Arabic 9
        tags = take_fields(b"Volley-Priority: " + bad + b"\r\nS: x\r\n" + BODY, "ip", trusted=True)
        assert (tags.priority, tags.content) == (None, b"S: x\r\n" + BODY), bad
    msg = b"Volley-Priority: 9\r\nVolley-Priority: urgent\r\nS: x\r\n" + BODY
    assert take_fields(msg, "ip", trusted=True).priority == 9  # an invalid last one is ignored


def test_an_untrusted_clients_priority_is_removed_and_ignored() -> None:
    msg = b"X-Volley-Campaign: c\r\nVolley-Priority: 9\r\nS: x\r\n" + BODY
    # its X-Volley-* fields mean nothing and stay; its Volley-Priority goes all the same
    assert take_fields(msg, "ip", trusted=False) == Tags(
        "", "", None, b"X-Volley-Campaign: c\r\nS: x\r\n" + BODY)


def test_messages_without_our_fields_come_back_unchanged() -> None:
    for msg in (b"Subject: x\r\nX-Volley-Other: 1\r\n" + BODY, b"Subject: x\r\n",
                b"\r\nVolley-Priority: 9\r\n", b"Volley-Priority-Extra: 9\r\n\r\nb\r\n"):
        for trusted in (True, False):
            tags = take_fields(msg, "ip", trusted=trusted)
            assert tags == Tags("", "", None, msg)
            assert tags.content is msg


def test_a_message_of_the_field_only() -> None:
    assert take_fields(b"Volley-Priority: 4\r\n\r\nbody\r\n", "ip", trusted=False) == \
        Tags("", "", None, b"\r\nbody\r\n")
    assert take_fields(b"Volley-Priority: 4\r\n", "ip", trusted=True) == Tags("", "", 4, b"")
