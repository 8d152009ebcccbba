"""`volley sink` pieces without sockets: faults, the store, targets, output, options; and
the lab DNS's refusal of anything but loopback."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.lab.dns import DnsServer, check_loopback
from engine.lab.sink import cli as sink_cli
from engine.lab.sink.state import ACCEPT, DEFER, DISCONNECT, REJECT, Faults


def test_faults_off_always_accepts() -> None:
    faults = Faults(seed=1)
    assert not faults.active
    assert {faults.verdict() for _ in range(1000)} == {ACCEPT}


@pytest.mark.parametrize("kw, verdict", [
    ({"defer_rate": 1.0}, DEFER), ({"reject_rate": 1.0}, REJECT),
    ({"disconnect_rate": 1.0}, DISCONNECT),
])
def test_rate_one_gives_every_transaction_that_verdict(kw: dict[str, float], verdict: int) -> None:
    faults = Faults(seed=3, **kw)
    assert {faults.verdict() for _ in range(1000)} == {verdict}


def test_rates_are_disjoint_slices_and_seeded() -> None:
    def draws(seed: int) -> list[int]:
        faults = Faults(defer_rate=0.2, reject_rate=0.1, disconnect_rate=0.05, seed=seed)
        return [faults.verdict() for _ in range(20000)]

    first = draws(42)
    assert first == draws(42)  # the same seed, the same sequence
    assert first != draws(43)
    share = {v: first.count(v) / len(first) for v in (ACCEPT, DEFER, REJECT, DISCONNECT)}
    # 20,000 seeded draws: each share within 1.5 points of its rate (fixed seed, no flake)
    assert abs(share[DEFER] - 0.2) < 0.015 and abs(share[REJECT] - 0.1) < 0.015
    assert abs(share[DISCONNECT] - 0.05) < 0.015 and abs(share[ACCEPT] - 0.65) < 0.015


def test_unseeded_faults_pick_and_expose_a_seed() -> None:
    faults = Faults(defer_rate=0.5)
    again = Faults(defer_rate=0.5, seed=faults.seed)
    assert [faults.verdict() for _ in range(100)] == [again.verdict() for _ in range(100)]


@pytest.mark.parametrize("kw", [
    {"defer_rate": 0.6, "reject_rate": 0.5}, {"defer_rate": -0.1}, {"reject_rate": 1.5},
    {"latency": -1.0},
])
def test_faults_refuse_impossible_settings(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Faults(**kw)


def test_store_writes_exact_bytes_and_envelopes(tmp_path: Path) -> None:
    store = sink_cli.Store(str(tmp_path / "out"))
    store("a@x.test", ["b@y.test", "c@y.test"], b"Subject: one\r\n\r\nbody\r\n", False)
    store("", ["d@y.test"], b"", True)
    store.close()
    out = tmp_path / "out"
    assert (out / "1.eml").read_bytes() == b"Subject: one\r\n\r\nbody\r\n"
    assert (out / "2.eml").read_bytes() == b""
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["file"], r["mail_from"], r["rcpt_tos"], r["tls"], r["size"]) for r in index] == [
        ("1.eml", "a@x.test", ["b@y.test", "c@y.test"], False, 22), ("2.eml", "", ["d@y.test"], True, 0)]
    assert not list(out.glob(".*.tmp"))  # renamed into place, nothing half-written left


def test_store_numbering_continues_after_existing_files(tmp_path: Path) -> None:
    (tmp_path / "7.eml").write_bytes(b"old")
    store = sink_cli.Store(str(tmp_path))
    store("a@x.test", ["b@y.test"], b"new\r\n", False)
    store.close()
    assert (tmp_path / "7.eml").read_bytes() == b"old"
    assert (tmp_path / "8.eml").read_bytes() == b"new\r\n"


def test_targets_fire_once_each_in_order() -> None:
    fired: list[int] = []
    targets = sink_cli.Targets(lambda n, t: fired.append(n))
    targets.add(3, count=0, last=0.0)
    targets.add(1, count=0, last=0.0)
    for _ in range(2):
        targets()
    assert fired == [1]
    targets.add(2, count=2, last=5.0)  # already reached: reported at once
    targets()
    assert fired == [1, 2, 3]


def _counts(**kw: int) -> SimpleNamespace:
    base = dict(accepted=0, connections=0, deferred=0, rejected=0, disconnected=0, max_live=0,
                last=0.0, live=set())
    return SimpleNamespace(**{**base, **kw})


def test_json_output_lines_parse_and_repeat_only_on_change() -> None:
    buf = io.StringIO()
    out = sink_cli.Output(True, buf)
    out.tick(_counts(accepted=5, connections=1))
    out.tick(_counts(accepted=5, connections=1))  # unchanged: no line
    out.tick(_counts(accepted=6, connections=1, deferred=2))
    out.summary(_counts(accepted=6, connections=1, deferred=2, max_live=1), None)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [line.get("messages") for line in lines] == [5, 6, 6]
    assert "event" not in lines[0] and lines[1]["deferred"] == 2
    assert lines[2]["event"] == "stopped" and lines[2]["max_live"] == 1


def test_plain_output_is_one_line_per_change_and_a_summary() -> None:
    buf = io.StringIO()
    out = sink_cli.Output(False, buf)
    out.tick(_counts(accepted=1, connections=1))
    out.tick(_counts(accepted=1, connections=1))
    out.summary(_counts(accepted=1, connections=1, rejected=1), None)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "messages 1 " in lines[0] and "\r" not in buf.getvalue()
    assert "stopped after" in lines[1] and "1 rejected" in lines[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sink_cli.add_arguments(p)
    return p.parse_args(argv)


def test_options_parse_durations_rates_and_addresses() -> None:
    a = _parse(["--listen", "127.0.0.2:2526", "--listen", "[::1]:0", "--latency", "20ms",
                "--lifetime", "3540", "--defer-rate", "0.25"])
    assert a.listen == [("127.0.0.2", 2526), ("::1", 0)]
    assert a.latency == pytest.approx(0.02) and a.duration == 3540.0 and a.defer_rate == 0.25
    assert _parse(["--listen", "h:1", "--duration", "2m"]).duration == 120.0


@pytest.mark.parametrize("argv", [
    ["--listen", "nohostport"], ["--listen", "h:1", "--reject-rate", "2"],
    ["--listen", "h:1", "--latency", "fast"], [],
])
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "127.255.255.254", "::1", "[::1]"])
def test_lab_dns_accepts_loopback(host: str) -> None:
    assert check_loopback(host) in (host.strip("[]"),)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "192.168.1.1", "::", "8.8.8.8",
                                  "localhost", "::ffff:127.0.0.1"])
def test_lab_dns_refuses_anything_but_loopback(host: str) -> None:
    with pytest.raises(ValueError):
        check_loopback(host)
    with pytest.raises(ValueError):
        DnsServer({}, host=host)
