"""The control socket's wire protocol: one JSON object per line, each way.

Request:  {"cmd": "<name>", ...arguments}     (a msgspec tagged union on "cmd")
Reply:    {"ok": true, ...result}  or  {"ok": false, "error": "<what is wrong>"}

Requests are typed here so a bad argument is refused with a message naming it
(`decode_request`), never a dropped connection. Replies are typed in
`engine/control/replies.py`; their fields are documented in the README ("Control
socket") and rendered by `engine/control/render.py`.

Times on the wire are epoch seconds (floats); durations are seconds; queue ids are the
16-hex-digit form of `engine.queue.ids.id_text`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# A request longer than this is refused, not buffered forever. It holds one chunk of a
# suppression import: MAX_VALUES values of up to ~380 bytes, JSON-quoted.
MAX_LINE = 4 * 1024 * 1024
MAX_LIMIT = 10_000  # rows in one `list`/`queue` reply
MAX_VALUES = 10_000  # suppression entries in one `suppress_add` (one write transaction)

MessageState = Literal["queued", "deferred", "suspended"]


class Request(msgspec.Struct, tag_field="cmd", forbid_unknown_fields=True, kw_only=True):
    """Base of every request; `cmd` is the tag."""


class Status(Request, tag="status"):
    pass


class Queue(Request, tag="queue"):
    by: Literal["domain", "sender", "age"] = "domain"
    limit: int = 100  # rows, biggest first


class Filter(Request):
    """Selects queued messages; empty fields match everything."""

    domain: str = ""  # a pending recipient in this domain (exact, case-insensitive)
    sender: str = ""  # the envelope sender, case-insensitive; "<>" is the null sender
    state: MessageState | None = None


class List(Filter, tag="list"):
    limit: int = 50
    after: str = ""  # resume after this id (the `next` of the previous page)


class Show(Request, tag="show"):
    id: str


class Flush(Request, tag="flush"):
    domain: str = ""
    id: str = ""


class Suspend(Request, tag="suspend"):
    domain: str
    duration: float | None = None  # seconds; None = until resumed
    reason: str = ""


class Resume(Request, tag="resume"):
    domain: str


class Bounce(Filter, tag="bounce"):
    id: str = ""
    dry_run: bool = False
    reason: str = ""
    all: bool = False  # an empty filter must be asked for explicitly


class Delete(Filter, tag="delete"):
    id: str = ""
    dry_run: bool = False
    all: bool = False


class Throttle(Request, tag="throttle"):
    domain: str
    max_connections: int | None = None
    rate: float | None = None  # messages per second; None = unchanged
    clear: bool = False


class Mx(Request, tag="mx"):
    domain: str = ""
    flush: bool = False


class Shaping(Request, tag="shaping"):
    """Which [[shaping]] entry applies to a domain, why, and its live figures."""

    domain: str


class Warmup(Request, tag="warmup"):
    """Each [[egress]] source's warm-up day and, per provider, this hour's allowance,
    use and headroom (engine/control/warmup_view.py)."""


class Reload(Request, tag="reload"):
    pass


class Drain(Request, tag="drain"):
    timeout: float = 300.0  # seconds to wait for the queue to empty before reporting
    # --to HOST:PORT: hand the queue to that Volley over SMTP (engine/control/drain_to.py)
    # instead of waiting for it to empty. The reply is the run's progress after at most
    # `wait` seconds; `start` false only reports the current (or last) run.
    to: str = ""
    connections: int = 8  # measured: 4 → 408 msgs/s, 8 → 570 msgs/s (peer on this host)
    tls: Literal["opportunistic", "required", "none"] = "opportunistic"
    user: str = ""  # AUTH as this user (only under TLS)
    password: str = ""
    start: bool = True
    wait: float = 1.0


class Shutdown(Request, tag="shutdown"):
    pass


class Metrics(Request, tag="metrics"):
    pass


class SuppressAdd(Request, tag="suppress_add"):
    """Add addresses ("has an @") and domains to the suppression list, in one write
    transaction. A bad value is reported by its index and skipped, not fatal."""

    values: list[str]
    reason: str = "manual"  # engine/queue/suppression.py REASONS
    tenant: str = ""  # "" = every tenant
    source: str = ""  # what the entries came from ("" = who asked), e.g. a file name


class SuppressRemove(Request, tag="suppress_remove"):
    value: str
    tenant: str = ""


class SuppressList(Request, tag="suppress_list"):
    tenant: str | None = None  # None = every tenant's entries and the shared ones
    limit: int = 100
    after: str = ""  # resume after this value (the `next` of the previous page)
    after_tenant: str = ""  # with tenant None: the tenant of `after` (`next_tenant`)


class Campaigns(Request, tag="campaigns"):
    tenant: str | None = None
    campaign: str | None = None
    limit: int = 100  # the most recently active first
    cluster: bool = False  # every node's counters summed (through the cluster's Redis)


AnyRequest = (Status | Queue | List | Show | Flush | Suspend | Resume | Bounce | Delete
              | Throttle | Mx | Reload | Drain | Shutdown | Metrics | SuppressAdd
              | SuppressRemove | SuppressList | Campaigns | Shaping | Warmup)
COMMANDS = ("status", "queue", "list", "show", "flush", "suspend", "resume", "bounce",
            "delete", "throttle", "mx", "reload", "drain", "shutdown", "metrics",
            "suppress_add", "suppress_remove", "suppress_list", "campaigns", "shaping", "warmup")

_decoder = msgspec.json.Decoder(AnyRequest)


class RequestError(ValueError):
    """A request that cannot be served; the text goes back as the error reply."""


def decode_request(line: bytes) -> AnyRequest:
    """Parse one request line.

    Raises:
        RequestError: not JSON, not an object, unknown `cmd`, or a bad argument; the
            message names what is wrong (msgspec's `$.field` paths).
    """
    try:
        req = _decoder.decode(line)
    except msgspec.ValidationError as err:
        text = str(err)
        if "Invalid value" in text and "$.cmd" in text:
            raise RequestError(f"unknown command; one of: {', '.join(COMMANDS)}") from None
        if "missing required field `cmd`" in text or "Expected `object`" in text:
            raise RequestError('a request is a JSON object with "cmd": ' + ", ".join(COMMANDS)) from None
        raise RequestError(f"bad request: {text}") from None
    except msgspec.DecodeError as err:
        raise RequestError(f"not JSON: {err}") from None
    _check(req)
    return req


def _check(req: AnyRequest) -> None:
    if isinstance(req, (Queue, List, SuppressList, Campaigns)) and not 1 <= req.limit <= MAX_LIMIT:
        raise RequestError(f"limit: must be 1..{MAX_LIMIT}")
    if isinstance(req, (Suspend, Resume, Throttle)) and not req.domain.strip():
        raise RequestError("domain: required")
    if isinstance(req, Suspend) and req.duration is not None and req.duration <= 0:
        raise RequestError("duration: must be positive")
    if isinstance(req, Throttle):
        if req.max_connections is not None and req.max_connections < 1:
            raise RequestError("max_connections: must be at least 1")
        if req.rate is not None and req.rate <= 0:
            raise RequestError("rate: must be positive (messages per second)")
        if not req.clear and req.max_connections is None and req.rate is None:
            raise RequestError("throttle: give max_connections and/or rate, or clear")
    if isinstance(req, SuppressAdd) and len(req.values) > MAX_VALUES:
        raise RequestError(f"values: at most {MAX_VALUES} in one request (send chunks)")
    if isinstance(req, Drain) and req.to:
        host, _, port = req.to.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RequestError(f"to: expected HOST:PORT, got {req.to!r}")
        if not 1 <= req.connections <= 64:
            raise RequestError("connections: must be 1..64")
        if not 0 <= req.wait <= 60:
            raise RequestError("wait: must be 0..60 seconds")
    if isinstance(req, Flush) and req.domain and req.id:
        raise RequestError("flush: give a domain or an id, not both")
    if isinstance(req, (Bounce, Delete)):
        if req.id and (req.domain or req.sender or req.state):
            raise RequestError(f"{req.__struct_config__.tag}: give an id or a filter, not both")
        if not (req.id or req.domain or req.sender or req.state or req.all):
            raise RequestError(f"{req.__struct_config__.tag}: give an id, a filter, or all")


def encode_request(req: Request) -> bytes:
    return msgspec.json.encode(req) + b"\n"
