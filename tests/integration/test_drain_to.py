"""`volley ctl drain --to HOST:PORT` between two real `volley serve` nodes on loopback.

Node A queues mail its destination defers (a sink answering 451 to every RCPT, so
every recipient has an attempt behind it); the drain hands A's queue to node B, which trusts A
as a relay network. Checked against counts kept outside the servers: the records B
stored (read from B's own LMDB) against what the test sent and what A's delivery log
says of each recipient's attempts; A's queue; the summary's figures against B's; and,
after a flush on B, the sink's count of each message (exactly once). Then the peer
refusing some messages (they stay on A), and an untrusted client's handover field
(removed and ignored)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from engine.inbound.handover import Handover
from engine.inbound.users import set_user
from engine.lab.sink.protocol import start_sink
from engine.queue.records import PENDING, MessageRecord, decode_record
from engine.queue.store import QueueStore
from tests.integration.control_helpers import ctl, ctl_json, relay_overrides
from tests.integration.harness import REPO, ServeProcess, wait_until
from tests.integration.relay_helpers import SENDER, tag_of
from tests.integration.smtp_client import RawSmtp, queue_id
from tests.integration.test_metrics_truth import samples

N = int(os.environ.get("VOLLEY_TEST_DRAIN_N", "10000"))  # the figure
SINK_IP, A_IP, B_IP = "127.0.0.2", "127.0.0.4", "127.0.0.5"
WAIT = 300.0


def dead_port() -> int:
    with socket.socket() as s:  # bound and closed: nothing listens there
        s.bind((SINK_IP, 0))
        return int(s.getsockname()[1])


def zone() -> dict[str, Any]:
    return {"a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": [SINK_IP]}}


def node(serve: Any, ip: str, dns: int, port: int, **extra: Any) -> ServeProcess:
    cfg = relay_overrides(dns, port, retry="1h", backoff="1h", backoff_max="1h")
    cfg["listeners"] = [{"address": f"{ip}:0"}]
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return serve(cfg)  # type: ignore[no-any-return]


def message(i: int) -> tuple[list[str], str, list[str], bytes]:
    """(recipients, MAIL parameters, RCPT parameters, content) of message i: every
    tenth has two recipients, every third RET/ENVID, every other NOTIFY/ORCPT."""
    rcpts = [f"u{i}@a.test"] + ([f"v{i}@a.test"] if i % 10 == 0 else [])
    mail = f"RET=HDRS ENVID=env{i}" if i % 3 == 0 else ""
    rcpt = [f"NOTIFY=FAILURE,DELAY ORCPT=rfc822;{r}" if i % 2 == 0 else "" for r in rcpts]
    data = (f"From: <{SENDER}>\r\nSubject: m{i}\r\nX-Test-Id: m{i}\r\n"
            f"X-Volley-Campaign: c{i % 5}\r\nX-Volley-Tenant: t{i % 2}\r\n"
            f"Volley-Priority: {i % 10}\r\n\r\nbody {i}\r\n").encode()
    return rcpts, mail, rcpt, data


def queue_many(port: int, host: str, indexes: range, threads: int = 4) -> dict[int, str]:
    """Send messages `indexes` on `threads` connections; message index → queue id."""
    ids: dict[int, str] = {}

    def run(part: list[int]) -> None:
        with RawSmtp(host, port, timeout=30) as c:
            assert c.cmd("EHLO client.test")[0] == 250
            for i in part:
                rcpts, mail, rcpt, data = message(i)
                assert c.cmd(f"MAIL FROM:<{SENDER}> {mail}".rstrip())[0] == 250
                for r, p in zip(rcpts, rcpt):
                    assert c.cmd(f"RCPT TO:<{r}> {p}".rstrip())[0] == 250
                assert c.cmd("DATA")[0] == 354
                c.send(data + b".\r\n")
                code, text = c.reply()
                assert code == 250, text
                ids[i] = queue_id(text)

    workers = [threading.Thread(target=run, args=(list(indexes)[k::threads],)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(ids) == len(indexes)
    return ids


def records(server: ServeProcess) -> dict[str, MessageRecord]:
    """Subject tag → record, read from the node's own queue (LMDB, another reader)."""
    store = QueueStore(str(server.config_path.parent / "queue"), map_size=256 << 20, shards=2)
    try:
        out = {}
        after = b""
        while page := store.scan_records(after, 1024):
            after = page[-1][0]
            bodies = store.get_bodies([mid for mid, _ in page])
            for (_, raw), content in zip(page, bodies, strict=True):
                assert content is not None
                out[tag_of(content) or ""] = decode_record(raw)
        return out
    finally:
        store.close()


def delivery_log(server: ServeProcess) -> list[dict[str, Any]]:
    path = server.config_path.parent / "delivery.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def drain_to(server: ServeProcess, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "engine", "ctl", "-c", str(server.config_path), "drain",
         "--to", target, *args], capture_output=True, text=True, timeout=WAIT, env=env)


@pytest.mark.timeout(900)  # 10,000 messages queued, handed over and delivered on a loaded machine
def test_drain_to_hands_the_queue_over_with_its_history(serve, peers, dns_zone):
    sink = peers.call(start_sink(SINK_IP, 0))
    # A's destination defers every recipient at RCPT: each has one attempt behind it.
    later = peers.call(start_sink(SINK_IP, 0, script=lambda verb, arg: (
        "451 4.7.1 try again later" if verb == "RCPT" else None)))
    peers.sinks.extend([sink, later])
    dns = dns_zone(zone())
    a = node(serve, A_IP, dns.port, later.port)
    b = node(serve, B_IP, dns.port, sink.port)
    ids = queue_many(a.port, A_IP, range(N))
    recipients = sum(len(message(i)[0]) for i in range(N))
    # Every recipient was tried once (the dead port) before the handover.
    wait_until(lambda: sum(1 for e in delivery_log(a) if e["outcome"] == "deferred") >= recipients,
               WAIT, "every recipient deferred once on A")
    attempts = Counter((e["id"], e["recipient"]) for e in delivery_log(a) if e["outcome"] == "deferred")
    before = records(a)

    done = drain_to(a, f"{B_IP}:{b.port}", "--connections", "4")
    assert done.returncode == 0, done.stdout + done.stderr + repr(records(a))
    summary = done.stdout.splitlines()[-1]
    print(summary)  # the run's time, for the record (-s)
    # The summary's figures against B's own count and A's queue, below.
    assert (f"{N} messages sent; {N} handed over, 0 partly (the rest of their recipients stay "
            f"here), 0 refused; {recipients} recipients taken by the peer; 0 messages left here"
            in summary), done.stdout
    assert summary.startswith(f"handover to {B_IP}:{b.port} done in "), summary
    assert ctl_json(a, "status")["queue"]["messages"] == 0
    after = records(b)
    assert len(after) == N
    wait_until(lambda: samples(b)["volley_messages_received_total"] == N, WAIT, "B counted them")
    assert samples(a)["volley_messages_handed_over_total"] == recipients
    handed = [e for e in delivery_log(a) if e["outcome"] == "handed-over"]
    assert len(handed) == recipients and {e["to"] for e in handed} == {f"{B_IP}:{b.port}"}
    for i in range(N):
        old, new = before[f"m{i}"], after[f"m{i}"]
        assert (new.sender, new.ret, new.envid) == (old.sender, old.ret, old.envid)
        assert (new.campaign, new.tenant, new.priority) == (f"c{i % 5}", f"t{i % 2}", i % 10)
        assert (new.received_at, new.sign, new.client_ip) == (old.received_at, True, old.client_ip)
        assert [(r.address, r.notify, r.orcpt, r.state, r.attempts, r.next_attempt) for r in new.recipients] == [
            (r.address, r.notify, r.orcpt, PENDING, attempts[(ids[i], r.address)], r.next_attempt)
            for r in old.recipients]
        assert all(r.attempts == 1 for r in new.recipients)

    ctl(b, "flush")  # B retries at A's next attempt (1 h): now
    wait_until(lambda: len(sink.messages) >= recipients or len(sink.messages) >= N, WAIT, "B delivered")
    wait_until(lambda: ctl_json(b, "status")["queue"]["messages"] == 0, WAIT, "B's queue empty")
    got = Counter((tag_of(m.data), r) for m in sink.messages for r in m.rcpt_tos)
    assert got == Counter((f"m{i}", r) for i in range(N) for r in message(i)[0])
    assert all(b"X-Volley-Handover" not in m.data for m in sink.messages)


def test_what_the_peer_refuses_stays_on_the_origin(serve, peers, dns_zone):
    dns = dns_zone(zone())
    a = node(serve, A_IP, dns.port, dead_port())
    # B takes messages up to 2 KiB: the padded ones are refused at MAIL (SIZE, RFC 1870).
    b = node(serve, B_IP, dns.port, dead_port(), limits={"max_message_size": "2KiB"})
    ids = queue_many(a.port, A_IP, range(20), threads=2)
    big = [queue_many_big(a.port, k) for k in range(3)]
    done = drain_to(a, f"{B_IP}:{b.port}")
    assert done.returncode == 1, (done.stdout, done.stderr)
    reply = orjson.loads(drain_to(a, f"{B_IP}:{b.port}", "--json").stdout)
    assert reply["left"] == 3 and reply["refused"] == 3 and reply["handed_over"] == 0  # the second run
    left = records(a)
    assert sorted(left) == ["big0", "big1", "big2"] and len(big) == 3
    assert all(r.state == PENDING for rec in left.values() for r in rec.recipients)
    assert sorted(records(b)) == sorted(f"m{i}" for i in ids)
    assert "3 refused" in done.stdout and "3 messages left here" in done.stdout, done.stdout
    assert ctl_json(b, "status")["queue"]["messages"] == 20


def queue_many_big(port: int, k: int) -> str:
    data = (f"From: <{SENDER}>\r\nSubject: big\r\nX-Test-Id: big{k}\r\n\r\n" + "x" * 70 + "\r\n").encode() * 60
    with RawSmtp(A_IP, port, timeout=30) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<big{k}@a.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        code, text = c.reply()
        assert code == 250, text
        return queue_id(text)


def test_an_untrusted_clients_handover_field_is_removed_and_ignored(serve, tmp_path: Path):
    b = serve({"listeners": [{"address": f"{B_IP}:0"}],
               "relay": {"networks": ["192.0.2.0/24"], "local_domains": ["local.test"]}})
    forged = Handover(origin="evil", received_at=1.0, campaign="stolen", tenant="t",
                      priority=9, sign=True)
    field = base64.b64encode(msgspec.msgpack.encode(forged)).decode()
    data = (f"X-Volley-Handover: {field}\r\nFrom: <{SENDER}>\r\nX-Test-Id: forged\r\n\r\nhi\r\n").encode()
    with RawSmtp(B_IP, b.port, timeout=10) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<x@outside.test>")[0] == 250
        assert c.cmd("RCPT TO:<user@local.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        assert c.reply()[0] == 250
    (rec,) = records(b).values()
    assert (rec.campaign, rec.tenant, rec.priority, rec.sign) == ("", "", 5, False)
    assert rec.received_at > 1000.0
    shown = ctl_json(b, "list")["messages"][0]
    headers = ctl_json(b, "show", shown["id"])["message"]["headers"]
    assert all(name.lower() != "x-volley-handover" for name, _ in headers), headers


def test_a_peer_killed_mid_handover_loses_nothing(serve, peers, dns_zone):
    dns = dns_zone(zone())
    a = node(serve, A_IP, dns.port, dead_port())
    b = node(serve, B_IP, dns.port, dead_port())
    n = 1500
    queue_many(a.port, A_IP, range(n), threads=2)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    running = subprocess.Popen(
        [sys.executable, "-m", "engine", "ctl", "-c", str(a.config_path), "drain", "--to",
         f"{B_IP}:{b.port}", "--connections", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until(lambda: len(delivery_log_lines(a, "handed-over")) >= 100, WAIT, "the handover under way")
    os.killpg(b.proc.pid, 9)  # the peer dies mid-transaction, with no goodbye
    out, err = running.communicate(timeout=WAIT)
    assert running.returncode == 1, out + err
    left, there = set(records(a)), set(records(b))
    everything = {f"m{i}" for i in range(n)}
    # At least once: every message is still here or on the peer; what left here is there.
    assert left | there == everything
    assert everything - left <= there
    assert left and there, out  # it was killed mid-way
    assert f"{len(left)} messages left here" in out, out
    assert len({e["id"] for e in delivery_log_lines(a, "handed-over")}) == n - len(left)


def delivery_log_lines(server: ServeProcess, outcome: str) -> list[dict[str, Any]]:
    return [e for e in delivery_log(server) if e["outcome"] == outcome]


def test_a_peer_without_dsn_gets_nothing(serve, peers, dns_zone):
    sink = peers.call(start_sink(B_IP, 0))  # a plain SMTP server: no DSN to carry NOTIFY/ORCPT
    peers.sinks.append(sink)
    dns = dns_zone(zone())
    a = node(serve, A_IP, dns.port, dead_port())
    queue_many(a.port, A_IP, range(5), threads=1)
    done = drain_to(a, f"{B_IP}:{sink.port}")
    assert done.returncode == 1 and "does not offer DSN" in done.stdout, done.stdout
    assert "5 messages left here" in done.stdout and sink.messages == []
    assert len(records(a)) == 5


def test_a_peer_that_trusts_by_auth_takes_it_and_the_password_stays_out_of_the_log(
        serve, peers, dns_zone, tls_files, tmp_path: Path):
    users = tmp_path / "users"
    set_user(str(users), "node-a", "s3cret-pw", ln=10)  # low scrypt cost: a fast test
    dns = dns_zone(zone())
    a = node(serve, A_IP, dns.port, dead_port())
    # B trusts no network of ours: only the login makes A's handover field count.
    b = serve({"listeners": [{"address": f"{B_IP}:0", "tls": "starttls", "auth": "optional"}],
               "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
               "auth": {"users_file": str(users)},
               "relay": {"networks": ["192.0.2.0/24"]}})
    queue_many(a.port, A_IP, range(10), threads=1)
    env = dict(os.environ, PYTHONPATH=str(REPO), VOLLEY_DRAIN_PASSWORD="s3cret-pw")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "ctl", "-c", str(a.config_path), "drain", "--to",
         f"{B_IP}:{b.port}", "--user", "node-a", "--tls", "required"],
        capture_output=True, text=True, timeout=WAIT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 handed over" in done.stdout
    there = records(b)
    assert sorted(there) == sorted(f"m{i}" for i in range(10))
    assert all((r.campaign, r.auth_user) == (f"c{int(t[1:]) % 5}", None) for t, r in there.items())
    audit = a.wait_for(lambda e: e.get("event") == "control_command" and e["request"].get("to"), 10)
    assert audit["request"]["user"] == "node-a" and audit["request"]["password"] == "(hidden)"
    assert not [e for e in a.log if "s3cret-pw" in orjson.dumps(e).decode()]


def test_recipients_the_peer_refuses_stay_on_the_origin_and_the_others_go(serve, peers, dns_zone):
    dns = dns_zone(zone())
    a = node(serve, A_IP, dns.port, dead_port())
    b = node(serve, B_IP, dns.port, dead_port())
    ctl(b, "suppress", "add", "v0@a.test")  # B refuses it at RCPT (550 5.7.1)
    ctl(b, "suppress", "add", "v10@a.test")
    queue_many(a.port, A_IP, range(12), threads=1)  # m0 and m10 have u… and v… recipients
    done = drain_to(a, f"{B_IP}:{b.port}")
    assert done.returncode == 1, done.stdout
    # 12 sent: 10 whole, 2 partly; 12 recipients taken (14 - the 2 refused); 2 left here.
    assert ("12 messages sent; 10 handed over, 2 partly (the rest of their recipients stay "
            "here), 0 refused; 12 recipients taken by the peer; 2 messages left here") in done.stdout
    assert "<v0@a.test>: 550 5.7.1" in done.stdout and "<v10@a.test>: 550 5.7.1" in done.stdout
    left = records(a)
    assert sorted(left) == ["m0", "m10"]
    for tag, rec in left.items():
        u, v = rec.recipients
        assert (u.address, u.state, v.address, v.state) == (f"u{tag[1:]}@a.test", 1, f"v{tag[1:]}@a.test", PENDING)
        assert u.last_reply.startswith(f"handed-over to {B_IP}:{b.port}: 250")
    there = records(b)
    assert len(there) == 12 and [r.address for r in there["m0"].recipients] == ["u0@a.test"]
