"""A tiny HTTP/1.1 server for Prometheus scrapes: `GET /metrics`, nothing else.

Served by the supervisor when `metrics.listen` is set. One request per connection
(`Connection: close`), so there is no keep-alive, no chunking and no body to read:
a scrape is one small request head and one response. Status codes per RFC 9110:
404 for any other path, 405 (with `Allow`, §15.5.6) for a method other than GET or
HEAD, 400 for a malformed request line or a head over MAX_HEAD bytes; a client that
has not sent its whole head within `idle_timeout` seconds is dropped without a reply.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from engine.observe import log

MAX_HEAD = 8 * 1024  # request line + header fields; a scrape sends a few hundred bytes
MAX_CLIENTS = 64  # concurrent connections; more are closed at once (scrapes are rare)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# What a scrape is answered with: text, or a coroutine giving it (a read in a thread).
Render = Callable[[], str] | Callable[[], Awaitable[str]]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


class _BadRequest(Exception):
    pass


class HttpStats:
    """What the endpoint did (loop thread only): replies by status, connections dropped
    without a reply (EOF, reset, stall, over MAX_CLIENTS), and handler bugs (logged)."""

    __slots__ = ("open", "replies", "dropped", "errors")

    def __init__(self) -> None:
        self.open = 0
        self.replies: dict[int, int] = {}
        self.dropped = 0
        self.errors = 0


async def start_metrics_http(host: str, port: int, render: Render, *,
                             idle_timeout: float = 10.0, stats: HttpStats | None = None) -> asyncio.Server:
    """Listen on host:port and answer scrapes with `render()` (called on the loop, and
    awaited when it returns an awaitable).

    The caller owns the returned server (`close()` it on shutdown); port 0 picks a free
    port, readable from `server.sockets[0].getsockname()`. `stats`, if given, is updated.
    """
    st = stats if stats is not None else HttpStats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if st.open >= MAX_CLIENTS:
            st.dropped += 1
            writer.transport.abort()
            return
        st.open += 1
        try:
            status = await _serve(reader, writer, render, idle_timeout)
            if status is None:
                st.dropped += 1
            else:
                st.replies[status] = st.replies.get(status, 0) + 1
        except (ConnectionError, TimeoutError):
            st.dropped += 1  # the client went away or stalled; nothing to tell it
        except asyncio.CancelledError:
            # The loop is shutting down. Nobody awaits this per-connection task, and on
            # 3.11 asyncio's own done-callback logs a cancelled handler as an error.
            pass
        except Exception as err:  # asyncio would drop it silently; a bug should show
            st.errors += 1
            log.error("metrics_http_error", error=repr(err))
        finally:
            st.open -= 1
            # A client that stopped reading would keep a plain close() flushing forever.
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    # The stream limit bounds one line; _read_head bounds the whole head.
    return await asyncio.start_server(handle, host, port, limit=MAX_HEAD)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 render: Render, idle_timeout: float) -> int | None:
    """Answer one request; the status sent, or None when the client left first."""
    try:
        async with asyncio.timeout(idle_timeout):
            head = await _read_head(reader)
    except _BadRequest:
        await _respond(writer, 400, b"bad request\n", idle_timeout)
        await _linger(reader, writer, idle_timeout)
        return 400
    if head is None:
        return None  # closed before the head ended: nobody to answer
    method, path = head
    if path != "/metrics":
        status, body = 404, b"not found\n"
    elif method not in ("GET", "HEAD"):
        await _respond(writer, 405, b"method not allowed\n", idle_timeout, allow="GET, HEAD")
        return 405
    else:
        try:
            text = render()
            if inspect.isawaitable(text):
                text = await text
            status, body = 200, text.encode()
        except Exception as err:  # a bug in render must not take the supervisor down
            log.error("metrics_render_error", error=repr(err))
            status, body = 500, b"internal error\n"
    await _respond(writer, status, body, idle_timeout, send_body=method != "HEAD",
                   content_type=CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8")
    return status


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """(method, path without query) of one request head, or None at EOF before its end.

    Lines may end in CRLF or a bare LF (RFC 9112 §2.2 lets a recipient accept LF).
    """
    total = 0
    request_line = b""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the stream limit
            raise _BadRequest() from None
        total += len(line)
        if total > MAX_HEAD:
            raise _BadRequest()
        if not line.endswith(b"\n"):
            return None  # EOF (possibly mid-line)
        if line in (b"\r\n", b"\n"):
            if not request_line:
                continue  # RFC 9112 §2.2: ignore empty lines before the request line
            break
        if not request_line:
            request_line = line
    parts = request_line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        raise _BadRequest()
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest() from None
    if not method.isalpha():
        raise _BadRequest()
    return method, target.split("?", 1)[0]


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, timeout: float, *,
                   content_type: str = "text/plain; charset=utf-8", allow: str = "",
                   send_body: bool = True) -> None:
    # HEAD gets the Content-Length a GET would (RFC 9110 §9.3.2), without the body.
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            + (f"Allow: {allow}\r\n" if allow else "")
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode("ascii") + (body if send_body else b""))
    async with asyncio.timeout(timeout):
        await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    """After an early error reply, read and drop what the client is still sending.

    Closing with unread input makes the kernel send RST, which can destroy the reply
    before the client reads it; half-close and discard a bounded amount first.
    """
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(min(timeout, 2.0)):
            left = 64 * 1024
            while left > 0:
                chunk = await reader.read(min(left, 16 * 1024))
                if not chunk:
                    return
                left -= len(chunk)
    except (TimeoutError, ConnectionError):
        return
