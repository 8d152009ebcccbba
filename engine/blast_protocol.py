"""The load generator's wire side: message bytes, shared counters, one state machine per connection.

The connection is a plain `asyncio.Protocol` driven by callbacks, not a coroutine per
session: a load generator shares the machine's cores with the server it measures, so
every future, task wake-up and per-message allocation it avoids is CPU left to the
server. Everything a message needs on the wire (its command block and body) is built
once up front and reused; per message the client does one or two writes and parses
replies with `bytes.find`.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
import time
from typing import Callable

SENDER = "blast@volley.test"
HELO_NAME = "blast.volley.test"
_LINE = 76  # filler characters per body line (RFC 5322 recommends <= 78 with CRLF)
_FILLER = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3)[:_LINE]


@functools.lru_cache(maxsize=16)
def make_message(size: int) -> bytes:
    """A message of exactly `size` bytes (headers included) ending in CRLF; min ~200 bytes.

    No line starts with "." so the bytes need no dot-stuffing and can be written as is;
    the sink (and the server) see exactly these bytes after unstuffing.
    """
    date = email.utils.formatdate(usegmt=True)
    head = (
        f"From: <{SENDER}>\r\n"
        f"To: <u0@d0.example>\r\n"
        f"Subject: volley blast {size}\r\n"
        f"Message-ID: <blast-{size}@volley.test>\r\n"
        f"Date: {date}\r\n"
        "\r\n"
    ).encode()
    room = size - len(head)
    if room <= 0:
        return head
    if room < 3:  # too little for a filler line ("x\r\n"): pad the subject instead
        return head.replace(b"\r\nMessage-ID", b"x" * room + b"\r\nMessage-ID", 1)
    lines: list[bytes] = []
    while room > 0:
        n = min(_LINE + 2, room)
        if 0 < room - n < 3:  # keep the last line at least "x\r\n"
            n = room - 3
        lines.append(_FILLER[: n - 2] + b"\r\n")
        room -= n
    return head + b"".join(lines)


def command_blocks(recipients: int, domains: int) -> list[list[bytes]]:
    """Per message i, its commands are blocks[i % domains]: MAIL, RCPT..., DATA lines.

    Recipient j of the whole run is u{j % (D*R)}@d{j % D}.example, so consecutive
    recipients walk the domains and the pattern repeats every `domains` messages:
    precomputing D blocks removes all per-message formatting.
    """
    r, d = max(1, recipients), max(1, domains)
    span = r * d
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    blocks = []
    for m in range(d):
        rcpts = [
            f"RCPT TO:<u{j}@d{j % d}.example>\r\n".encode()
            for j in ((m * r + k) % span for k in range(r))
        ]
        blocks.append([mail, *rcpts, b"DATA\r\n"])
    return blocks


class Shared:
    """State shared by all connections of one run: tickets, message bytes, counters.

    Plain attributes and dicts, no locks: everything runs on one event loop thread.
    """

    def __init__(
        self,
        *,
        messages: int,
        recipients: int,
        domains: int,
        size: int,
        pipelining: bool,
        rate: float,
        duration: float,
        timeout: float,
        per_session: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self.total = messages
        self.pipelining = pipelining
        self.rate = rate
        self.timeout = timeout
        self.per_session = per_session
        self.blocks = command_blocks(recipients, domains)
        self.joined = [b"".join(b) for b in self.blocks]  # pipelined form: one write
        self.recipients = max(1, recipients)
        self.body = make_message(size) + b".\r\n"  # body + end of data: one write
        self.started = loop.time()
        self.stop_at = self.started + duration if duration > 0 else math.inf
        self.next_ticket = 0
        # Counters reported at the end.
        self.attempted = 0
        self.sent = 0
        self.accepted = 0
        self.failed = 0
        self.refused: dict[int, int] = {}
        self.rcpt_refused: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.connections = 0
        self.latencies: list[float] = []
        self.live: set[BlastConnection] = set()

    def take(self) -> int:
        """The next message's ticket, or -1 when the run is out of messages or time."""
        t = self.next_ticket
        if t >= self.total:
            return -1
        if self.stop_at != math.inf and self.due(t) >= self.stop_at:
            return -1
        self.next_ticket = t + 1
        return t

    def due(self, ticket: int) -> float:
        """Loop time at which `ticket` may start under the rate cap (start time if none)."""
        if self.rate <= 0:
            return max(self.started, self.loop.time())
        return self.started + ticket / self.rate

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def refuse(self, code: int) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def sweep(self) -> None:
        """Abort connections whose awaited reply is overdue (one timer per run, not per reply)."""
        now = self.loop.time()
        for conn in [c for c in self.live if c.deadline < now]:
            conn.expire()


def _positive(code: int) -> bool:
    return 200 <= code < 300


class BlastConnection(asyncio.Protocol):
    """One SMTP client connection: EHLO once, messages until told to stop, QUIT.

    Each step sets `need` (replies to wait for) and `handler` (called with them), so
    pipelined and lock-step sessions share the reply parser.
    """

    def __init__(self, shared: Shared, done: asyncio.Future[int]) -> None:
        self.s = shared
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.replies: list[tuple[int, bytes]] = []
        self.need = 1
        self.handler: Callable[[list[tuple[int, bytes]]], None] = self._on_greeting
        self.deadline = math.inf
        self.ticket = -1  # message in flight, -1 when none
        self.completed = 0  # messages that reached a final outcome on this connection
        self.pipe = False
        self.rset = False  # the previous transaction left state on the server
        self.server_closing = False
        self.rcpt_ok = 0
        self.rcpt_first_bad = 0
        self.rcpt_index = 0
        self.t_data_end = 0.0

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.s.connections += 1
        self.s.live.add(self)
        self._expect(1, self._on_greeting)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        start = 0  # first line of the reply being assembled
        n = len(buf)
        replies = self.replies
        while pos < n:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            if end - pos >= 4 and buf[pos + 3] == 45:  # "250-...": continuation line
                pos = end + 2
                continue
            try:
                code = int(buf[pos : pos + 3])
            except ValueError:
                self._fail("protocol")
                return
            if code == 421:
                self.server_closing = True
            replies.append((code, buf[start:end]))
            pos = start = end + 2
        self.buf = buf[start:]
        while self.need and len(replies) >= self.need:
            got = replies[: self.need]
            del replies[: self.need]
            self.need = 0
            self.handler(got)
            if self.transport is None:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.live.discard(self)
        if self.ticket >= 0:  # a message was in flight: it failed
            self.s.failed += 1
            self.s.error("connection lost" if exc is None else type(exc).__name__)
            self.ticket = -1
        elif self.need and not self.server_closing and self.handler != self._on_quit:
            self.s.error("connection lost")
        self.transport = None
        if not self.done.done():
            self.done.set_result(self.completed)

    # -- plumbing --------------------------------------------------------------------

    def _expect(self, n: int, handler: Callable[[list[tuple[int, bytes]]], None]) -> None:
        self.need = n
        self.handler = handler
        self.deadline = self.s.loop.time() + self.s.timeout

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _fail(self, kind: str) -> None:
        """Count an error against the message in flight (if any) and drop the connection."""
        if self.ticket >= 0:
            self.s.failed += 1
            self.ticket = -1
        self.s.error(kind)
        self.need = 0
        self.deadline = math.inf
        if self.transport is not None:
            self.transport.abort()

    def expire(self) -> None:
        self._fail("timeout")

    def _finish(self, code: int, accepted: bool) -> None:
        """Record the final outcome of the message in flight."""
        if accepted:
            self.s.accepted += 1
        else:
            self.s.refuse(code)
        self.ticket = -1
        self.completed += 1

    # -- session -----------------------------------------------------------------------

    def _on_greeting(self, r: list[tuple[int, bytes]]) -> None:
        if r[0][0] != 220:
            self.s.error(f"greeting {r[0][0]}")
            self._quit()
            return
        self._write(f"EHLO {HELO_NAME}\r\n".encode())
        self._expect(1, self._on_ehlo)

    def _on_ehlo(self, r: list[tuple[int, bytes]]) -> None:
        code, text = r[0]
        if code != 250:
            self.s.error(f"ehlo {code}")
            self._quit()
            return
        # Pipeline only if asked *and* offered (RFC 2920 §3.1).
        self.pipe = self.s.pipelining and b"PIPELINING" in text.upper()
        self._next_message()

    def _next_message(self) -> None:
        s = self.s
        if self.server_closing:
            self.deadline = math.inf
            assert self.transport is not None
            self.transport.close()
            return
        if s.per_session and self.completed >= s.per_session:
            self._quit()
            return
        ticket = s.take()
        if ticket < 0:
            self._quit()
            return
        self.ticket = ticket
        due = s.due(ticket)
        if due > s.loop.time() + 0.0005:
            self.deadline = math.inf  # waiting on our own rate cap, not on the server
            s.loop.call_at(due, self._start)
        else:
            self._start()

    def _start(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # lost while waiting for the rate cap; connection_lost counted it
        s = self.s
        s.attempted += 1
        i = self.ticket % len(s.blocks)
        if self.pipe:
            # One write: [RSET] MAIL RCPT... DATA; replies arrive together too.
            extra = 1 if self.rset else 0
            self._write(b"RSET\r\n" + s.joined[i] if self.rset else s.joined[i])
            self.rset = False
            self._expect(s.recipients + 2 + extra, self._on_pipelined if not extra else self._on_pipelined_after_rset)
        elif self.rset:
            self.rset = False
            self._write(b"RSET\r\n")
            self._expect(1, lambda r: self._send_mail())
        else:
            self._send_mail()

    # -- pipelined transaction --------------------------------------------------------

    def _on_pipelined_after_rset(self, r: list[tuple[int, bytes]]) -> None:
        self._on_pipelined(r[1:])

    def _on_pipelined(self, r: list[tuple[int, bytes]]) -> None:
        mail, data = r[0][0], r[-1][0]
        if not _positive(mail):
            self._finish(mail, False)  # RCPT/DATA got 503s: nothing more to count
            if data == 354:  # a broken server opened DATA anyway: close it empty
                self.rset = True
                self._write(b".\r\n")
                self._expect(1, lambda _: self._next_message())
                return
            self._next_message()
            return
        ok, first_bad = 0, 0
        refused = self.s.rcpt_refused
        for code, _ in r[1:-1]:
            if _positive(code):
                ok += 1
            else:
                refused[code] = refused.get(code, 0) + 1
                first_bad = first_bad or code
        if data != 354:
            self._finish(first_bad if not ok else data, False)
            self.rset = True  # MAIL (and maybe RCPTs) were accepted: clear them
            self._next_message()
            return
        if not ok:  # RFC 2920 §3.1: DATA accepted with no recipients: send just "."
            self._finish(first_bad, False)
            self._write(b".\r\n")
            self._expect(1, lambda _: self._next_message())
            return
        self._send_body()

    def _send_body(self) -> None:
        self.s.sent += 1
        self._write(self.s.body)
        self.t_data_end = time.perf_counter()
        self._expect(1, self._on_final)

    def _on_final(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        self.s.latencies.append(time.perf_counter() - self.t_data_end)
        self._finish(code, _positive(code))
        self._next_message()

    # -- lock-step transaction ------------------------------------------------------

    def _send_mail(self) -> None:
        self._write(self.s.blocks[self.ticket % len(self.s.blocks)][0])
        self._expect(1, self._on_mail)

    def _on_mail(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if not _positive(code):
            self._finish(code, False)
            self._next_message()
            return
        self.rcpt_ok, self.rcpt_first_bad, self.rcpt_index = 0, 0, 1
        self._send_rcpt()

    def _send_rcpt(self) -> None:
        self._write(self.s.blocks[self.ticket % len(self.s.blocks)][self.rcpt_index])
        self._expect(1, self._on_rcpt)

    def _on_rcpt(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if _positive(code):
            self.rcpt_ok += 1
        else:
            self.s.rcpt_refused[code] = self.s.rcpt_refused.get(code, 0) + 1
            self.rcpt_first_bad = self.rcpt_first_bad or code
        self.rcpt_index += 1
        if self.rcpt_index <= self.s.recipients:
            self._send_rcpt()
        elif not self.rcpt_ok:  # nobody to send to: don't issue DATA
            self._finish(self.rcpt_first_bad, False)
            self.rset = True
            self._next_message()
        else:
            self._write(b"DATA\r\n")
            self._expect(1, self._on_data)

    def _on_data(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if code != 354:
            self._finish(code, False)
            self.rset = True
            self._next_message()
            return
        self._send_body()

    # -- end ----------------------------------------------------------------------

    def _quit(self) -> None:
        self._write(b"QUIT\r\n")
        self._expect(1, self._on_quit)

    def _on_quit(self, r: list[tuple[int, bytes]]) -> None:
        self.deadline = math.inf
        if self.transport is not None:
            self.transport.close()
