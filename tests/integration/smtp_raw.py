"""A raw SMTP client for integration tests: send exact bytes, read complete replies.

Used where smtplib cannot go: pipelining, malformed input, STARTTLS injection. Every
socket has a timeout and every read a deadline; nothing here sleeps. Every reply read
is checked for an enhanced status code (RFC 2034) unless the caller says it is a
greeting, an EHLO/HELO reply, or a 3xx intermediate reply.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
TIMEOUT = 15.0  # generous: the suite must pass on a loaded 2-core machine

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass
class Reply:
    code: int
    lines: list[str]  # text after "code-" / "code "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        return self.lines[0].split(" ", 1)[0] if self.lines else ""

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


def assert_enhanced(code: int, lines: list[str]) -> None:
    """RFC 2034 §3: every line of a 2xx/4xx/5xx reply starts with a status code whose
    class matches the reply's first digit."""
    for line in lines:
        enh = line.split(" ", 1)[0]
        m = _ENHANCED.match(enh)
        assert m is not None, f"no enhanced status code in {code} {line!r}"
        assert m.group(1) == str(code)[0], f"class mismatch in {code} {line!r}"


class ConnectionClosedError(AssertionError):
    pass


class RawClient:
    def __init__(self, port: int, *, timeout: float = TIMEOUT, banner: bool = True,
                 source: str | None = None) -> None:
        self.sock: socket.socket = socket.create_connection(
            (HOST, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.timeout = timeout
        self.buf = b""
        self.banner: Reply | None = self.reply(enhanced=False) if banner else None

    # --- context manager -------------------------------------------------------
    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # --- bytes -------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete reply in time; have {self.buf[:200]!r}")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        return chunk

    # --- replies -------------------------------------------------------------------
    def reply(self, *, enhanced: bool = True, timeout: float | None = None) -> Reply:
        """One complete (possibly multi-line) reply; checks its enhanced code unless
        `enhanced` is False or it is a 3xx reply."""
        deadline = time.monotonic() + (timeout or self.timeout)
        lines: list[str] = []
        code = None
        while True:
            while b"\r\n" not in self.buf:
                chunk = self._fill(deadline)
                if not chunk:
                    raise ConnectionClosedError(
                        f"connection closed in the middle of a reply; have {self.buf!r}, {lines!r}"
                    )
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\r\n", 1)
            line = raw.decode("utf-8")
            assert re.match(r"^\d{3}[ -]", line) or re.fullmatch(r"\d{3}", line), f"bad reply line {line!r}"
            this = int(line[:3])
            assert code is None or this == code, f"code changed inside a reply: {code} then {line!r}"
            code = this
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                break
        reply = Reply(code, lines)
        if enhanced and not 300 <= code < 400:
            assert_enhanced(code, lines)
        return reply

    def replies(self, n: int, **kw: object) -> list[Reply]:
        return [self.reply(**kw) for _ in range(n)]  # type: ignore[arg-type]

    def cmd(self, line: str | bytes, **kw: object) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply(**kw)  # type: ignore[arg-type]

    def ehlo(self, name: str = "client.test") -> Reply:
        reply = self.cmd(f"EHLO {name}", enhanced=False)
        assert reply.code == 250, reply
        return reply

    def expect_closed(self, timeout: float | None = None) -> bytes:
        """Read until the server closes; returns whatever came before the close
        (the caller asserts it is empty when no more replies are allowed)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        got = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self._fill(deadline)
            except (ConnectionResetError, BrokenPipeError):
                return got
            if not chunk:
                return got
            got += chunk

    def pending(self) -> bytes:
        """Bytes already received but not yet consumed as a reply."""
        return self.buf

    # --- TLS ------------------------------------------------------------------------
    def starttls_handshake(self, ctx: ssl.SSLContext, server_hostname: str = "mx.volley.test") -> None:
        """Wrap the socket after a 220 to STARTTLS (no bytes may be buffered)."""
        assert self.buf == b"", f"server sent bytes after 220 to STARTTLS: {self.buf!r}"
        self.sock.settimeout(self.timeout)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def starttls_handshake_with(self, ctx: ssl.SSLContext, first: bytes,
                                server_hostname: str = "mx.volley.test") -> None:
        """Handshake, then send `first` as application data in the same segment as
        the client's last handshake flight (TLS 1.3: Finished + data at once)."""
        assert self.buf == b"", f"server sent bytes after 220 to STARTTLS: {self.buf!r}"
        self.sock = MemoryTlsSocket(self.sock, ctx, server_hostname, first, self.timeout)  # type: ignore[assignment]


class MemoryTlsSocket:
    """A TLS client over a plain socket through ssl.MemoryBIO, so the test decides
    which bytes share a TCP segment. Offers the few socket methods RawClient uses."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str,
                 first: bytes, timeout: float) -> None:
        self.raw = sock
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=False, server_hostname=server_hostname)
        self.raw.settimeout(timeout)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self.out.read()
                if pending:
                    self.raw.sendall(pending)
                chunk = self.raw.recv(65536)
                if not chunk:
                    raise ConnectionClosedError("server closed during the TLS handshake") from None
                self.inc.write(chunk)
        # Handshake done on our side: Finished is in `out`, not yet sent.
        if first:
            self.obj.write(first)
        self.raw.sendall(self.out.read())

    def settimeout(self, t: float) -> None:
        self.raw.settimeout(t)

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self.raw.sendall(self.out.read())

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                pending = self.out.read()
                if pending:
                    self.raw.sendall(pending)
                chunk = self.raw.recv(65536)
                if not chunk:
                    return b""
                self.inc.write(chunk)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                return b""

    def version(self) -> str | None:
        return self.obj.version()

    def close(self) -> None:
        self.raw.close()


def client_tls_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# --- smtplib with the enhanced-status-code check on every reply ------------------------
class _CheckedMixin:
    """Checks every reply smtplib reads, except the greeting, EHLO/HELO and 3xx."""

    _skip_check = False

    def getreply(self):  # type: ignore[no-untyped-def]
        code, msg = super().getreply()  # type: ignore[misc]
        if not self._skip_check and code not in (-1,) and not 300 <= code < 400:
            assert_enhanced(code, msg.decode("utf-8").split("\n"))
        return code, msg

    def connect(self, *a, **kw):  # type: ignore[no-untyped-def]
        self._skip_check = True
        try:
            return super().connect(*a, **kw)  # type: ignore[misc]
        finally:
            self._skip_check = False

    def ehlo(self, *a, **kw):  # type: ignore[no-untyped-def]
        self._skip_check = True
        try:
            return super().ehlo(*a, **kw)  # type: ignore[misc]
        finally:
            self._skip_check = False

    def helo(self, *a, **kw):  # type: ignore[no-untyped-def]
        self._skip_check = True
        try:
            return super().helo(*a, **kw)  # type: ignore[misc]
        finally:
            self._skip_check = False


class SMTP(_CheckedMixin, smtplib.SMTP):
    def __init__(self, port: int, *, timeout: float = TIMEOUT, **kw: object) -> None:
        super().__init__(HOST, port, timeout=timeout, **kw)  # type: ignore[arg-type]


class SMTP_SSL(_CheckedMixin, smtplib.SMTP_SSL):
    def __init__(self, port: int, *, context: ssl.SSLContext, timeout: float = TIMEOUT) -> None:
        super().__init__(HOST, port, timeout=timeout, context=context)


def queue_id(reply_text: str | bytes) -> str:
    """The queue id at the end of "250 2.0.0 OK queued as <id>"."""
    if isinstance(reply_text, bytes):
        reply_text = reply_text.decode()
    assert "queued as" in reply_text, reply_text
    return reply_text.rsplit(" ", 1)[1]
