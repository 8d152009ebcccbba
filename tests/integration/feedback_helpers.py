"""Shared pieces of the feedback-loop tests: the feedback address, tokens for the test
recipients, reports sent over SMTP, and reads of the suppression list and counters."""

from __future__ import annotations

from typing import Any

import orjson

from engine.mail import verp
from tests.feedback_reports import original
from tests.integration.harness import InboundServer
from tests.integration.smtp_client import RawSmtp

FBL = "fbl@bounces.volley.test"
FEEDBACK: dict[str, Any] = {"feedback": {"address": FBL}}
# 127.0.0.1 is then a client from the internet: no relaying, no X-Volley-* tags.
UNTRUSTED: dict[str, Any] = {"relay": {"networks": ["10.0.0.0/8"]}}
CAMPAIGN, TENANT = "spring-2026", "acme"


def token(rcpt: str) -> str:
    return verp.encode_token(rcpt, CAMPAIGN, TENANT)


def sent_to(rcpt: str) -> Any:
    """The message Volley sent `rcpt` for the campaign, as a report returns it."""
    return original(rcpt, message_id=verp.message_id(token(rcpt), "mx.volley.test"))


def transaction(port: int, rcpts: list[str], data: bytes, sender: str = "") -> list[tuple[int, str]]:
    """MAIL, each RCPT, DATA on a fresh connection: every reply from MAIL on (no DATA
    when no RCPT was taken)."""
    replies = []
    with RawSmtp("127.0.0.1", port) as client:
        assert client.cmd("EHLO reporter.example")[0] == 250
        replies.append(client.cmd(f"MAIL FROM:<{sender}>"))
        taken = 0
        for rcpt in rcpts:
            replies.append(client.cmd(f"RCPT TO:<{rcpt}>"))
            taken += replies[-1][0] == 250
        if taken:
            replies.append(client.cmd("DATA"))
            assert replies[-1][0] == 354, replies
            client.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            replies.append(client.reply())
        client.cmd("QUIT")
    return replies


def report(port: int, rcpt: str, data: bytes) -> tuple[int, str]:
    """Send one report from the null sender (RFC 3464 §2); the end-of-data reply."""
    replies = transaction(port, [rcpt], data)
    assert [c for c, _ in replies[:3]] == [250, 250, 354], replies
    return replies[-1]


def suppressed(server: InboundServer, address: str, tenant: str = "") -> Any:
    return server.call(lambda: server.store.suppressed(address, tenant))


def counts(server: InboundServer, tenant: str = TENANT, campaign: str = CAMPAIGN) -> Any:
    return server.call(lambda: server.store.campaign(tenant, campaign))


def events(err: str, prefix: str = "feedback_") -> list[dict[str, Any]]:
    """The log lines (stderr, JSON) whose event starts with `prefix`."""
    out = []
    for line in err.splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if str(entry.get("event", "")).startswith(prefix):
                out.append(entry)
    return out
