"""Queue records and ids: round trips, versioning, domain extraction."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.queue.ids import IdAllocator, SequenceExhausted, id_bytes, id_text, split_id
from engine.queue.records import (
    BOUNCED,
    DELIVERED,
    PENDING,
    MessageRecord,
    Recipient,
    decode_record,
    domain_of,
    encode_record,
    pending_domains,
)

# Any unicode text, including "@", quotes, CR/LF and NUL: records must carry it as data (P9).
text = st.text(max_size=80)
recipients = st.builds(
    Recipient,
    address=text,
    orcpt=st.none() | text,
    notify=st.none() | st.tuples(text) | st.tuples(text, text),
    state=st.sampled_from([0, 1, 2, 3]),
    attempts=st.integers(0, 1000),
    next_attempt=st.floats(0, 4e9),
    last_reply=text,
)
records = st.builds(
    MessageRecord,
    id=st.binary(min_size=8, max_size=8),
    sender=text,
    recipients=st.lists(recipients, min_size=1, max_size=5),
    received_at=st.floats(0, 4e9),
    size=st.integers(0, 2**40),
    body_type=st.none() | st.sampled_from(["7BIT", "8BITMIME", "BINARYMIME"]),
    smtputf8=st.booleans(),
    ret=st.none() | st.sampled_from(["FULL", "HDRS"]),
    envid=st.none() | text,
    client_ip=text,
    helo=text,
    auth_user=st.none() | text,
)


@settings(max_examples=100, deadline=None)
@given(records)
def test_record_round_trip(rec: MessageRecord) -> None:
    data = encode_record(rec)
    assert decode_record(data) == rec


def test_version_is_first_array_element() -> None:
    rec = MessageRecord(b"\0" * 8, "a@b", [Recipient("c@d")], 1.0, 10)
    raw = msgspec.msgpack.decode(encode_record(rec))
    assert raw[0] == 1 and raw[3][0][0] == 1
    assert rec.v == 1 and Recipient.v == 1


def test_old_array_with_fewer_fields_takes_defaults() -> None:
    # A record written before trailing fields existed must still decode.
    raw = msgspec.msgpack.encode([1, b"\1" * 8, "s@x", [[1, "r@y"]], 2.0, 5])
    rec = decode_record(raw)
    assert rec.recipients == [Recipient("r@y")] and rec.auth_user is None and rec.helo == ""


def test_unknown_version_refused() -> None:
    raw = msgspec.msgpack.encode([2, b"\1" * 8, "s@x", [], 2.0, 5])
    with pytest.raises(msgspec.ValidationError):
        decode_record(raw)


@pytest.mark.parametrize(
    "address, domain",
    [
        ("user@Example.COM", "example.com"),
        ("", ""),
        ("postmaster", ""),
        ('"a@b"@Example.org', "example.org"),
        ("a@b@C", "c"),
        ("x@BÜCHER.de", "bücher.de"),
        ("x@[192.0.2.1]", "[192.0.2.1]"),
        ("x@", ""),
    ],
)
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


@given(st.text(), st.text())
def test_domain_of_takes_text_after_last_at(local: str, dom: str) -> None:
    if "@" not in dom:
        assert domain_of(f"{local}@{dom}") == dom.lower()


def test_pending_domains_due_times() -> None:
    rec = MessageRecord(
        b"\0" * 8,
        "",
        [
            Recipient("a@X.com"),
            Recipient("b@x.com", next_attempt=500.0),
            Recipient("c@y.com", next_attempt=900.0),
            Recipient("d@z.com", state=DELIVERED),
            Recipient("e@y.com", state=BOUNCED, next_attempt=1.0),
        ],
        received_at=100.0,
        size=1,
    )
    assert pending_domains(rec) == {"x.com": 100.0, "y.com": 900.0}
    rec.recipients[0].state = DELIVERED  # mutable by design
    assert pending_domains(rec)["x.com"] == 500.0
    assert rec.recipients[1].state == PENDING


def test_id_allocator_layout_and_text() -> None:
    a = IdAllocator(0x01020304)
    first, second = a.next(), a.next()
    assert first == bytes([1, 2, 3, 4, 0, 0, 0, 1]) and second[-1] == 2
    assert split_id(second) == (0x01020304, 2)
    assert id_text(first) == "0102030400000001"
    assert id_bytes("0102030400000001") == first
    assert id_bytes(id_text(second).upper()) == second


@pytest.mark.parametrize("bad", ["", "0102", "010203040000000g", " 102030400000001", "01020304000000011"])
def test_id_bytes_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        id_bytes(bad)


def test_id_allocator_bounds() -> None:
    with pytest.raises(ValueError):
        IdAllocator(2**32)
    with pytest.raises(ValueError):
        id_text(b"short")
    a = IdAllocator(7)
    a._seq = iter([2**32 - 1, 2**32])  # type: ignore[assignment]  # skip 4 billion ids
    assert a.next()[4:] == b"\xff\xff\xff\xff"
    with pytest.raises(SequenceExhausted):
        a.next()
