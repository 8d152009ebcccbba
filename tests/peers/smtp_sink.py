"""A small scripted SMTP receiver for tests: real enough to talk to, simple enough to trust.

    sink = await start_sink(script=lambda verb, arg: "550 5.1.1 no" if "bad" in arg else None)
    ...  # point a client at sink.port
    await sink.wait_for(10, timeout=5)
    assert sink.messages[0].rcpt_tos == ["a@b.example"]
    await sink.close()

It processes every complete command line of a read and answers them in one write, as
a pipelining server does, and records each read in `segments` so a test can check how
a client grouped its commands. `script(verb, arg)` may replace any reply: verb is the
upper-cased command ("MAIL", "RCPT", "DATA", "BDAT", ...), or "." for the end of a
message (arg is then the message size); return a reply line (or lines joined by
"\\r\\n"), or None for the default, or `NO_REPLY` to answer nothing at all (a server that
hangs). A 421 reply closes the connection after it is sent.

Optional: `auth={"user": "password"}` makes it a smarthost that advertises AUTH PLAIN only
under TLS, refuses AUTH in plaintext (538) and MAIL before AUTH (530); `max_live` is the
most connections that were open at once.

Run as `python -m tests.peers.smtp_sink serve -c FILE` it is a stand-in for `volley
serve` (reads [[listeners]] address from the TOML, prints the JSON "ready" line), so
bench/e2e.py can be exercised before the real server exists.

Run as `python -m tests.peers.smtp_sink sink --listen 127.0.0.2:0 [--listen ...]` it is a
standalone destination for relay benchmarks (like Postfix's `smtp-sink -c`): it stores
nothing, prints one JSON line `{"event": "ready", "listeners": [...]}` on stdout, then a
running counter line (`{"messages": n, "connections": c, ...}`) whenever the counts
changed, at most every `--interval` seconds. With `--targets-from-stdin` it reads
message counts, one per line, from stdin and prints `{"event": "reached", "target": n,
"t": ...}` (t = time.monotonic() of the message that reached it; CLOCK_MONOTONIC is
shared by every process on Linux) and exits when stdin closes. It stops on SIGTERM or
SIGINT, and after `--lifetime` seconds in any case.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Callable

Script = Callable[[str, str], "str | None"]
NO_REPLY = "\0no reply"  # a script's answer meaning "send nothing"
_ADDR = re.compile(r"(?i)^(?:FROM|TO):\s*<([^>]*)>")


@dataclass
class SinkMessage:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # unstuffed, without the terminating ".\r\n"
    tls: bool = False


@dataclass
class Sink:
    """A running sink; counts and recordings are plain lists updated in place."""

    server: asyncio.AbstractServer
    port: int
    messages: list[SinkMessage] = field(default_factory=list)
    refused: list[SinkMessage] = field(default_factory=list)  # end of data answered non-2xx
    segments: list[bytes] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)
    connections: int = 0
    keep_segments: bool = True
    max_live: int = 0  # most connections open at the same time
    auth_users: list[str] = field(default_factory=list)  # successful AUTH PLAIN logins
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _live: set["_SinkProtocol"] = field(default_factory=set)

    def _notify(self) -> None:
        self._changed.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until `count` messages were accepted; asyncio.TimeoutError after `timeout`."""

        async def wait() -> None:
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        self.server.close()
        for proto in list(self._live):
            if proto.transport is not None:
                proto.transport.abort()
        await self.server.wait_closed()


class _SinkProtocol(asyncio.Protocol):
    def __init__(
        self,
        sink: Sink,
        *,
        pipelining: bool,
        chunking: bool,
        starttls_context: ssl.SSLContext | None,
        script: Script | None,
        auth: dict[str, str] | None = None,
    ) -> None:
        self.sink = sink
        self.auth = auth
        self.authed = False
        self.pipelining = pipelining
        self.chunking = chunking
        self.tls_ctx = starttls_context
        self.script = script
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.tls = False
        self.mode = "command"  # "command", "data", "bdat", "tls" (upgrade in progress)
        self.bdat_left = 0
        self.bdat_last = False
        self.scan = 0  # where the next search for the end-of-data starts
        self.body = bytearray()
        self._upgrading: asyncio.Future[None] | None = None  # keeps the task alive
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sink.connections += 1
        self.sink._live.add(self)
        self.sink.max_live = max(self.sink.max_live, len(self.sink._live))
        self._send([self._reply("BANNER", "", "220 sink.test ESMTP volley test sink")])

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink._live.discard(self)
        self.transport = None

    def _reply(self, verb: str, arg: str, default: str) -> str:
        if self.script is not None:
            chosen = self.script(verb, arg)
            if chosen is not None:
                return chosen
        return default

    def _send(self, replies: list[str]) -> None:
        replies = [r for r in replies if r != NO_REPLY]
        if self.transport is None or not replies:
            return
        out = "".join(r.replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n" for r in replies)
        self.transport.write(out.encode())
        if any(r.startswith("421") for r in replies):
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.sink.keep_segments:
            self.sink.segments.append(bytes(data))
        self.buf += data
        self._process()

    def _process(self) -> None:
        replies: list[str] = []
        while self.transport is not None and self.mode not in ("tls", "closed"):
            if self.mode == "data":
                if not self._data(replies):
                    break
            elif self.mode == "bdat":
                if not self._bdat(replies):
                    break
            else:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(self.buf[:end]).decode("utf-8", "replace")
                del self.buf[: end + 2]
                self._command(line, replies)
        self._send(replies)  # all replies to one read in one write

    def _data(self, replies: list[str]) -> bool:
        # The buffer was seeded with the CRLF before the data, so "\r\n.\r\n" also finds
        # an empty message, and "\r\n.." unstuffs the first line too.
        end = self.buf.find(b"\r\n.\r\n", self.scan)
        if end < 0:
            self.scan = max(0, len(self.buf) - 4)
            return False
        raw = bytes(self.buf[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:]
        del self.buf[: end + 5]
        self.scan = 0
        self.mode = "command"
        self._finish_message(raw, replies)
        return True

    def _bdat(self, replies: list[str]) -> bool:
        take = min(self.bdat_left, len(self.buf))
        self.body += self.buf[:take]
        del self.buf[:take]
        self.bdat_left -= take
        if self.bdat_left:
            return False
        self.mode = "command"
        if self.bdat_last:
            self._finish_message(bytes(self.body), replies)
        else:
            replies.append(self._reply("BDAT", str(len(self.body)), "250 2.0.0 chunk ok"))
        return True

    def _finish_message(self, data: bytes, replies: list[str]) -> None:
        reply = self._reply(".", str(len(data)), "250 2.0.0 queued")
        msg = SinkMessage(self.mail_from or "", list(self.rcpts), data, self.tls)
        (self.sink.messages if reply.startswith("2") else self.sink.refused).append(msg)
        self._reset()
        replies.append(reply)
        self.sink._notify()

    def _command(self, line: str, replies: list[str]) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        self.sink.commands.append((verb, arg))
        default = self._default(verb, arg)
        if self.auth is not None:
            default = self._auth_default(verb, arg, default)
        reply = self._reply(verb, arg, default)
        code_ok = reply[:1] in ("2", "3")
        # State follows the reply actually sent, so a script can refuse anything.
        if verb in ("EHLO", "HELO", "RSET") and code_ok:
            self._reset()
        elif verb == "MAIL" and code_ok:
            m = _ADDR.match(arg)
            self._reset()
            self.mail_from = m.group(1) if m else arg
        elif verb == "RCPT" and code_ok:
            m = _ADDR.match(arg)
            self.rcpts.append(m.group(1) if m else arg)
        elif verb == "DATA" and reply.startswith("354"):
            self.mode = "data"
            self.buf[:0] = b"\r\n"
            self.scan = 0
        elif verb == "BDAT" and code_ok:
            parts = arg.split()
            self.bdat_left = int(parts[0])
            self.bdat_last = len(parts) > 1 and parts[1].upper() == "LAST"
            self.mode = "bdat"
            reply = ""  # answered once the chunk has arrived
        elif verb == "QUIT":
            replies.append(reply)
            self._send(replies)
            replies.clear()
            self.mode = "closed"
            if self.transport is not None:
                self.transport.close()
            return
        elif verb == "STARTTLS" and reply.startswith("220"):
            replies.append(reply)
            self._send(replies)
            replies.clear()
            self.mode = "tls"
            self.buf.clear()  # RFC 3207 §4: plaintext sent after STARTTLS is discarded
            self._upgrading = asyncio.ensure_future(self._upgrade())
            return
        if reply:
            replies.append(reply)
        if reply.startswith("421"):
            self.mode = "closed"  # the server is going away: read nothing more

    def _auth_default(self, verb: str, arg: str, default: str) -> str:
        # The optional smarthost mode: AUTH PLAIN with an initial response, TLS only.
        assert self.auth is not None
        if verb == "EHLO" and self.tls:
            return default.replace("250 ", "250-AUTH PLAIN\r\n250 ", 1) if "\r\n" in default \
                else default
        if verb == "AUTH":
            if not self.tls:
                return "538 5.7.11 encryption required"
            mech, _, initial = arg.partition(" ")
            if mech.upper() != "PLAIN" or not initial:
                return "504 5.5.4 only AUTH PLAIN with an initial response"
            try:
                _, user, password = base64.b64decode(initial).decode().split("\0")
            except ValueError:
                return "501 5.5.2 bad response"
            if self.auth.get(user) != password:
                return "535 5.7.8 authentication failed"
            self.authed = True
            self.sink.auth_users.append(user)
            return "235 2.7.0 ok"
        if verb == "MAIL" and not self.authed:
            return "530 5.7.0 authentication required"
        return default

    def _default(self, verb: str, arg: str) -> str:
        if verb == "EHLO":
            ext = ["8BITMIME", "SIZE 104857600"]
            if self.pipelining:
                ext.append("PIPELINING")
            if self.chunking:
                ext.append("CHUNKING")
            if self.tls_ctx is not None and not self.tls:
                ext.append("STARTTLS")
            return "\r\n".join(["250-sink.test"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"])
        if verb == "HELO":
            return "250 sink.test"
        if verb == "MAIL":
            return "250 2.1.0 ok" if _ADDR.match(arg) else "501 5.5.4 syntax: MAIL FROM:<address>"
        if verb == "RCPT":
            if self.mail_from is None:
                return "503 5.5.1 MAIL first"
            return "250 2.1.5 ok" if _ADDR.match(arg) else "501 5.5.4 syntax: RCPT TO:<address>"
        if verb == "DATA":
            if self.mail_from is None or not self.rcpts:
                return "554 5.5.1 no valid recipients" if self.mail_from else "503 5.5.1 MAIL first"
            return "354 end with <CRLF>.<CRLF>"
        if verb == "BDAT":
            if not self.chunking:
                return "502 5.5.1 not supported"
            parts = arg.split()
            if not parts or not parts[0].isdigit():
                return "501 5.5.4 syntax: BDAT size [LAST]"
            return "250 2.0.0 ok" if self.rcpts else "503 5.5.1 RCPT first"
        if verb in ("RSET", "NOOP"):
            return "250 2.0.0 ok"
        if verb == "QUIT":
            return "221 2.0.0 bye"
        if verb == "STARTTLS":
            if self.tls_ctx is None or self.tls:
                return "502 5.5.1 not available"
            return "220 2.0.0 go ahead"
        return "500 5.5.2 unknown command"

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
        self.transport = new  # type: ignore[assignment]
        self.tls = True
        self.authed = False
        self._reset()
        self.mode = "command"
        self._process()  # the client's first command may already be buffered


async def start_sink(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    pipelining: bool = True,
    chunking: bool = False,
    starttls_context: ssl.SSLContext | None = None,
    script: Script | None = None,
    keep_segments: bool = True,
    auth: dict[str, str] | None = None,
) -> Sink:
    """Listen on host:port (0: any free port) in the running loop; returns the Sink."""
    loop = asyncio.get_running_loop()
    holder: list[Sink] = []
    server = await loop.create_server(
        lambda: _SinkProtocol(
            holder[0], pipelining=pipelining, chunking=chunking,
            starttls_context=starttls_context, script=script, auth=auth,
        ),
        host, port, reuse_address=True,
    )
    sink = Sink(server=server, port=server.sockets[0].getsockname()[1], keep_segments=keep_segments)
    holder.append(sink)
    return sink


def _serve_main(argv: list[str]) -> int:
    """Stand-in for `volley serve -c FILE`: one process, stores nothing, logs JSON to stderr."""
    import json
    import signal
    import sys
    import tomllib

    if len(argv) < 3 or argv[0] != "serve" or argv[1] != "-c":
        print("usage: python -m tests.peers.smtp_sink serve -c FILE", file=sys.stderr)
        return 2
    with open(argv[2], "rb") as f:
        config = tomllib.load(f)
    address = config.get("listeners", [{}])[0].get("address", "127.0.0.1:2525")
    host, _, port = address.rpartition(":")

    async def serve() -> None:
        sink = await start_sink(host, int(port), keep_segments=False)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        sink.messages = _Counter()  # type: ignore[assignment]  # count, don't keep bodies
        print(json.dumps({"event": "ready", "listeners": [f"{host}:{sink.port}"]}),
              file=sys.stderr, flush=True)
        await stop.wait()
        await sink.close()

    import uvloop

    uvloop.run(serve())
    return 0


class _Counter(list):  # type: ignore[type-arg]
    """A list that only counts appends, for long stand-in runs."""

    n = 0

    def append(self, item: object) -> None:
        self.n += 1

    def __len__(self) -> int:
        return self.n


class _Discard(list):  # type: ignore[type-arg]
    """A list that keeps nothing (the per-command record, for long sink runs)."""

    def append(self, item: object) -> None:
        pass


class _Tally(list):  # type: ignore[type-arg]
    """Counts accepted messages, stamps the time of the latest one, and notes the time
    each pending target count was reached."""

    def __init__(self, on_reached: Callable[[int, float], None]) -> None:
        super().__init__()
        self.n = 0
        self.last = 0.0
        self.targets: list[int] = []  # sorted, pending
        self.on_reached = on_reached

    def append(self, item: object) -> None:
        import time

        self.n += 1
        self.last = time.monotonic()
        while self.targets and self.n >= self.targets[0]:
            self.on_reached(self.targets.pop(0), self.last)

    def __len__(self) -> int:
        return self.n


def _sink_main(argv: list[str]) -> int:
    """`sink --listen HOST:PORT ...`: a standalone counting destination (see the module doc)."""
    import argparse
    import bisect
    import json
    import signal
    import sys
    import time

    p = argparse.ArgumentParser(prog="python -m tests.peers.smtp_sink sink",
                                description="A counting SMTP sink that stores nothing.")
    p.add_argument("--listen", action="append", required=True, metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port); repeatable")
    p.add_argument("--interval", type=float, default=0.5,
                   help="seconds between counter lines (only printed when counts changed)")
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    p.add_argument("--targets-from-stdin", action="store_true",
                   help="read message counts from stdin, report when each is reached; exit on EOF")
    p.add_argument("--no-pipelining", action="store_true")
    p.add_argument("--chunking", action="store_true", help="advertise CHUNKING (BDAT)")
    a = p.parse_args(argv)
    addresses = []
    for text in a.listen:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            p.error(f"--listen must be HOST:PORT, got {text!r}")
        addresses.append((host.strip("[]"), int(port)))

    def emit(obj: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(a.lifetime, stop.set)
        tally = _Tally(lambda n, t: emit({"event": "reached", "target": n, "t": t}))
        sinks = []
        for host, port in addresses:
            sink = await start_sink(host, port, pipelining=not a.no_pipelining,
                                    chunking=a.chunking, keep_segments=False)
            sink.messages = tally  # type: ignore[assignment]  # one count over all listeners
            sink.commands = _Discard()  # type: ignore[assignment]
            sink.refused = _Discard()  # type: ignore[assignment]
            sinks.append(sink)
        emit({"event": "ready", "listeners": [f"{h}:{s.port}" for (h, _), s in zip(addresses, sinks)],
              "pid": os.getpid()})

        if a.targets_from_stdin:
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

            async def targets() -> None:
                while line := await reader.readline():
                    text = line.decode().strip()
                    if not text.isdigit():
                        continue
                    n = int(text)
                    if tally.n >= n:
                        emit({"event": "reached", "target": n, "t": tally.last})
                    else:
                        bisect.insort(tally.targets, n)
                stop.set()  # our parent closed the pipe (or died): nobody is listening

            reading = asyncio.ensure_future(targets())
        seen = (-1, -1)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), a.interval)
            except asyncio.TimeoutError:
                pass
            conns = sum(s.connections for s in sinks)
            if (tally.n, conns) != seen:
                seen = (tally.n, conns)
                emit({"messages": tally.n, "connections": conns,
                      "live": sum(len(s._live) for s in sinks), "last": tally.last,
                      "t": time.monotonic()})
        if a.targets_from_stdin:
            reading.cancel()
        for sink in sinks:
            await sink.close()
        emit({"event": "stopped", "messages": tally.n, "connections": sum(s.connections for s in sinks),
              "max_live": max(s.max_live for s in sinks)})

    import uvloop

    uvloop.run(serve())
    return 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        return _sink_main(argv[1:])
    return _serve_main(argv)


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
