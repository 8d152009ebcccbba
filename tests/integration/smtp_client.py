"""A small blocking SMTP client for process-level tests: raw lines over a real socket,
so a test can stop half-way through a transaction (partial DATA, an idle session) and
see exactly what the server sent. Every read has a timeout; every retry a deadline."""

from __future__ import annotations

import socket
import time

from tests.integration.harness import wait_until

CRLF = b"\r\n"


class ConnectionDropped(Exception):
    """The server closed or reset the connection before a complete reply."""


class RawSmtp:
    """One SMTP connection; `banner` is the (code, text) of the greeting."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buf = b""
        try:
            self.banner = self.reply()
        except BaseException:
            self.sock.close()
            raise

    def _line(self) -> bytes:
        while CRLF not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError as err:
                raise ConnectionDropped(f"reset: {err}") from None
            if not chunk:
                raise ConnectionDropped(f"EOF after {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(CRLF, 1)
        return line

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and the text of its lines."""
        texts = []
        while True:
            line = self._line()
            code, sep, text = line[:3], line[3:4], line[4:]
            texts.append(text.decode("utf-8", "replace"))
            if sep != b"-":
                return int(code), "\n".join(texts)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise ConnectionDropped(str(err)) from None

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + CRLF)
        return self.reply()

    def at_eof(self) -> bool:
        """True once the server has closed the connection (reads until then)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buf += chunk
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_until_banner(host: str, port: int, deadline: float = 20.0,
                         attempt_timeout: float = 3.0) -> RawSmtp:
    """Connect until a 220 banner arrives, for up to `deadline` seconds.

    A short per-attempt timeout lets a retry (a new source port, so possibly another
    worker's socket) get past a connection parked in a dead worker's backlog."""
    end = time.monotonic() + deadline
    found: list[RawSmtp] = []
    last: list[BaseException | None] = [None]

    def attempt() -> bool:
        try:
            client = RawSmtp(host, port, timeout=min(attempt_timeout, max(0.1, end - time.monotonic())))
        except (OSError, ConnectionDropped) as err:
            last[0] = err
            return False
        if client.banner[0] != 220:
            last[0] = AssertionError(f"banner {client.banner}")
            client.close()
            return False
        client.sock.settimeout(30.0)
        found.append(client)
        return True

    try:
        wait_until(attempt, deadline, f"a 220 banner from {host}:{port}")
    except TimeoutError as err:
        raise TimeoutError(f"{err}: {last[0]!r}") from None
    return found[0]


def message(test_id: str, subject: str = "test") -> bytes:
    return (
        f"From: <a@example.com>\r\nTo: <b@example.org>\r\nSubject: {subject}\r\n"
        f"X-Test-Id: {test_id}\r\n\r\nbody of {test_id}\r\n"
    ).encode()


def send_one(host: str, port: int, test_id: str, rcpts: tuple[str, ...] = ("b@example.org",),
             timeout: float = 30.0) -> str:
    """One full transaction on a fresh connection; returns the queue id of the 250.

    Raises AssertionError on any non-success reply."""
    with RawSmtp(host, port, timeout=timeout) as client:
        assert client.banner[0] == 220, client.banner
        code, text = client.cmd("EHLO client.test")
        assert code == 250, (code, text)
        code, text = client.cmd("MAIL FROM:<a@example.com>")
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = client.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, (code, text)
        code, text = client.cmd("DATA")
        assert code == 354, (code, text)
        client.send(message(test_id) + b".\r\n")
        code, text = client.reply()
        assert code == 250, (code, text)
        client.cmd("QUIT")
    return queue_id(text)


def queue_id(text: str) -> str:
    """The id from "2.0.0 OK queued as <16 hex>"."""
    assert "queued as" in text, text
    return text.rsplit(" ", 1)[1]
