"""`volley sink` as a real process on 127.0.0.x, driven by the standard library's smtplib.

Every wait polls a real condition (a line the process printed, its exit) with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import wait_until
from tests.integration.test_cli import _run_on_pty

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.7"
MESSAGE = (b"From: <a@x.test>\r\nTo: <b@y.test>\r\nSubject: sink test\r\n\r\n"
           b"line one\r\n.a line that starts with a dot\r\n..two dots\r\nlast\r\n")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class SinkProc:
    """`python -m engine sink ARGS` with its stdout lines collected by a thread."""

    def __init__(self, *args: str, json_lines: bool = True, module: list[str] | None = None) -> None:
        argv = module or ["-m", "engine", "sink"]
        extra = ["--json"] if json_lines else []
        self.proc = subprocess.Popen(
            [sys.executable, *argv, "--listen", f"{HOST}:0", *extra, *args], cwd=REPO, env=_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.err = ""
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()
        self.port = 0
        if json_lines:
            ready = self.wait_event(lambda e: e.get("event") == "ready")
            self.port = int(ready["listeners"][0].rpartition(":")[2])
            self.ready = ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self.lines]

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            if self.proc.poll() is not None and not found:
                found.extend(e for e in self.events() if pred(e))
                if not found:
                    raise AssertionError(f"sink exited {self.proc.returncode}: {self.lines} {self.err}")
            found[:] = [e for e in self.events() if pred(e)]
            return bool(found)

        wait_until(seen, timeout, "a sink line")
        return found[-1]

    def counts(self) -> dict[str, Any]:
        return [e for e in self.events() if "event" not in e][-1]

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return self.wait_event(lambda e: e.get("event") == "stopped", 5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for t in self._threads:
            t.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def sinks() -> Any:
    started: list[SinkProc] = []

    def start(*args: str, **kw: Any) -> SinkProc:
        started.append(SinkProc(*args, **kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port, timeout=10)
    client.ehlo("client.test")
    return client


def test_counts_messages_and_sigterm_prints_the_summary(sinks: Any) -> None:
    sink = sinks("--interval", "0.1", "--seed", "5")
    assert sink.ready["starttls"] is True and sink.ready["seed"] == 5
    with _client(sink.port) as client:
        for i in range(5):
            client.sendmail("a@x.test", [f"u{i}@y.test", "v@y.test"], MESSAGE)
    sink.wait_event(lambda e: e.get("messages") == 5 and "event" not in e)
    line = sink.counts()
    assert line["connections"] == 1 and line["deferred"] == line["rejected"] == 0
    summary = sink.stop()
    assert sink.proc.returncode == 0
    assert (summary["messages"], summary["connections"], summary["max_live"]) == (5, 1, 1)
    assert (summary["deferred"], summary["rejected"], summary["disconnected"]) == (0, 0, 0)


def test_store_writes_what_was_sent(sinks: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sink = sinks("--store", str(store))
    bodies = [MESSAGE, MESSAGE.replace(b"last", b"second"), b"Subject: tiny\r\n\r\n.\r\n"]
    with _client(sink.port) as client:
        for i, body in enumerate(bodies):
            client.sendmail(f"s{i}@x.test", [f"r{i}@y.test"], body)
    wait_until(lambda: len(list(store.glob("*.eml"))) == 3, 30, "three stored messages")
    assert [(store / f"{i + 1}.eml").read_bytes() for i in range(3)] == bodies
    summary = sink.stop()
    assert summary["stored"] == 3
    index = [json.loads(line) for line in (store / "index.jsonl").read_text().splitlines()]
    assert [(r["mail_from"], r["rcpt_tos"]) for r in index] == [
        (f"s{i}@x.test", [f"r{i}@y.test"]) for i in range(3)]


@pytest.mark.parametrize("flag, code", [("--defer-rate", 451), ("--reject-rate", 550)])
def test_rate_one_refuses_every_transaction(sinks: Any, flag: str, code: int) -> None:
    sink = sinks(flag, "1", "--interval", "0.1")
    with _client(sink.port) as client:
        for _ in range(3):
            with pytest.raises(smtplib.SMTPDataError) as err:
                client.sendmail("a@x.test", ["b@y.test"], MESSAGE)
            assert err.value.smtp_code == code
    summary = sink.stop()
    key = "deferred" if code == 451 else "rejected"
    assert summary[key] == 3 and summary["messages"] == 0


def test_disconnect_rate_one_drops_every_transaction(sinks: Any) -> None:
    sink = sinks("--disconnect-rate", "1")
    for _ in range(2):
        client = _client(sink.port)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("a@x.test", ["b@y.test"], MESSAGE)
        client.close()
    summary = sink.stop()
    assert summary["disconnected"] == 2 and summary["messages"] == 0


def test_latency_delays_the_end_of_data_reply(sinks: Any) -> None:
    sink = sinks("--latency", "300ms")
    with _client(sink.port) as client:
        client.mail("a@x.test")
        client.rcpt("b@y.test")
        t0 = time.monotonic()
        code, _ = client.data(MESSAGE)
        waited = time.monotonic() - t0
        assert code == 250
        assert client.noop()[0] == 250  # the connection carries on after the delayed reply
    assert waited >= 0.3  # a lower bound only: the box may be slower, never faster


def test_pipelining_and_starttls_are_advertised_unless_switched_off(sinks: Any) -> None:
    default = sinks()
    with _client(default.port) as client:
        assert client.has_extn("pipelining") and client.has_extn("starttls")
        assert not client.has_extn("chunking")
    plain = sinks("--no-pipelining", "--no-starttls", "--chunking")
    assert plain.ready["starttls"] is False
    with _client(plain.port) as client:
        assert not client.has_extn("pipelining") and not client.has_extn("starttls")
        assert client.has_extn("chunking")
        code, _ = client.docmd("STARTTLS")
        assert code == 502


def test_starttls_handshake_works_with_the_throwaway_certificate(sinks: Any, tmp_path: Path) -> None:
    sink = sinks("--store", str(tmp_path))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a self-signed lab certificate: encryption, no identity
    with _client(sink.port) as client:
        client.starttls(context=ctx)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")  # offered only before TLS
        assert isinstance(client.sock, ssl.SSLSocket) and client.sock.version() is not None
        client.sendmail("a@x.test", ["b@y.test"], MESSAGE)
    wait_until(lambda: (tmp_path / "index.jsonl").exists()
               and b'"tls": true' in (tmp_path / "index.jsonl").read_bytes(), 30, "a stored TLS message")
    assert (tmp_path / "1.eml").read_bytes() == MESSAGE


def test_given_certificate_is_the_one_served(sinks: Any, tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    sink = sinks("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)  # verification on: only the given certificate passes
    with _client(sink.port) as client:
        client.starttls(context=ctx)
        client.ehlo("client.test")
        client.sendmail("a@x.test", ["b@y.test"], MESSAGE)
    assert sink.stop()["messages"] == 1


def test_plain_output_and_duration_end_the_run_by_itself(sinks: Any) -> None:
    sink = sinks("--duration", "1s", json_lines=False)
    assert sink.proc.wait(30) == 0
    text = "\n".join(sink.lines)
    assert f"listening on {HOST}:" in text and "stopped after" in text and "0 messages" in text


def test_bad_rates_and_busy_address_fail_cleanly(sinks: Any) -> None:
    bad = subprocess.run([sys.executable, "-m", "engine", "sink", "--listen", f"{HOST}:0",
                          "--defer-rate", "0.7", "--reject-rate", "0.5"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "more than 1" in bad.stderr
    first = sinks()
    busy = subprocess.run([sys.executable, "-m", "engine", "sink", "--listen", f"{HOST}:{first.port}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=30)
    assert busy.returncode == 1 and "volley sink:" in busy.stderr and "in use" in busy.stderr


def test_bench_mode_reports_targets_and_exits_when_stdin_closes(sinks: Any) -> None:
    # bench/relay_peers.py starts the sink so: `python -m engine.lab.sink --json --no-starttls ...`
    sink = sinks("--targets-from-stdin", module=["-m", "engine.lab.sink", "--json", "--no-starttls"])
    assert sink.ready["starttls"] is False  # the benchmark destination stays plaintext
    assert sink.proc.stdin is not None
    sink.proc.stdin.write("2\n")
    sink.proc.stdin.flush()
    with _client(sink.port) as client:
        for _ in range(2):
            client.sendmail("a@x.test", ["b@y.test"], MESSAGE)
    reached = sink.wait_event(lambda e: e.get("event") == "reached")
    assert reached["target"] == 2 and reached["t"] <= time.monotonic()
    sink.proc.stdin.close()
    assert sink.proc.wait(30) == 0
    assert sink.wait_event(lambda e: e.get("event") == "stopped")["messages"] == 2


def test_status_line_is_rewritten_in_place_on_a_terminal() -> None:
    code, out = _run_on_pty(["sink", "--listen", f"{HOST}:0", "--interval", "0.1", "--duration", "1s"],
                            REPO, [])
    assert code == 0
    assert out.count("\r\x1b[K") >= 2  # the status line overwritten, not scrolled
    assert "stopped after" in out
