"""What `volley ctl` tells an operator is what happened (issue 14): the queue's figures
add up and agree between views, reload, flush, mx and drain say what they did. Each
test runs a real `volley serve` and checks the printed figures against what the client
sent and was accepted (its queue ids), counted here independently."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from engine.lab.sink.protocol import start_sink
from tests.integration.control_helpers import CTL_TIMEOUT, ask, ctl, ctl_json, relay_overrides
from tests.integration.harness import REPO, wait_until
from tests.integration.relay_helpers import body, send_many

WAIT = 40.0


def _queued(server: Any, n_units: int) -> dict[str, Any]:
    """The status queue counts once the walk has seen `n_units` (the totals are cached)."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.update(ctl_json(server, "status")["queue"])
        return bool(seen.get("units") == n_units)

    wait_until(done, WAIT, f"status showing {n_units} units")
    return seen


# --- finding: the queue line counts suspended mail twice; by sender disagrees with by domain --


def test_queue_views_add_up_and_agree_with_the_queue(serve):
    server = serve()  # delivery off: every unit stays queued and ready
    ctl(server, "suspend", "held.test")
    # Ground truth, counted here: 6 messages to held.test, 5 with 2 recipients there (11
    # recipients, 6 (message, domain) units), from two senders; 2 more to free.test.
    held = [([f"a{i}@held.test", f"b{i}@held.test"] if i else [f"a{i}@held.test"], body(f"h{i}"))
            for i in range(6)]
    ids = send_many(server.port, held[:3], sender="one@home.test")
    ids += send_many(server.port, held[3:], sender="two@home.test")
    ids += send_many(server.port, [([f"c{i}@free.test"], body(f"f{i}")) for i in range(2)],
                     sender="one@home.test")
    assert len(set(ids)) == 8
    units, held_units = 8, 6

    q = _queued(server, units)
    assert (q["messages"], q["ready"], q["deferred"], q["suspended"]) == (8, 2, 0, held_units)
    line = next(ln for ln in ctl(server, "status").stdout.splitlines() if ln.startswith("queue"))
    assert "8 delivery units" in line and "2 ready, 0 deferred, 6 suspended" in line, line

    by_domain = ctl_json(server, "queue", "--by", "domain")
    by_sender = ctl_json(server, "queue", "--by", "sender")
    by_age = ctl_json(server, "queue", "--by", "age")
    want = {"units": units, "ready": 2, "deferred": 0, "suspended": held_units, "domains": 2}
    for view in (by_domain, by_sender, by_age):
        assert {k: view["totals"][k] for k in want} == want, view["by"]
        for row in view["rows"]:
            assert row["ready"] + row["deferred"] + row.get("suspended", 0) == row["total"], row
    assert by_sender["totals"]["messages"] == 8
    domains = {r["key"]: r for r in by_domain["rows"]}
    assert (domains["held.test"]["total"], domains["held.test"]["state"]) == (held_units, "suspended")
    senders = {r["key"]: r for r in by_sender["rows"]}
    assert senders["two@home.test"] == {**senders["two@home.test"], "total": 3, "suspended": 3,
                                        "ready": 0, "state": "suspended"}
    assert (senders["one@home.test"]["total"], senders["one@home.test"]["suspended"],
            senders["one@home.test"]["ready"]) == (5, 3, 2)
    shown = ctl(server, "queue", "--by", "sender").stdout
    assert "8 delivery units in 2 domains: 2 ready, 0 deferred, 6 suspended" in shown, shown


def _answers(sock: Any) -> bool:
    try:
        return bool(ask(sock, {"cmd": "status"})["ok"])
    except OSError:  # not bound yet
        return False


# --- finding: reload says "configuration reloaded" when it skipped -------------------------------


def test_reload_without_a_config_file_says_it_skipped_and_fails(tmp_path):
    """`volley serve` with no -c runs on the built-in defaults (127.0.0.1:2525, var/ in
    its directory): there is no file to re-read, and ctl reload must not claim it did."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2525)) == 0:
            pytest.skip("127.0.0.1:2525, the built-in listener, is taken on this host")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve"], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    sock = tmp_path / "var" / "volley.sock"

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine", "ctl", "--socket", str(sock), "reload"],
                              capture_output=True, text=True, timeout=CTL_TIMEOUT, env=env, cwd=tmp_path)

    try:
        wait_until(lambda: _answers(sock), WAIT, "serve ready")
        done = reload()
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "reloaded" not in done.stdout and "configuration reloaded" not in done.stderr
        assert "reload skipped" in done.stderr and "built-in defaults" in done.stderr, done.stderr
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


def test_reload_names_the_file_and_what_waits_for_a_restart(serve):
    server = serve()
    done = ctl(server, "reload")
    assert done.stdout == f"configuration reloaded from {server.config_path}\n"
    text = server.config_path.read_text()
    server.config_path.write_text(text.replace("127.0.0.1:0", "127.0.0.1:1"))
    kept = ctl_json(server, "reload")
    assert kept["kept"] == ["listeners"]
    assert "kept as started until a restart: listeners" in ctl(server, "reload").stdout


# --- finding: flush --domain on a suspended domain claims it flushed them ----------------------


def test_flush_of_a_suspended_domain_says_the_suspension_holds_it(serve):
    server = serve()
    ctl(server, "suspend", "held.test", "--reason", "maintenance")
    ids = send_many(server.port, [([f"u{i}@held.test"], body(f"h{i}")) for i in range(6)])
    flushed = ctl(server, "flush", "--domain", "held.test").stdout
    assert flushed.startswith(f"flushed {len(ids)} messages (made due now)\n"), flushed
    assert "held.test is suspended (until resumed): the suspension still holds its mail" in flushed
    assert [s["domain"] for s in ctl_json(server, "flush")["held_by"]] == ["held.test"]
    # The queue's records agree: all six still there, every one suspended.
    listed = ctl_json(server, "list", "--domain", "held.test")["messages"]
    assert sorted(m["id"] for m in listed) == sorted(ids) and {m["state"] for m in listed} == {"suspended"}
    assert ctl(server, "flush", "--domain", "free.test").stdout == "flushed 0 messages (made due now)\n"


# --- finding: mx shows "none" for a domain never looked up --------------------------------------


def test_mx_tells_not_cached_from_a_cached_answer(serve, peers, dns_zone):
    sink = peers.call(start_sink("127.0.0.2", 0))
    peers.sinks.append(sink)
    dns = dns_zone({"a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": ["127.0.0.2"]}})
    server = serve(relay_overrides(dns.port, sink.port))
    never = ctl_json(server, "mx", "never.test")["entries"]
    assert [(e["domain"], e["kind"]) for e in never] == [("never.test", "not_cached")]
    shown = ctl(server, "mx", "never.test").stdout
    assert "not cached" in shown and " none " not in shown, shown
    send_many(server.port, [(["u@a.test"], body("mx1"))])
    wait_until(lambda: len(sink.messages) == 1, WAIT, "a.test delivered")
    (entry,) = ctl_json(server, "mx", "a.test")["entries"]
    assert entry["kind"] == "route" and entry["hosts"][0]["name"] == "mx.a.test"


def test_mx_without_delivery_says_there_is_no_cache(serve):
    server = serve()  # delivery disabled: no worker resolves anything
    done = ctl(server, "mx", "a.test", check=False)
    assert done.returncode == 1 and "delivery is disabled" in done.stderr, (done.stdout, done.stderr)


# --- finding: drain that times out exits 0; status lists the closed listeners -------------------


def test_drain_that_times_out_fails_says_why_and_status_drops_the_listeners(serve):
    server = serve()  # delivery disabled: the queue cannot empty
    ids = send_many(server.port, [([f"u{i}@a.test"], body(f"d{i}")) for i in range(3)])
    drained = ctl(server, "drain", "--timeout-queue", "1", check=False)
    assert drained.returncode == 1, (drained.stdout, drained.stderr)
    assert "queue NOT drained (timed out) in" in drained.stdout
    assert f"{len(ids)} messages remaining" in drained.stdout
    assert "delivery is disabled" in drained.stdout, drained.stdout
    status = ctl_json(server, "status")
    assert status["draining"] is True and status["listeners"] == []
    with socket.socket() as probe:  # the ground truth: nothing accepts on the port
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0
    line = next(ln for ln in ctl(server, "status").stdout.splitlines() if ln.startswith("listeners"))
    assert "closed (draining)" in line and str(server.port) not in line, line
