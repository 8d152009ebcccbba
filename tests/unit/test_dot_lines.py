"""Large messages (issue 15): what the receiver learns about a body's dotted lines, and
the content parts the client writes.

The server machine records whether any line of a message starts with "."
(`Envelope.dot_lines`, from the one search it makes instead of unstuffing blindly); the
queue record keeps it and the client skips its stuffing scan when it is False. A DKIM
prefix and the body go out as parts of one scatter write, never joined. Every property
runs the client's bytes through the real ServerSession, which must receive exactly
prefix + body, also fed one octet at a time.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.queue.records import MessageRecord, Recipient, decode_record, encode_record
from engine.smtp.buffer import END_OF_DATA, dot_line_in, find_end, has_dot_line
from engine.smtp.client import Capabilities, Envelope, Transaction, dot_stuff
from engine.smtp.client import Recipient as EnvelopeRecipient
from engine.smtp.envelope import data_parts
from engine.smtp.replies import Reply
from engine.smtp.server import Event, MessageReceived, ServerSession
from tests.unit.helpers import drive_pieces, messages, split_at
from tests.unit.test_client import BODIES, MODES, converse, server_session

OK = Reply(250, "2.0.0", "OK")
GO = Reply(354, "", "Go ahead")
BIG = b"".join(b"line %06d of a large message, no dot at its start\r\n" % i for i in range(2000))


def dotted(content: bytes) -> bool:
    """The truth, by splitting into lines (independent of the code's regex search)."""
    return any(line.startswith(b".") for line in content.split(b"\r\n"))


class Recorder:
    """A `decide` that notes the session's dot_lines when a message arrives."""

    def __init__(self, session: ServerSession) -> None:
        self.session = session
        self.seen: list[bool] = []

    def __call__(self, event: Event) -> Reply | None:
        if isinstance(event, MessageReceived):
            self.seen.append(self.session.envelope.dot_lines)
        return None


def receive(body: bytes, *, chunked: bool, cuts: list[int], bytewise: bool) -> tuple[bytes, bool]:
    """Send `body` to a real ServerSession by DATA (stuffed) or BDAT; returns the content
    it received and the dot_lines it recorded."""
    session = server_session()
    recorder = Recorder(session)
    head = b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.org>\r\n"
    if chunked:
        wire = head + b"BDAT %d LAST\r\n" % len(body) + body
    else:
        wire = head + b"DATA\r\n" + dot_stuff(body) + b".\r\n"
    pieces = [wire[i:i + 1] for i in range(len(wire))] if bytewise else split_at(wire, cuts)
    (message,) = messages(drive_pieces(session, pieces, recorder))
    assert len(recorder.seen) == 1
    return message.content, recorder.seen[0]


@pytest.mark.parametrize("chunked", [False, True])
@given(body=BODIES, cuts=st.lists(st.integers(0, 3000), max_size=4), bytewise=st.booleans())
@settings(max_examples=60, deadline=None)
def test_the_server_records_whether_a_line_starts_with_a_dot(
        chunked: bool, body: bytes, cuts: list[int], bytewise: bool) -> None:
    content, dot_lines = receive(body, chunked=chunked, cuts=cuts, bytewise=bytewise)
    assert content == body
    assert dot_lines == dotted(body)


@pytest.mark.parametrize("body", [
    b".first line\r\nsecond\r\n", b"a\r\n.\r\nb\r\n", b"a\r\n..\r\n", b"a.\r\nb.c\r\n",
    b"", b"\r\n", b"x\r\n" + BIG + b".last\r\n", BIG,
])
@pytest.mark.parametrize("chunked", [False, True])
def test_edges_of_the_dot_record(body: bytes, chunked: bool) -> None:
    content, dot_lines = receive(body, chunked=chunked, cuts=[7, 100, 5000], bytewise=False)
    assert content == body
    assert dot_lines == dotted(body)


_HEADER = st.builds(
    lambda dot, name: (b"." if dot else b"") + b"DKIM-Signature: v=1; d=" + name + b"\r\n\t b=abc\r\n",
    st.booleans(), st.sampled_from([b"a.test", b"b.test"]))
PREFIXES = st.lists(_HEADER, max_size=2).map(b"".join)


@pytest.mark.parametrize("mode", list(MODES))
@given(prefix=PREFIXES, body=BODIES, known=st.booleans(), cuts=st.lists(st.integers(0, 3000), max_size=3))
@settings(max_examples=60, deadline=None)
def test_prefix_and_body_arrive_exactly(mode: str, prefix: bytes, body: bytes, known: bool,
                                        cuts: list[int]) -> None:
    """With dot_lines given (as the receiver recorded it) or unknown (None): the server
    gets prefix + body byte for byte, and SIZE counts both."""
    caps = MODES[mode]
    whole = prefix + body
    envelope = Envelope("s@example.com", [EnvelopeRecipient("r@example.org")], body,
                        body_8bit=not body.isascii(), prefix=prefix,
                        dot_lines=dotted(whole) if known else None)
    tx = Transaction(envelope, caps, first_on_connection=True)
    if tx.precheck() is not None:
        assert not body.isascii()
        return
    log = converse(server_session(), [tx], cuts=cuts)
    (message,) = messages(log)
    assert message.content == whole
    assert tx.done and tx.clean and [r.code for r in tx.outcomes] == [250]


def _pipelined_to_354(envelope: Envelope) -> list[bytes]:
    tx = Transaction(envelope, Capabilities(pipelining=True), first_on_connection=True)
    tx.initial_parts()
    assert tx.on_reply_parts(OK) is None and tx.on_reply_parts(OK) is None
    parts = tx.on_reply_parts(GO)
    assert parts is not None
    return parts


def test_a_body_without_dot_lines_is_sent_as_it_is_not_copied() -> None:
    rcpts = [EnvelopeRecipient("r@example.org")]
    prefix = b"DKIM-Signature: v=1; b=x\r\n"
    # DATA, known clean: the stored body object itself, after the prefix; "." last.
    parts = _pipelined_to_354(Envelope("s@example.com", rcpts, BIG, prefix=prefix, dot_lines=False))
    assert parts[0] == prefix and parts[1] is BIG and parts[2] == b".\r\n"
    # Unknown: scanned, and still not copied when nothing needs stuffing.
    parts = _pipelined_to_354(Envelope("s@example.com", rcpts, BIG))
    assert parts[0] is BIG and parts[1] == b".\r\n"
    # Pipelined BDAT: the whole group in one write, the body part is the stored one.
    tx = Transaction(Envelope("s@example.com", rcpts, BIG, prefix=prefix),
                     Capabilities(pipelining=True, chunking=True), first_on_connection=True)
    head, body = tx.initial_parts()
    assert body is BIG
    assert head.endswith(b"BDAT %d LAST\r\n" % (len(prefix) + len(BIG)) + prefix)


def test_data_parts_stuff_each_part_when_dot_lines_are_not_ruled_out() -> None:
    assert data_parts(b".h: 1\r\n", b".b\r\n", None) == [b"..h: 1\r\n", b"..b\r\n", b".\r\n"]
    assert data_parts(b".h: 1\r\n", b".b\r\n", True) == [b"..h: 1\r\n", b"..b\r\n", b".\r\n"]
    assert data_parts(b"", b"b\r\n", False) == [b"b\r\n", b".\r\n"]


def test_a_prefix_must_end_with_crlf() -> None:
    with pytest.raises(ValueError, match="CRLF"):
        Transaction(Envelope("s@example.com", [EnvelopeRecipient("r@example.org")], b"b\r\n",
                             prefix=b"X-A: 1"), Capabilities(), first_on_connection=True)


def test_has_dot_line() -> None:
    assert has_dot_line(b".a") and has_dot_line(b"a\r\n.b") and has_dot_line(BIG + b".\r\n")
    assert not has_dot_line(b"a.b\r\nc.\r\n") and not has_dot_line(BIG) and not has_dot_line(b"")


@pytest.mark.parametrize("before", [0, 1, 7, 8, 9, 50])
@pytest.mark.parametrize("tail", [b".x\r\n", b"y\r\n", b"a.\r\n.\r\n"])
def test_dots_inside_lines_before_a_dot_line(before: int, tail: bytes) -> None:
    """Past the first dots found one by one the search takes over: same answers."""
    body = b"".join(b"a.b. c\r\n" for _ in range(before)) + tail
    assert has_dot_line(body) == dotted(body)
    content, dot_lines = receive(body, chunked=False, cuts=[], bytewise=False)
    assert content == body and dot_lines == dotted(body)


def test_a_record_written_before_the_field_decodes_as_unknown() -> None:
    record = MessageRecord(b"id", "s@example.com", [Recipient("r@example.org")], 1.0, 10,
                           dot_lines=False)
    assert decode_record(encode_record(record)).dot_lines is False
    old = msgspec.msgpack.decode(encode_record(record))[:-1]  # the array without the field
    assert decode_record(msgspec.msgpack.encode(old)).dot_lines is None
    assert MessageRecord(b"id", "s@example.com", [], 1.0, 10).dot_lines is None


_SOUP = st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b"\r\n.", b".\r\n"]),
                 max_size=80).map(b"".join)


@given(data=_SOUP, start=st.integers(0, 200), as_bytearray=st.booleans())
@settings(max_examples=400, deadline=None)
def test_find_end_is_find_and_dot_line_in_is_the_regex(data: bytes, start: int, as_bytearray: bool) -> None:
    """The dot-driven searches equal the plain ones on any mix of dots and line ends,
    from any start (past the first dots they hand over to the plain search)."""
    buf = bytearray(data) if as_bytearray else data
    assert find_end(buf, start) == data.find(END_OF_DATA, start)
    end = len(data)
    expected = any(data[i - 1:i + 1] == b"\n." for i in range(max(start, 0) + 1, end))
    assert dot_line_in(buf, start, end) == expected


def test_the_record_s_fact_and_the_prefix_reach_every_part_of_a_job() -> None:
    """record.dot_lines and Job.prefix go into the Envelope, also of a job split by
    max_recipients (pool_queue.split_job), and the body object is never copied."""
    from engine.delivery.job import Job, build_envelope
    from engine.delivery.pool_queue import split_job
    from engine.dns.mx import Route, RouteHost

    route = Route("d.test", (RouteHost("mx.d.test", 10, ("192.0.2.1",)),), site_key="mx.d.test")
    rcpts = [Recipient(f"r{i}@d.test") for i in range(5)]
    record = MessageRecord(b"id", "s@x.test", rcpts, 1.0, len(BIG), dot_lines=False)
    job = Job(record, BIG, list(range(5)), "d.test", route, lambda r: None, 0.0, prefix=b"H: 1\r\n")
    parts = split_job(job, 2)
    assert [p.indices for p in parts] == [[0, 1], [2, 3], [4]]
    for part in parts:
        envelope = build_envelope(part)
        assert envelope.dot_lines is False and envelope.prefix == b"H: 1\r\n"
        assert envelope.body is BIG
    record.dot_lines = None
    assert build_envelope(job).dot_lines is None
