"""Shared pieces of the relay integration tests (test_relay_*.py).

`Lab` puts one in-process server (delivery on), one loopback DNS server and any
number of scripted sinks together. Every sink listens on the same port at its own
loopback address (127.0.0.2, 127.0.0.3, ...): the first one started picks the port,
the others reuse it, and `delivery.port` is that port, so MX records decide which
sink gets what. All traffic stays on 127.0.0.0/8; the server's DNS is always the
loopback test server.

Synchronisation is on real conditions with deadlines (`sink.wait_for`, `wait_until`
on the store or on the delivery log file), never on a sleep.
"""

from __future__ import annotations

import email
import email.policy
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.lab.sink.protocol import Sink, start_sink
from engine.queue.ids import id_text
from engine.queue.records import MessageRecord
from tests.integration.harness import InboundServer, merge, wait_until
from tests.integration.smtp_client import RawSmtp, queue_id

HOME = "home.test"  # the senders' domain: DSNs go to its MX
SENDER = f"alice@{HOME}"
HOME_IP = "127.0.0.9"

FAST: dict[str, Any] = {
    "dns": {"min_ttl": "1s", "negative_ttl_max": "1s", "failure_ttl": "0s", "timeout": "2s"},
    "delivery": {
        "enabled": True,
        "poll_interval": "50ms",
        "retry": "1s",
        "backoff": "1s",
        "backoff_max": "2s",
        "idle_timeout": "3s",
        "timeouts": {
            "connect": "3s", "greeting": "5s", "ehlo": "5s", "starttls": "5s", "auth": "5s",
            "mail": "5s", "rcpt": "5s", "data": "5s", "data_block": "5s", "data_end": "5s",
            "quit": "2s",
        },
    },
}


def body(test_id: str, subject: str = "relay test", extra: str = "") -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <someone@example.test>\r\nSubject: {subject}\r\n"
            f"X-Test-Id: {test_id}\r\n{extra}\r\nbody of {test_id}\r\n").encode()


def tag_of(data: bytes) -> str | None:
    m = re.search(rb"X-Test-Id: (\S+)", data)
    return m.group(1).decode() if m else None


def transact(client: RawSmtp, sender: str, rcpts: list[str], data: bytes,
             mail_params: str = "", rcpt_params: str | list[str] = "") -> str:
    """One transaction on an open, EHLO'd connection; returns the queue id."""
    params = rcpt_params if isinstance(rcpt_params, list) else [rcpt_params] * len(rcpts)
    code, text = client.cmd(f"MAIL FROM:<{sender}>" + (f" {mail_params}" if mail_params else ""))
    assert code == 250, (code, text)
    for rcpt, p in zip(rcpts, params):
        code, text = client.cmd(f"RCPT TO:<{rcpt}>" + (f" {p}" if p else ""))
        assert code == 250, (rcpt, code, text)
    code, text = client.cmd("DATA")
    assert code == 354, (code, text)
    client.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    return queue_id(text)


def send(port: int, rcpts: list[str], data: bytes, sender: str = SENDER,
         mail_params: str = "", rcpt_params: str | list[str] = "") -> str:
    """One message on a fresh connection; returns the queue id (hex text)."""
    with RawSmtp("127.0.0.1", port, timeout=10) as client:
        assert client.banner[0] == 220, client.banner
        assert client.cmd("EHLO client.test")[0] == 250
        qid = transact(client, sender, rcpts, data, mail_params, rcpt_params)
        client.cmd("QUIT")
    return qid


def send_many(port: int, items: list[tuple[list[str], bytes]], sender: str = SENDER) -> list[str]:
    """Several messages on one connection; returns their queue ids."""
    with RawSmtp("127.0.0.1", port, timeout=10) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        ids = [transact(client, sender, rcpts, data) for rcpts, data in items]
        client.cmd("QUIT")
    return ids


class Counter:
    """Thread-safe per-key counters for sink scripts (they run on the peers loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def bump(self, key: str) -> int:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

    def get(self, key: str) -> int:
        with self._lock:
            return self.counts.get(key, 0)


def rcpt_of(arg: str) -> str:
    m = re.match(r"(?i)TO:\s*<([^>]*)>", arg)
    return m.group(1) if m else arg


class Lab:
    """A relay under test with its DNS and sinks. Use via the `lab` fixture."""

    def __init__(self, inbound: Callable[..., InboundServer], peers: Any,
                 dns_zone: Callable[[dict[str, Any]], Any]) -> None:
        self._inbound = inbound
        self.peers = peers
        self._dns_zone = dns_zone
        self.port = 0  # the sinks' port, fixed by the first sink
        self.dns: Any = None
        self.server: InboundServer | None = None

    # --- peers ----------------------------------------------------------------------
    def sink(self, ip: str, **kw: Any) -> Sink:
        sink: Sink = self.peers.call(start_sink(ip, self.port, **kw))
        self.peers.sinks.append(sink)
        self.port = sink.port
        return sink

    def free_port(self) -> int:
        """The sinks' port (starting a throwaway sink on 127.0.0.250 if none yet)."""
        if not self.port:
            self.sink("127.0.0.250")
        return self.port

    def zone(self, zone: dict[str, Any], home: bool = True) -> Any:
        """Start the DNS server; `home` adds home.test → 127.0.0.9 for DSNs."""
        data = dict(zone)
        if home:
            data.setdefault(HOME, {"MX": [(10, f"mx.{HOME}")]})
            data.setdefault(f"mx.{HOME}", {"A": [HOME_IP]})
        self.dns = self._dns_zone(data)
        return self.dns

    def home_sink(self, **kw: Any) -> Sink:
        return self.sink(HOME_IP, **kw)

    # --- the server -------------------------------------------------------------------
    def start(self, extra: dict[str, Any] | None = None) -> InboundServer:
        assert self.dns is not None, "zone() first"
        overrides = merge(FAST, {
            "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"]},
            "delivery": {"port": self.free_port()},
        })
        overrides = merge(overrides, extra or {})
        # HARD RULE: never a real resolver.
        assert overrides["dns"]["nameservers"] == [f"127.0.0.1:{self.dns.port}"]
        self.server = self._inbound(overrides)
        return self.server

    def send(self, rcpts: list[str], data: bytes, **kw: Any) -> str:
        assert self.server is not None
        return send(self.server.port, rcpts, data, **kw)

    # --- observing --------------------------------------------------------------------
    def log(self) -> list[dict[str, Any]]:
        """Every delivery log line written so far."""
        assert self.server is not None
        path = Path(self.server.cfg.log.delivery)
        if not path.exists():
            return []
        return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]

    def wait_log(self, pred: Callable[[dict[str, Any]], bool], count: int = 1,
                 timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until at least `count` log lines match; returns the matches."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            nonlocal found
            found = [e for e in self.log() if pred(e)]
            return len(found) >= count

        try:
            wait_until(check, timeout, "delivery log lines")
        except TimeoutError:
            raise AssertionError(f"{count} matching log lines not seen; log: {self.log()}") from None
        return found

    def records(self) -> dict[str, MessageRecord]:
        """Every queued record, by queue id text."""
        assert self.server is not None
        store = self.server.store

        def read() -> dict[str, MessageRecord]:
            out = {}
            for raw in store.iter_ids():
                rec = store.get(raw)
                if rec is not None:
                    out[id_text(raw)] = rec
            return out

        return self.server.call(read)

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        assert self.server is not None
        try:
            wait_until(lambda: self.server.queued() == 0, timeout, "queue empty")
        except TimeoutError:
            raise AssertionError(f"queue not empty: {self.records()}") from None

    def wait_sink(self, sink: Sink, count: int, timeout: float = 20.0) -> None:
        try:
            self.peers.call(sink.wait_for(count, timeout), timeout + 5)
        except TimeoutError:
            raise AssertionError(
                f"sink got {len(sink.messages)} of {count}; log: {self.log()}") from None


@pytest.fixture
def lab(inbound: Any, peers: Any, dns_zone: Any) -> Lab:
    return Lab(inbound, peers, dns_zone)


# --- DSNs ----------------------------------------------------------------------------


class Dsn:
    """A DSN as received by a sink: the parsed message and its delivery-status text."""

    def __init__(self, mail_from: str, rcpt_tos: list[str], data: bytes) -> None:
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.raw = data
        self.msg = email.message_from_bytes(data, policy=email.policy.compat32)
        self.parts = self.msg.get_payload() if self.msg.is_multipart() else []
        self.content_types = [p.get_content_type() for p in self.parts]
        m = re.search(rb"Content-Type: message/(?:global-)?delivery-status\r\n.*?\r\n\r\n(.*?)\r\n--",
                      data, re.S)
        self.status_text = m.group(1).decode("utf-8", "replace") if m else ""

    @property
    def final_recipients(self) -> list[str]:
        return re.findall(r"(?m)^Final-Recipient: [^;]+; (.+?)\s*$", self.status_text)

    @property
    def statuses(self) -> list[str]:
        return re.findall(r"(?m)^Status: (\S+)", self.status_text)

    @property
    def diagnostics(self) -> list[str]:
        # unfold continuation lines first
        text = re.sub(r"\r?\n[ \t]+", " ", self.status_text)
        return re.findall(r"(?m)^Diagnostic-Code: (.+?)\s*$", text)


def dsns(sink: Sink) -> list[Dsn]:
    return [Dsn(m.mail_from, m.rcpt_tos, m.data) for m in sink.messages]


def check_dsn(d: Dsn, *, to: str, recipients: list[str], status: str) -> None:
    """The common shape of every failure DSN (RFC 3461/3464)."""
    assert d.mail_from == "", "a DSN goes out with the null reverse-path"
    assert d.rcpt_tos == [to]
    assert d.msg.get_content_type() == "multipart/report", d.raw[:500]
    assert d.msg.get_param("report-type") in ("delivery-status", "global-delivery-status")
    assert d.content_types[:2] == ["text/plain", "message/delivery-status"] or \
        d.content_types[:2] == ["text/plain", "message/global-delivery-status"], d.content_types
    assert d.final_recipients == recipients, d.status_text
    assert d.statuses == [status] * len(recipients), d.status_text
    assert len(d.diagnostics) == len(recipients), d.status_text
    assert all(x.startswith("smtp; ") for x in d.diagnostics), d.diagnostics


def now() -> float:
    return time.monotonic()
