"""AUTH brute force across sessions (P8): failures are counted per client address, each
failed AUTH is answered only after a delay, and an address that used up its failures
gets 421 4.7.0 on AUTH, even with the right password, until its window ends; another
address is not affected. Real sockets, real scrypt (engine/inbound/auth_failures.py)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.inbound.auth_failures import MAX_ADDRESSES, AuthFailures
from engine.inbound.users import set_user
from tests.integration.harness import InboundServer
from tests.integration.smtp_raw import RawClient

GOOD = base64.b64encode(b"\0alice\0secret").decode()
BAD = base64.b64encode(b"\0alice\0wrong").decode()
DELAY = 0.2


@pytest.fixture
def guarded(inbound: Callable[..., InboundServer], tmp_path: Path) -> InboundServer:
    users = tmp_path / "users"
    set_user(str(users), "alice", "secret")
    return inbound({
        "auth": {"users_file": str(users)},
        "limits": {"max_auth_failures": 2, "max_auth_failures_per_ip": 3,
                   "auth_failure_window": "60s", "auth_failure_delay": f"{int(DELAY * 1000)}ms"},
        "listeners": [{"address": "127.0.0.1:0", "auth": "optional", "allow_plaintext_auth": True}],
    })


def _auth(port: int, payload: str, source: str | None = None) -> Any:
    with RawClient(port, source=source) as c:
        c.ehlo()
        started = time.monotonic()
        reply = c.cmd(f"AUTH PLAIN {payload}")
        return reply, time.monotonic() - started


def test_failures_from_one_address_add_up_across_sessions(guarded: InboundServer) -> None:
    for _ in range(3):  # three sessions, one wrong password each: the address's quota
        reply, waited = _auth(guarded.port, BAD)
        assert (reply.code, reply.enhanced) == (535, "5.7.8")
        assert waited >= DELAY  # the answer to a wrong password is never quick
    reply, _ = _auth(guarded.port, GOOD)  # even the right password: no guess is checked now
    assert (reply.code, reply.enhanced) == (421, "4.7.0") and "your address" in reply.text
    other, _ = _auth(guarded.port, GOOD, source="127.0.0.2")
    assert other.code == 235  # another address is not held back by this one's guesses


def test_a_right_password_is_answered_without_the_delay_and_counts_nothing(guarded: InboundServer) -> None:
    for _ in range(5):
        reply, _ = _auth(guarded.port, GOOD)
        assert reply.code == 235
    assert len(guarded.call(lambda: guarded.runtime.ctx.auth_failures)) == 0


def test_the_table_forgets_after_the_window_and_stays_bounded() -> None:
    table = AuthFailures(limit=2, window=60.0)
    table.failed("192.0.2.1", now=0.0)
    table.failed("192.0.2.1", now=1.0)
    assert table.blocked("192.0.2.1", now=59.0)
    assert not table.blocked("192.0.2.1", now=60.0)  # the window is over: a fresh start
    assert not table.blocked("192.0.2.2", now=1.0)
    for i in range(MAX_ADDRESSES + 5):  # a flood of addresses: the table stays bounded
        table.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now=100.0 + i)
    assert len(table) <= MAX_ADDRESSES
    assert table.blocked("10.0.0.0", now=100.0 + MAX_ADDRESSES) is False  # oldest forgotten first


def test_zero_turns_the_brake_off() -> None:
    table = AuthFailures(limit=0, window=60.0)
    for _ in range(100):
        table.failed("192.0.2.1", now=1.0)
    assert not table.blocked("192.0.2.1", now=2.0)
