"""`volley blast` argument handling: defaults, units, and combinations refused."""

from __future__ import annotations

import pytest

from engine import cli
from engine.lab.blast.cli import build_parser, options_from_args
from engine.lab.blast.run import BlastOptions


def _options(*argv: str) -> BlastOptions:
    return options_from_args(build_parser().parse_args(list(argv)))


def test_defaults() -> None:
    o = _options()
    assert (o.host, o.port, o.messages, o.concurrency, o.size, o.sizes) == (
        "127.0.0.1", 2525, 1000, 10, 1024, "")
    assert o.pipelining and o.chain and not o.tls and o.duration == 0 and o.timeout == 30


def test_flags_map_to_options() -> None:
    o = _options("--to", "[::1]:2600", "-n", "50", "-c", "3", "-m", "7", "-r", "2",
                 "--domains", "9", "--size", "10k", "--rate", "20", "--duration", "1m",
                 "--no-pipelining", "--tls-verify", "--auth", "u:p:w", "--auth-mech", "login",
                 "--timeout", "500ms",
                 "--from", "x@y.test", "--to-template", "r{n}@{d}.test")
    assert (o.host, o.port, o.messages, o.concurrency, o.messages_per_session) == ("::1", 2600, 50, 3, 7)
    assert (o.recipients, o.domains, o.size, o.rate, o.duration, o.timeout) == (2, 9, 10_000, 20, 60, 0.5)
    assert not o.pipelining and o.tls and o.tls_verify and o.auth == "u:p:w"
    assert o.auth_mech == "login" and _options("--auth", "u:p").auth_mech == ""
    assert (o.sender, o.rcpt_template) == ("x@y.test", "r{n}@{d}.test")


def test_distribution_goes_to_sizes_and_duration_alone_means_no_count_limit() -> None:
    o = _options("--size", "1k-2k", "--duration", "30s")
    assert o.sizes == "1k-2k" and o.messages == 0 and o.duration == 30.0
    assert _options("--duration", "2", "-n", "5").messages == 5


@pytest.mark.parametrize(("argv", "words"), [
    (["-n", "0"], "-n must be > 0"),
    (["-c", "0"], "-c must be >= 1"),
    (["--domains", "0"], "--domains"),
    (["--rate", "-1"], "--rate"),
    (["--template"], "needs --message"),
    (["--message", "/dev/null", "--size", "2k"], "exclude"),
    (["--auth", "nopassword"], "USER:PASS"),
    (["--auth-mech", "plain"], "needs --auth"),
    (["--from", "a b"], "not an address"),
])
def test_bad_combinations(argv: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _options(*argv)


@pytest.mark.parametrize("argv", [["--to", "nohost"], ["--duration", "soon"], ["--to", "h:70000"],
                                  ["--auth", "u:p", "--auth-mech", "cram-md5"]])
def test_bad_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_registered_as_a_volley_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["blast", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: volley blast" in out and "1k:70,10k:25,100k:5" in out and "Exit status" in out
