"""The SMTP sink's protocol: a fast, scriptable SMTP receiver (`volley sink`, test peers).

    sink = await start_sink(script=lambda verb, arg: "550 5.1.1 no" if "bad" in arg else None)
    ...  # point a client at sink.port
    await sink.wait_for(10, timeout=5)
    assert sink.messages[0].rcpt_tos == ["a@b.example"]
    await sink.close()

It processes every complete command line of a read and answers them in one write, as
a pipelining server does, and (with `keep_segments`) records each read in `segments` so a
test can check how a client grouped its commands. `script(verb, arg)` may replace any
reply: verb is the upper-cased command ("MAIL", "RCPT", "DATA", "BDAT", ...), or "." for
the end of a message (arg is then the message size); return a reply line (or lines
joined by "\\r\\n"), None for the default, or `NO_REPLY` to answer nothing at all (a
server that hangs). A 421 reply closes the connection after it is sent.

`faults` (a `Faults`) makes it a drill target: a seeded random verdict per transaction
at the end of data (defer 451, reject 550, or drop the connection without a reply) and
a latency before the end-of-data reply, which never blocks the loop (a timer; the
connection's later pipelined commands wait behind it, as they would on a real server).

`record=False` keeps only counters (`accepted`, `deferred`, `rejected`, `disconnected`,
`connections`): no per-message objects, for long runs at thousands of messages a second.
`on_message(mail_from, rcpt_tos, data, tls)` is called for each accepted message;
`on_accepted()` too, but it costs no copy of the data (for counting hooks).

Optional: `auth={"user": "password"}` makes it a smarthost that advertises AUTH PLAIN only
under TLS, refuses AUTH in plaintext (538) and MAIL before AUTH (530); `max_live` is the
most connections that were open at once.

The state all connections share (`Sink`, `SinkMessage`, `Faults`) is in engine.lab.sink.state;
the default reply to each command (and the AUTH rules) in engine.lab.sink.replies.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time

from engine.lab.sink.replies import _BDAT, SinkReplies
from engine.lab.sink.state import (
    ACCEPT,
    DISCONNECT,
    END_REPLIES,
    NO_REPLY,
    Faults,
    OnAccepted,
    OnMessage,
    Script,
    Sink,
    SinkMessage,
)

__all__ = ["NO_REPLY", "Faults", "OnMessage", "Script", "Sink", "SinkMessage", "SinkProtocol",
           "start_sink", "start_sinks"]
_ADDR = re.compile(r"(?i)^(?:FROM|TO):\s*<([^>]*)>")


class SinkProtocol(SinkReplies, asyncio.Protocol):
    """One SMTP connection of a sink: a command/data/BDAT state machine over `buf`."""

    def __init__(self, sink: Sink, *, pipelining: bool, chunking: bool,
                 starttls_context: ssl.SSLContext | None, script: Script | None,
                 auth: dict[str, str] | None = None) -> None:
        self.sink = sink
        self.auth = auth
        self.authed = False
        self.pipelining = pipelining
        self.chunking = chunking
        self.tls_ctx = starttls_context
        self.script = script
        # Decided once: the hot path of a counting sink never copies message bytes.
        self.keep_data = sink.record or sink.on_message is not None or script is not None
        self.latency = sink.faults.latency if sink.faults is not None else 0.0
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.tls = False
        self.peer = ""
        self.ehlo = ""
        self.mode = "command"  # "command", "data", "bdat", "tls" (upgrading), "wait", "closed"
        self.bdat_left = 0
        self.bdat_last = False
        self.bdat_refusal = ""  # a refused chunk is read and dropped, then this is sent
        self.scan = 0  # where the next search for the end-of-data starts
        self.body = bytearray()
        self._upgrading: asyncio.Future[None] | None = None  # keeps the task alive
        self._delayed: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        sink = self.sink
        sink.connections += 1
        sink.live.add(self)
        if len(sink.live) > sink.max_live:
            sink.max_live = len(sink.live)
        self._send([self._reply("BANNER", "", "220 sink.test ESMTP volley sink")])

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.live.discard(self)
        self.transport = None
        if self._delayed is not None:
            self._delayed.cancel()

    def _reply(self, verb: str, arg: str, default: str) -> str:
        if self.script is not None:
            chosen = self.script(verb, arg)
            if chosen is not None:
                return chosen
        return default

    def _send(self, replies: list[str]) -> None:
        if self.transport is None or not replies:
            return
        if self.script is not None:  # only scripts can produce these shapes
            replies = [r.replace("\r\n", "\n").replace("\n", "\r\n") for r in replies if r != NO_REPLY]
            if not replies:
                return
        self.transport.write(("\r\n".join(replies) + "\r\n").encode())
        if any(r.startswith("421") for r in replies):
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.sink.keep_segments:
            self.sink.segments.append(bytes(data))
        self.buf += data
        if self.mode == "command" or self.mode == "data" or self.mode == "bdat":
            self._process()

    def _process(self) -> None:
        replies: list[str] = []
        buf = self.buf
        while self.transport is not None:
            mode = self.mode
            if mode == "command":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line = buf[:end].decode("utf-8", "replace")
                del buf[: end + 2]
                self._command(line, replies)
            elif mode == "data":
                if not self._data(replies):
                    break
            elif mode == "bdat":
                if not self._bdat(replies):
                    break
            else:  # "tls", "wait", "closed": nothing more is read now
                break
        self._send(replies)  # all replies to one read in one write

    def _data(self, replies: list[str]) -> bool:
        # The buffer was seeded with the CRLF before the data, so "\r\n.\r\n" also finds
        # an empty message, and "\r\n.." unstuffs the first line too.
        end = self.buf.find(b"\r\n.\r\n", self.scan)
        if end < 0:
            self.scan = max(0, len(self.buf) - 4)
            return False
        raw = bytes(self.buf[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:] if self.keep_data else b""
        del self.buf[: end + 5]
        self.scan = 0
        self.mode = "command"
        self._finish_message(raw, replies)
        return True

    def _bdat(self, replies: list[str]) -> bool:
        take = min(self.bdat_left, len(self.buf))
        if not self.bdat_refusal:
            self.body += self.buf[:take]
        del self.buf[:take]
        self.bdat_left -= take
        if self.bdat_left:
            return False
        self.mode = "command"
        if self.bdat_refusal:
            # The transaction failed; the client must RSET (or MAIL) before another one.
            replies.append(self.bdat_refusal)
            self.bdat_refusal = ""
            self.body = bytearray()
        elif self.bdat_last:
            self._finish_message(bytes(self.body), replies)
        else:
            replies.append(self._reply("BDAT", str(len(self.body)), "250 2.0.0 chunk ok"))
        return True

    def _finish_message(self, data: bytes, replies: list[str]) -> None:
        sink = self.sink
        verdict = sink.faults.verdict() if sink.faults is not None else ACCEPT
        if verdict == DISCONNECT:
            # Mid-transaction from the client's view: the data went out, no reply came.
            sink.disconnected += 1
            replies.clear()
            self.mode = "closed"
            if self.transport is not None:
                self.transport.abort()
            return
        reply = self._reply(".", str(len(data)), END_REPLIES[verdict])
        first = reply[:1]
        if first == "2":
            sink.accepted += 1
            sink.last = time.monotonic()
            if sink.record:
                sink.messages.append(SinkMessage(self.mail_from or "", self.rcpts, data, self.tls,
                                                 self.peer, self.ehlo))
            if sink.on_message is not None:
                sink.on_message(self.mail_from or "", self.rcpts, data, self.tls)
            if sink.on_accepted is not None:
                sink.on_accepted()
        else:
            if first == "4":
                sink.deferred += 1
            elif first == "5":
                sink.rejected += 1
            if sink.record:
                sink.refused.append(SinkMessage(self.mail_from or "", self.rcpts, data, self.tls,
                                                self.peer, self.ehlo))
        self._reset()  # a new list: the one handed out above is never changed again
        if reply.startswith("421"):
            self.mode = "closed"  # the server is going away: read nothing more
        if self.latency:
            # Replies so far go now; this one and everything after it wait on a timer.
            self._send(replies)
            replies.clear()
            if self.mode == "command":
                self.mode = "wait"
            loop = asyncio.get_running_loop()
            self._delayed = loop.call_later(self.latency, self._release, reply)
        else:
            replies.append(reply)
        sink._notify()

    def _release(self, reply: str) -> None:
        self._delayed = None
        if self.transport is None:
            return
        self._send([reply])
        if self.mode == "wait":
            self.mode = "command"
            self._process()

    def _command(self, line: str, replies: list[str]) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if self.sink.record:
            self.sink.commands.append((verb, arg))
        # MAIL/RCPT: the address, matched once for both the default reply and the state.
        addr = _ADDR.match(arg) if verb == "MAIL" or verb == "RCPT" else None
        default = self._default(verb, arg, addr)
        if self.auth is not None:
            default = self._auth_default(verb, arg, default)
        reply = self._reply(verb, arg, default)
        code_ok = reply[:1] in ("2", "3")
        # State follows the reply actually sent, so a script can refuse anything.
        if verb == "MAIL" and code_ok:
            self._reset()
            self.mail_from = addr.group(1) if addr else arg
        elif verb == "RCPT" and code_ok:
            self.rcpts.append(addr.group(1) if addr else arg)
        elif verb == "DATA" and reply.startswith("354"):
            self.mode = "data"
            self.buf[:0] = b"\r\n"
            self.scan = 0
        elif verb in ("EHLO", "HELO", "RSET") and code_ok:
            self._reset()
            if verb != "RSET":
                self.ehlo = arg.strip()
        elif verb == "BDAT" and self.chunking and _BDAT.match(arg):
            # RFC 3030 §2: the chunk follows the command whatever the reply (a pipelining
            # client sent it already), so even a refused BDAT's octets are read, and
            # dropped, before its reply; else they would be read as commands.
            parts = arg.split()
            self.bdat_left = int(parts[0])
            self.bdat_last = len(parts) > 1 and parts[1].upper() == "LAST"
            self.mode = "bdat"
            self.bdat_refusal = "" if code_ok else reply
            reply = ""  # answered once the chunk has arrived
        elif verb == "QUIT" or (verb == "STARTTLS" and reply.startswith("220")):
            replies.append(reply)
            self._send(replies)
            replies.clear()
            if verb == "QUIT":
                self.mode = "closed"
                if self.transport is not None:
                    self.transport.close()
            else:
                self.mode = "tls"
                self.buf.clear()  # RFC 3207 §4: plaintext sent after STARTTLS is discarded
                self._upgrading = asyncio.ensure_future(self._upgrade())
            return
        if reply:
            replies.append(reply)
        if reply.startswith("421"):
            self.mode = "closed"  # the server is going away: read nothing more

    async def _upgrade(self) -> None:
        assert self.transport is not None and self.tls_ctx is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, self.tls_ctx, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError):
            if self.transport is not None:
                self.transport.abort()
            return
        # RFC 3207 §4.2: forget everything learnt before the handshake.
        self.transport = new
        self.tls = True
        self.authed = False
        self._reset()
        self.mode = "command"
        self._process()  # the client's first command may already be buffered


async def start_sinks(
    addresses: list[tuple[str, int]],
    *,
    pipelining: bool = True,
    chunking: bool = False,
    starttls_context: ssl.SSLContext | None = None,
    script: Script | None = None,
    keep_segments: bool = True,
    auth: dict[str, str] | None = None,
    record: bool = True,
    faults: Faults | None = None,
    on_message: OnMessage | None = None,
    on_accepted: OnAccepted | None = None,
) -> Sink:
    """One Sink listening on every (host, port) (port 0: any free port) in the running loop.

    Raises:
        OSError: an address could not be bound (listeners already bound are closed).
    """
    loop = asyncio.get_running_loop()
    sink = Sink(servers=[], port=0, keep_segments=keep_segments, record=record, faults=faults,
                on_message=on_message, on_accepted=on_accepted)

    def factory() -> SinkProtocol:
        return SinkProtocol(sink, pipelining=pipelining, chunking=chunking,
                            starttls_context=starttls_context, script=script, auth=auth)

    try:
        for host, port in addresses:
            server = await loop.create_server(factory, host, port, reuse_address=True)
            bound = server.sockets[0].getsockname()[1]
            sink.servers.append(server)
            sink.addresses.append(f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}")
    except BaseException:
        await sink.close()
        raise
    sink.port = int(sink.addresses[0].rpartition(":")[2]) if sink.addresses else 0
    return sink


async def start_sink(host: str = "127.0.0.1", port: int = 0, **kw: object) -> Sink:
    """Listen on host:port (0: any free port) in the running loop; returns the Sink."""
    return await start_sinks([(host, port)], **kw)  # type: ignore[arg-type]
