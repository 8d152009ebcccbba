"""engine.inbound.decisions: the inbound decisions as plain functions over session
facts (a real ServerSession driven by bytes, a real ListenerConfig), no sockets."""

from __future__ import annotations

import pytest

from engine.config import ListenerConfig
from engine.inbound import decisions
from engine.inbound.decisions import ReceivedHeader
from engine.smtp.commands import Ehlo, Helo
from engine.smtp.replies import (
    R235_AUTH_OK,
    R421_AUTH_FAILURES,
    R502_NOT_IMPLEMENTED,
    R504_AUTH_MECHANISM,
    R535_AUTH_FAILED,
    R538_ENCRYPTION_REQUIRED,
)
from engine.smtp.server import ServerSession
from tests.unit.helpers import drive, new_session

STARTTLS_OPTIONAL_AUTH = ListenerConfig(tls="starttls", auth="optional")


def _ehlo(listener: ListenerConfig, *, tls_active: bool, tls_available: bool) -> tuple[str, ...]:
    reply = decisions.greeting_reply(
        Ehlo("client.example"),
        hostname="mx.example",
        max_message_size=1000,
        listener=listener,
        tls_active=tls_active,
        tls_available=tls_available,
    )
    assert reply.code == 250 and reply.enhanced == ""  # RFC 2034 §3
    return reply.lines


def _transaction(session: ServerSession, *rcpts: str, mail: str = "MAIL FROM:<a@example.com>") -> None:
    data = f"EHLO client.example\r\n{mail}\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts)
    drive(session, data.encode())
    assert session.envelope.mail is not None and len(session.envelope.rcpts) == len(rcpts)


# --- EHLO ----------------------------------------------------------------------------


def test_helo_is_one_line_with_the_hostname() -> None:
    reply = decisions.greeting_reply(
        Helo("client.example"), hostname="mx.example", max_message_size=1000,
        listener=ListenerConfig(), tls_active=False, tls_available=False,
    )
    assert reply.lines == ("mx.example",)


def test_ehlo_lists_the_size_limit_and_no_tls_or_auth_by_default() -> None:
    lines = _ehlo(ListenerConfig(), tls_active=False, tls_available=True)
    assert lines[0] == "mx.example greets client.example"
    assert "SIZE 1000" in lines and "PIPELINING" in lines
    assert not any(line.startswith(("STARTTLS", "AUTH")) for line in lines)


def test_starttls_is_offered_only_with_a_certificate_and_before_tls() -> None:
    assert "STARTTLS" in _ehlo(STARTTLS_OPTIONAL_AUTH, tls_active=False, tls_available=True)
    assert "STARTTLS" not in _ehlo(STARTTLS_OPTIONAL_AUTH, tls_active=False, tls_available=False)
    assert "STARTTLS" not in _ehlo(STARTTLS_OPTIONAL_AUTH, tls_active=True, tls_available=True)


def test_auth_is_offered_under_tls_or_when_plaintext_is_allowed() -> None:
    assert "AUTH PLAIN LOGIN" not in _ehlo(STARTTLS_OPTIONAL_AUTH, tls_active=False, tls_available=True)
    assert "AUTH PLAIN LOGIN" in _ehlo(STARTTLS_OPTIONAL_AUTH, tls_active=True, tls_available=True)
    plaintext = ListenerConfig(auth="optional", allow_plaintext_auth=True)
    assert "AUTH PLAIN LOGIN" in _ehlo(plaintext, tls_active=False, tls_available=False)


# --- AUTH ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "tls_active", "mechanism", "expected"),
    [
        (ListenerConfig(), True, "PLAIN", R502_NOT_IMPLEMENTED),
        (STARTTLS_OPTIONAL_AUTH, False, "PLAIN", R538_ENCRYPTION_REQUIRED),
        (STARTTLS_OPTIONAL_AUTH, True, "CRAM-MD5", R504_AUTH_MECHANISM),
        (STARTTLS_OPTIONAL_AUTH, True, "PLAIN", None),
        (STARTTLS_OPTIONAL_AUTH, True, "LOGIN", None),
    ],
)
def test_auth_refusal(listener: ListenerConfig, tls_active: bool, mechanism: str, expected: object) -> None:
    assert decisions.auth_refusal(listener, tls_active, mechanism) == expected


def test_auth_result_counts_failures_up_to_the_limit() -> None:
    assert decisions.auth_result(True, 2, 3) is R235_AUTH_OK
    assert decisions.auth_result(False, 2, 3) is R535_AUTH_FAILED
    assert decisions.auth_result(False, 3, 3) is R421_AUTH_FAILURES


# --- the Received: header and the queue record ------------------------------------


def test_received_header_names_client_server_protocol_id_and_recipient() -> None:
    session = new_session()
    _transaction(session, "b@example.org")
    header = ReceivedHeader().render(session, "192.0.2.1", "mx.example", "", "0123456789abcdef")
    text = header.decode()
    assert text.startswith(
        "Received: from client.example ([192.0.2.1])\r\n"
        "\tby mx.example (Volley) with ESMTP id 0123456789abcdef\r\n"
        "\tfor <b@example.org>;\r\n\t"
    )
    assert text.endswith("\r\n")
    assert all(len(line) <= 78 for line in text.split("\r\n"))


def test_received_header_follows_session_facts_that_change() -> None:
    session = new_session()
    _transaction(session, "b@example.org", "c@example.org")
    received = ReceivedHeader()
    first = received.render(session, "192.0.2.1", "mx.example", "", "1")
    assert b" with ESMTP id 1;" in first  # two recipients: no "for" clause
    session.authenticated("alice")
    second = received.render(session, "192.0.2.1", "mx.example", "TLSv1.3", "2")
    assert b" with ESMTPA id 2\r\n\t(using TLSv1.3);" in second


def test_received_header_protocol_for_smtputf8() -> None:
    session = new_session()
    _transaction(session, "b@example.org", mail="MAIL FROM:<a@example.com> SMTPUTF8")
    header = ReceivedHeader().render(session, "192.0.2.1", "mx.example", "", "1")
    assert b" with UTF8SMTP id 1" in header


def test_hop_count_looks_at_the_header_section_only() -> None:
    content = (b"Received: from a\r\nSubject: x\r\nreceived: from b\r\n\r\n"
               b"Received: in the body, not counted\r\n")
    assert decisions.hop_count(content) == 2
    assert decisions.hop_count(b"Subject: x\r\n\r\nbody\r\n") == 0


def test_queue_record_carries_the_envelope_and_session_facts() -> None:
    session = new_session()
    _transaction(session, "b@example.org", mail="MAIL FROM:<a@example.com> RET=HDRS ENVID=xyz")
    record = decisions.queue_record(b"\0" * 8, session, 1234, "192.0.2.1")
    assert record.sender == "a@example.com"
    assert [r.address for r in record.recipients] == ["b@example.org"]
    assert (record.size, record.client_ip, record.helo) == (1234, "192.0.2.1", "client.example")
    assert (record.ret, record.envid, record.auth_user) == ("HDRS", "xyz", None)
    assert record.received_at > 0
