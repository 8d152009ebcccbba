"""The load generator's wire side: one callback-driven state machine per connection.

The connection is a plain `asyncio.Protocol` driven by callbacks, not a coroutine per
session: a load generator shares the machine's cores with the server it measures, so
every future, task wake-up and per-message allocation it avoids is CPU left to the
server. Everything a message needs on the wire (its command block and body) is built
once up front (`engine.lab.blast.shared`) and reused; replies are parsed with `bytes.find`.

With --tls the session upgrades with STARTTLS after the first EHLO (the handshake
is the one coroutine: `loop.start_tls`), and with --auth it authenticates (PLAIN or
LOGIN, engine.lab.blast.auth) after the (second) EHLO; both happen once per connection,
never per message.

With PIPELINING the client chains transactions as RFC 2920 allows (and Postfix's
client does): after the 354 it writes the body, the end of data *and* the next
message's MAIL/RCPT.../DATA in one write, then reads the final reply and the next
group's replies, in order. Steady state is one write and one read per message; without
chaining (`chain=False`) it is two of each.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from engine.lab.blast.auth_steps import AuthSteps
from engine.lab.blast.lockstep import LockStepSteps, positive
from engine.lab.blast.message import HELO_NAME
from engine.lab.blast.shared import UNLIMITED_QUOTA, Shared

__all__ = ["BlastConnection"]


class BlastConnection(AuthSteps, LockStepSteps, asyncio.Protocol):
    """One SMTP client connection: EHLO once, messages until told to stop, QUIT.

    Each step sets `need` (replies to wait for) and `handler` (called with them), so
    pipelined and lock-step sessions share the reply parser.
    """

    # Slots: attribute access on the hot path stays a fixed-offset load.
    __slots__ = (
        "s", "done", "quota", "transport", "buf", "replies", "need", "handler", "deadline",
        "ticket", "chained", "completed", "pipe", "chain", "rset", "server_closing", "rcpt_ok",
        "rcpt_first_bad", "rcpt_index", "t_data_end", "tls", "authed", "aborted", "ended",
        "upgrade",
    )

    def __init__(self, shared: Shared, done: asyncio.Future[int], quota: int = UNLIMITED_QUOTA) -> None:
        self.s = shared
        self.done = done
        self.quota = quota  # messages this connection may still take (Shared.reserve)
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.replies: list[tuple[int, bytes]] = []
        self.need = 1
        self.handler: Callable[[list[tuple[int, bytes]]], None] = self._on_greeting
        self.deadline = math.inf
        self.ticket = -1  # message in flight, -1 when none
        self.chained = -1  # message whose group rode along with `ticket`'s end of data
        self.completed = 0  # messages that reached a final outcome on this connection
        self.pipe = False
        self.chain = False  # pipelining, and chaining transactions (RFC 2920)
        self.rset = False  # the previous transaction left state on the server
        self.server_closing = False
        self.rcpt_ok = 0
        self.rcpt_first_bad = 0
        self.rcpt_index = 0
        self.t_data_end = 0.0
        self.tls = False
        self.authed = False
        self.aborted = False  # _fail ran: its error is the one counted
        self.ended = False
        self.upgrade: asyncio.Future[None] | None = None  # the STARTTLS handshake task

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
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        """The connection is gone: count what was in flight, wake the session. Once."""
        if self.ended:
            return
        self.ended = True
        self.s.live.discard(self)
        if self.ticket >= 0 and self.server_closing:
            # A 421 came in place of replies still awaited: the server refused the
            # message(s) in flight and hung up, as it said it would.
            self._finish(421, False)
            if self.chained >= 0:
                self._finish(421, False)
                self.chained = -1
        elif self.ticket >= 0:  # message(s) in flight: they failed
            self._lose()
            self.s.error("connection lost" if exc is None else type(exc).__name__)
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

    def _lose(self) -> None:
        """Count the message(s) in flight as failed: the current one, and a chained one."""
        self.s.failed += (self.ticket >= 0) + (self.chained >= 0)
        self.ticket = self.chained = -1

    def _fail(self, kind: str) -> None:
        """Count an error against the message(s) in flight (if any) and drop the connection."""
        self.aborted = True
        self._lose()
        self.s.error(kind)
        self.need = 0
        self.deadline = math.inf
        if self.transport is not None:
            self.transport.abort()

    def _authenticated(self) -> None:
        """AUTH succeeded (235): the connection may send its messages now."""
        self.authed = True
        self._next_message()

    def expire(self) -> None:
        self._fail("timeout")

    def abort(self) -> None:
        """Close at once, counting nothing (the run was cancelled: don't leak sockets)."""
        if self.upgrade is not None:
            self.upgrade.cancel()
        if self.transport is not None:
            self.transport.abort()

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
            return self._give_up(f"greeting {r[0][0]}")
        self._write(f"EHLO {HELO_NAME}\r\n".encode())
        self._expect(1, self._on_ehlo)

    def _on_ehlo(self, r: list[tuple[int, bytes]]) -> None:
        code, text = r[0]
        if code != 250:
            return self._give_up(f"ehlo {code}")
        s = self.s
        ext = text.upper()
        if s.tls_context is not None and not self.tls:
            if b"STARTTLS" not in ext:
                return self._give_up("STARTTLS not offered")
            self._write(b"STARTTLS\r\n")
            self._expect(1, self._on_starttls)
            return
        # Pipeline only if asked *and* offered (RFC 2920 §3.1).
        self.pipe = s.pipelining and b"PIPELINING" in ext
        self.chain = self.pipe and s.chain
        if s.auth is not None and not self.authed:
            return self._authenticate(text)
        self._next_message()

    def _on_starttls(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        if code != 220:
            return self._give_up(f"starttls {code}")
        # RFC 3207 §4.2: nothing said before the handshake counts after it.
        self.buf = b""
        self.replies.clear()
        self.deadline = self.s.loop.time() + self.s.timeout  # the handshake's deadline
        self.upgrade = asyncio.ensure_future(self._upgrade())

    async def _upgrade(self) -> None:
        s = self.s
        assert self.transport is not None and s.tls_context is not None
        try:
            transport = await s.loop.start_tls(
                self.transport, self, s.tls_context, server_hostname=s.tls_name
            )
        except Exception as err:  # (anything: a session must never wait on a dead task)
            transport, kind = None, type(err).__name__
        else:  # uvloop may return (None, or a dead transport) when the connection was lost
            kind = "connection lost"  # mid-handshake, aborted by the sweeper included
        if transport is None or self.aborted or transport.is_closing():
            # The app protocol hears no connection_lost during a handshake: end here.
            if not self.aborted:
                s.error(f"tls: {kind}")
            if self.transport is not None:
                self.transport.abort()
            self._end(None)
            return
        self.transport = transport
        self.tls = True
        self._write(f"EHLO {HELO_NAME}\r\n".encode())
        self._expect(1, self._on_ehlo)

    def _next_message(self) -> None:
        s = self.s
        if self.server_closing:
            self.deadline = math.inf
            assert self.transport is not None
            self.transport.close()
            return
        ticket = s.take() if self.quota > 0 else -1
        if ticket < 0:
            self._quit()
            return
        self.quota -= 1
        self.ticket = ticket
        # (Without a rate cap a ticket is always due now: no clock read per message.)
        if s.rate > 0 and (due := s.due(ticket)) > s.loop.time() + 0.0005:
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
        if not positive(mail):
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
            if positive(code):
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
        s = self.s
        s.sent += 1
        nxt = self._chain_ticket() if self.chain else -1
        if nxt >= 0:
            # RFC 2920: the next transaction's group follows the end of data, same write.
            s.attempted += 1
            self.chained = nxt
            if s.fixed:
                self._write(s.chained[nxt % len(s.blocks)])
            else:
                self._write(s.body_for(self.ticket) + s.joined[nxt % len(s.blocks)])
        else:
            self._write(s.body if s.fixed else s.body_for(self.ticket))
        self.t_data_end = time.perf_counter()
        self._expect(1, self._on_final)

    def _chain_ticket(self) -> int:
        """A ticket for a message that may start now on this connection, else -1."""
        if self.server_closing or self.quota <= 0:
            return -1
        ticket = self.s.take_now()
        if ticket >= 0:
            self.quota -= 1
        return ticket

    def _on_final(self, r: list[tuple[int, bytes]]) -> None:
        code = r[0][0]
        self.s.latencies.append(time.perf_counter() - self.t_data_end)
        self._finish(code, positive(code))
        nxt = self.chained
        if nxt < 0:
            self._next_message()
            return
        self.chained = -1
        self.ticket = nxt
        if code == 421:  # the server is closing: the chained group will not be served
            self._finish(421, False)
            self._next_message()
            return
        # The chained group's replies follow (typically already in this read); from here
        # on it is an ordinary pipelined transaction, refusals and RSET included.
        self._expect(self.s.recipients + 2, self._on_pipelined)

    # -- end ----------------------------------------------------------------------

    def _give_up(self, kind: str) -> None:
        """Session setup failed (no message started on it): count why, end politely."""
        self.s.error(kind)
        self._quit()

    def _quit(self) -> None:
        self._write(b"QUIT\r\n")
        self._expect(1, self._on_quit)

    def _on_quit(self, r: list[tuple[int, bytes]]) -> None:
        self.deadline = math.inf
        if self.transport is not None:
            self.transport.close()
