"""kill -9 of workers under steady load from concurrent clients (P2, P3).

`volley serve` with two workers, each owning one destination domain (one delivery
connection per domain); four client threads keep sending messages that carry a unique
id (X-Test-Id) for the whole test. While they do, workers are killed at each phase of a
message's life:

- mid-DATA and right after a 250: a dedicated connection is inside DATA and another one
  has just had its 250 when both workers are killed;
- delivery in flight: the sink answers nothing to DATA for one domain, its owner is
  killed while the transaction hangs;
- after the remote's 250, before our commit of it: the sink stops the owner (SIGSTOP)
  before writing its 250, so the worker cannot read the 250 nor commit it, then kills it
  (SIGKILL). That message is delivered twice by construction: the documented window.

Then every message a client got 250 for is counted at the sink by id: none is missing,
and every duplicate's copies straddle a kill of the worker owning its domain (first copy
accepted before that worker died, the next after its kill began): the one window
"remote said 250, our commit of it not done". Under load that window can hold more than
one message per killed worker: the connection goes on to its next transaction while the
previous outcome waits for the group commit, so a kill typically resends the last two or
three deliveries of its domain; the bound here is the straddle, not a count per kill.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter as Tally
from typing import Any

from engine.lab.sink.protocol import NO_REPLY, start_sink
from engine.queue.ids import id_bytes
from engine.queue.layout import owner_of
from tests.integration.faults import open_mid_data
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import SENDER, body, rcpt_of, send, tag_of
from tests.integration.smtp_client import ConnectionDropped, RawSmtp, queue_id
from tests.integration.test_relay_process import domains_by_shard, queued_after_stop, relay_config

CLIENTS = 4
PER_CONNECTION = 5
WAIT = 30.0


class Load:
    """CLIENTS threads sending until stopped; `acked` holds the ids that got 250 after
    end of data. Any other end of a transaction (reset, EOF, timeout, 4xx) leaves the
    message unacknowledged: not ours to keep, so not counted."""

    def __init__(self, port: int, doms: list[str]) -> None:
        self.port = port
        self.doms = doms
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[str] = []
        self.broken = 0  # transactions that ended without a reply (a kill hit them)
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(CLIENTS)]

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"

    def _run(self, k: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with RawSmtp("127.0.0.1", self.port, timeout=10) as client:
                    if client.banner[0] != 220 or client.cmd("EHLO load.test")[0] != 250:
                        continue
                    for _ in range(PER_CONNECTION):
                        tag = f"load{k}-{n}"
                        n += 1
                        if self._one(client, tag) and not self.stop.is_set():
                            continue
                        break
            except (ConnectionDropped, OSError):
                with self.lock:
                    self.broken += 1

    def _one(self, client: RawSmtp, tag: str) -> bool:
        rcpt = f"{tag}@{self.doms[hash(tag) % len(self.doms)]}"
        if client.cmd(f"MAIL FROM:<{SENDER}>")[0] != 250 or client.cmd(f"RCPT TO:<{rcpt}>")[0] != 250:
            return False
        if client.cmd("DATA")[0] != 354:
            return False
        client.send(body(tag) + b".\r\n")
        code, text = client.reply()
        if code != 250:
            return False
        queue_id(text)  # a well-formed "queued as"
        with self.lock:
            self.acked.append(tag)
        return True


def test_kill_9_workers_under_load_loses_no_acknowledged_mail(serve: Any, peers: Any, dns_zone: Any):
    shards = domains_by_shard(1)
    doms = [shards[0][0], shards[1][0]]
    # Who delivers a copy: the owner of its (message, domain) unit (layout.owner_of, queue
    # format 4), from the queue id in the Received header Volley added.
    owner: dict[str | None, int] = {}  # tag → the worker that delivered it
    lock = threading.Lock()
    hold = {"domain": ""}  # the sink answers nothing to DATA for this domain
    held = Tally[str]()
    window = {"slot": -1}  # stop+kill worker `slot` at the next copy it delivers
    window_tags: list[str] = []
    accepted: list[tuple[str | None, float]] = []  # (id, when) per copy the sink accepted
    began: dict[int, float] = {}  # slot → when its current kill began
    kills: list[tuple[int, float, float]] = []  # (slot, began, died)
    pids: dict[int, int] = {}
    rcpt_domain = [""]

    def script(verb: str, arg: str) -> str | None:
        with lock:
            if verb == "RCPT":
                rcpt_domain[0] = rcpt_of(arg).rsplit("@", 1)[1]
            elif verb == "DATA" and rcpt_domain[0] == hold["domain"]:
                held[rcpt_domain[0]] += 1
                return NO_REPLY  # the transaction hangs: a delivery in flight
        return None

    def on_message(mail_from: str, rcpts: list[str], data: bytes, tls: bool) -> None:
        # Runs before the sink writes its 250 (the reply goes out when this returns).
        tag = tag_of(data)
        domain = rcpts[0].rsplit("@", 1)[1]
        qid = re.search(rb" id ([0-9a-f]{16})", data)
        assert qid is not None, data[:300]
        deliverer = owner_of(domain, id_bytes(qid.group(1).decode()), 2)
        with lock:
            accepted.append((tag, time.monotonic()))
            owner[tag] = deliverer
            slot = window["slot"]
            if slot < 0 or deliverer != slot:
                return
            window["slot"] = -1
            window_tags.append(tag or "")
            pid = pids[slot]
            began[slot] = time.monotonic()
        # Stopped now, the worker cannot read the 250 written next, let alone commit it.
        os.kill(pid, signal.SIGSTOP)
        peers.loop.call_soon(os.kill, pid, signal.SIGKILL)

    sink = peers.call(start_sink("127.0.0.2", 0, script=script, on_message=on_message,
                                 keep_segments=False))
    peers.sinks.append(sink)
    zone: dict[str, Any] = {"mx.sink.test": {"A": ["127.0.0.2"]}}
    for d in doms:
        zone[d] = {"MX": [(10, "mx.sink.test")]}
    dns = dns_zone(zone)
    server = serve(relay_config(dns.port, sink.port, max_connections_per_domain=1))
    pids.update(enumerate(server.worker_pids))

    def kill(slot: int) -> None:
        with lock:
            began[slot] = time.monotonic()
        os.kill(pids[slot], signal.SIGKILL)

    def restarted(slot: int) -> int:
        """Waits for `slot`'s worker to exit by SIGKILL and be replaced; the new pid."""
        exited = server.wait_for(lambda e: e.get("event") == "worker_exited" and e.get("slot") == slot,
                                 WAIT)
        assert exited["status"] == -signal.SIGKILL, exited
        with lock:
            kills.append((slot, began[slot], time.monotonic()))
        new = server.wait_for(lambda e: e.get("event") == "worker_restarted" and e.get("slot") == slot,
                              WAIT)
        return int(new["pid"])

    def progress(n: int = 10) -> None:
        base = load.count()
        wait_until(lambda: load.count() >= base + n, WAIT, f"{n} more messages acknowledged")

    with Load(server.port, doms) as load:
        progress()
        # 1. mid-DATA and right after a 250, with the load running.
        mid = open_mid_data(server.port, SENDER, f"r@{doms[0]}")
        send(server.port, [f"r@{doms[1]}"], body("after-250"))
        for slot in (0, 1):
            kill(slot)
        for slot in (0, 1):
            pids[slot] = restarted(slot)
        assert mid.at_eof()
        mid.close()
        progress()

        # 2. a delivery in flight (the remote's answer to DATA not sent), under load.
        with lock:
            hold["domain"] = doms[1]
        wait_until(lambda: held[doms[1]] > 0, WAIT, "a delivery held at DATA")
        kill(1)
        pids[1] = restarted(1)
        with lock:
            hold["domain"] = ""

        async def drop_held() -> None:
            # Only transactions of doms[1] between RCPT and the data's reply: no 250 for
            # a message is outstanding there, so the abort cannot add a duplicate.
            for proto in list(sink.live):
                if (proto.transport is not None and proto.mode == "command" and proto.rcpts
                        and proto.rcpts[0].endswith("@" + doms[1])):
                    proto.transport.abort()

        peers.call(drop_held())
        progress()

        # 3. the remote said 250, our commit of it cannot have happened.
        for slot in (0, 1):
            with lock:
                window["slot"] = slot
            pids[slot] = restarted(slot)
            progress()

    acked = set(load.acked) | {"after-250"}
    try:
        wait_until(lambda: {tag_of(m.data) for m in sink.messages} >= acked, WAIT,
                   "every acknowledged message delivered")
    except TimeoutError:
        missing = sorted(acked - {tag_of(m.data) for m in sink.messages})
        raise AssertionError(f"{len(missing)} acknowledged, never delivered: {missing[:20]}; "
                             f"kills {kills}, live {[(p.mode, p.rcpts) for p in sink.live]}") from None
    copies = Tally(tag_of(m.data) for m in sink.messages)
    assert "mid-data" not in copies
    assert len(acked) >= 50, len(acked)  # the load was real
    # The stopped-then-killed workers never committed what the sink accepted: resent.
    # (>= 2: the stopped delivery may itself have been a resend after an earlier kill.)
    assert all(copies[t] >= 2 for t in window_tags), (window_tags, copies)
    dups = {t: n for t, n in copies.items() if n > 1}
    # Each duplicate straddles a kill of the worker owning its unit: the first copy was
    # accepted before that worker died, the second after the kill began.
    for tag in dups:
        times = sorted(when for t, when in accepted if t == tag)
        slot = owner[tag]
        for before, after in zip(times, times[1:]):
            assert any(s == slot and before <= died and after >= start
                       for s, start, died in kills), (tag, times, kills)
    assert queued_after_stop(server) == 0
