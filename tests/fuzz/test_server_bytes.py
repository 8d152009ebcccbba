"""Fuzzing the server machine with bytes no client should send: whatever arrives, the
machine answers only with well-formed replies and ends in a state, never an exception;
and it gives the same answers however the bytes are cut (RFC 5321 has no message
boundaries on the wire, so neither may the machine)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.smtp.server import ConnectionClosed
from tests.fuzz.conftest import FUZZ
from tests.unit.helpers import drive, drive_pieces, new_session, well_formed, wire

TOKENS = [b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n",
          b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 0 LAST\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
          b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r", b"\n", b"\x00",
          b"hello", b"x" * 600, b"\xc3\xa9", b"\xff"]

hostile = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=40)), max_size=25).map(b"".join)


def _run(data: bytes, pieces: list[bytes] | None = None) -> bytes:
    session = new_session(max_message_size=200)
    result = drive_pieces(session, pieces) if pieces is not None else drive(session, data)
    if not any(isinstance(e, ConnectionClosed) for e, _ in result):
        result += drive(session, b"")  # EOF: the machine must close cleanly too
    for _, reply in result:
        assert reply == b"" or well_formed(reply), reply
    return wire(result)


@FUZZ
@given(hostile)
def test_any_bytes_get_only_well_formed_replies(data: bytes) -> None:
    _run(data)


@FUZZ
@given(hostile, st.data())
def test_any_cut_of_any_bytes_gives_the_same_replies(data: bytes, draw: st.DataObject) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    assert _run(data, pieces) == _run(data)
