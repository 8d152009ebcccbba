"""take_tags (engine/inbound/campaign_tags.py): the X-Volley-* fields come out of the
header section and nothing else changes, whatever the message's shape."""

from __future__ import annotations

from engine.inbound.campaign_tags import take_tags


def test_untagged_mail_is_returned_as_is() -> None:
    msg = b"Subject: x\r\nX-Volley-Other: 1\r\n\r\nX-Volley-Campaign: in the body\r\n"
    assert take_tags(msg, "ip") == ("", "", msg)


def test_tags_are_taken_out_folding_and_case_included() -> None:
    msg = (b"x-volley-campaign: c1\r\nSubject: x\r\nX-VOLLEY-TENANT:\r\n\tt.1\r\n"
           b"X-Volley-Campaign: c2\r\n\r\nbody\r\n")
    assert take_tags(msg, "ip") == ("c2", "t.1", b"Subject: x\r\n\r\nbody\r\n")


def test_a_message_of_tags_only() -> None:
    assert take_tags(b"X-Volley-Campaign: c\r\n\r\nbody\r\n", "ip") == ("c", "", b"\r\nbody\r\n")
    assert take_tags(b"X-Volley-Campaign: c\r\n", "ip") == ("c", "", b"")
    assert take_tags(b"A: b\r\nX-Volley-Tenant: t\r\n", "ip") == ("", "t", b"A: b\r\n")


def test_bad_values_are_dropped() -> None:
    for value in (b"", b"a b", b"x" * 65, b"caf\xc3\xa9", b"a/b"):
        campaign, _, rest = take_tags(b"X-Volley-Campaign: " + value + b"\r\nS: 1\r\n\r\nb\r\n", "ip")
        assert (campaign, rest) == ("", b"S: 1\r\n\r\nb\r\n")
