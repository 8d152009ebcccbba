"""A full queue keeps draining (P4): once new mail is refused with 452 4.3.1, the mail
accepted before it is still retried and delivered exactly once, the bounce reports it
owes still commit, and acceptance resumes by itself once delivery has made room below
`queue.high_water`."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from engine.lab.sink.protocol import start_sink
from tests.integration import relay_helpers
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import (
    SENDER,
    Lab,
    body,
    check_dsn,
    dsns,
    lab,  # noqa: F401  (fixture)
    rcpt_of,
    tag_of,
)
from tests.integration.smtp_client import RawSmtp
from tests.integration.test_relay_process import domains_by_shard, relay_config

ZONE = {
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.2"]},
}
SMALL = {"queue": {"max_size": "1MiB"}, "delivery": {"retry": "2s"}}


def offer(port: int, tag: str, rcpts: list[str], pad_lines: int = 0) -> tuple[int, str]:
    """One message on a fresh connection; returns the reply to the end of data."""
    data = body(tag, extra="X-Pad: " + ("x" * 70 + "\r\n") * pad_lines if pad_lines else "")
    with RawSmtp("127.0.0.1", port, timeout=10) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for rcpt in rcpts:
            assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(data + b".\r\n")
        reply = client.reply()
        client.cmd("QUIT")
    return reply


def fill(port: int, rcpts: list[str], pad_lines: int = 0,
         domains: list[str] | None = None) -> list[str]:
    """Offer messages until the queue refuses one with 452 4.3.1; the accepted tags.
    With `domains`, message n goes to m<n>@ the n-th of them (round robin) instead."""
    accepted: list[str] = []
    for n in range(5000):
        to = [f"m{n}@{domains[n % len(domains)]}"] if domains else rcpts
        code, text = offer(port, f"m{n}", to, pad_lines)
        if code != 250:
            assert code == 452 and text.startswith("4.3.1"), (code, text)
            assert len(accepted) >= 5, accepted
            return accepted
        accepted.append(f"m{n}")
    raise AssertionError("the queue never filled")


def test_full_queue_drains_exactly_once_and_acceptance_resumes(lab: Lab):
    # Many small messages: a batch of their deletions touches many pages, which is
    # what a too-small headroom could not hold (MDB_MAP_FULL on the outcome commit,
    # then the same messages sent again and again).
    down = threading.Event()
    down.set()
    sink = lab.sink("127.0.0.2", script=lambda verb, arg: (
        "451 4.3.2 not now" if verb == "RCPT" and down.is_set() else None))
    lab.zone(ZONE)
    server = lab.start(SMALL)
    accepted = fill(server.port, ["bob@dest.test"])
    # Every accepted message had its first, refused attempt while the queue was full.
    lab.wait_log(lambda e: e["outcome"] == "deferred", len(accepted))
    down.clear()
    lab.wait_queue_empty(timeout=60)
    got = Counter(tag_of(m.data) for m in sink.messages)
    assert set(got) == set(accepted), set(accepted) - set(got)
    assert all(n == 1 for n in got.values()), {t: n for t, n in got.items() if n > 1}
    assert not [e for e in server.errors], server.errors
    # Below the mark again: new mail is taken without a restart, and delivered.
    code, text = offer(server.port, "after", ["bob@dest.test"])
    assert code == 250, (code, text)
    wait_until(lambda: any(tag_of(m.data) == "after" for m in sink.messages), 20, "late message")


def test_bounce_report_commits_while_queue_refuses_mail(lab: Lab):
    # Each message has two recipients at one destination: "bad" bounces, "slow" is
    # deferred, so the message stays queued AND owes a report: the report must fit in
    # the headroom kept for it, or the outcome never commits.
    down = threading.Event()
    down.set()

    def script(verb: str, arg: str) -> str | None:
        if verb != "RCPT":
            return None
        if down.is_set():
            return "451 4.3.2 not now"
        return "550 5.1.1 no such user" if rcpt_of(arg).startswith("bad@") else None

    sink = lab.sink("127.0.0.2", script=script)
    home = lab.home_sink()
    lab.zone(ZONE)
    # Every message bounces at the remote itself (the report under test), so the first
    # 5.1.1 must not put bad@ on the suppression list for the rest.
    server = lab.start({**SMALL, "suppression": {"auto_bounce": False}})
    accepted = fill(server.port, ["bad@dest.test", "slow@dest.test"], pad_lines=100)
    lab.wait_log(lambda e: e["outcome"] == "deferred", 2 * len(accepted))
    down.clear()
    lab.wait_sink(home, len(accepted), timeout=60)
    lab.wait_queue_empty(timeout=60)
    reports = dsns(home)
    assert len(reports) == len(accepted)
    for d in reports:
        check_dsn(d, to=SENDER, recipients=["bad@dest.test"], status="5.1.1")
    got = Counter(tag_of(m.data) for m in sink.messages)
    assert set(got) == set(accepted) and all(n == 1 for n in got.values()), got


def test_full_queue_drains_with_two_workers(serve: Any, peers: Any, dns_zone: Any):
    # `volley serve` with two workers sharing the queue: each delivers its own shard,
    # both receive mail, and both must keep draining once the queue refuses mail.
    shards = domains_by_shard(1)
    doms = [shards[0][0], shards[1][0]]
    down = threading.Event()
    down.set()
    refused = relay_helpers.Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and down.is_set():
            refused.bump(rcpt_of(arg))
            return "451 4.3.2 not now"
        return None

    sink = peers.call(start_sink("127.0.0.2", 0, script=script))
    peers.sinks.append(sink)
    zone: dict[str, Any] = {"mx.sink.test": {"A": ["127.0.0.2"]}}
    for d in doms:
        zone[d] = {"MX": [(10, "mx.sink.test")]}
    dns = dns_zone(zone)
    server = serve({**relay_config(dns.port, sink.port, retry="2s"),
                    "queue": {"max_size": "1MiB"}})
    accepted = fill(server.port, [], domains=doms)
    wait_until(lambda: all(refused.get(f"{t}@{doms[int(t[1:]) % 2]}") for t in accepted),
               30, "a first, refused attempt of every accepted message")
    down.clear()
    wait_until(lambda: {tag_of(m.data) for m in sink.messages} >= set(accepted), 60,
               "every accepted message delivered")
    got = Counter(tag_of(m.data) for m in sink.messages)
    assert all(n == 1 for n in got.values()), {t: n for t, n in got.items() if n > 1}
    code, text = offer(server.port, "after", [f"after@{doms[0]}"])
    assert code == 250, (code, text)
    wait_until(lambda: any(tag_of(m.data) == "after" for m in sink.messages), 20, "late message")
