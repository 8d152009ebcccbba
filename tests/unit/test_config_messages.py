"""What `volley config check` tells an operator: an enum error lists the values the key
takes (in the order the config declares them), a size is echoed in a unit that says it
exactly, and a queue too small to work is refused with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, from_dict, to_builtins
from engine.config.units import format_size, parse_size

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("data", "message"), [
    ({"queue": {"durability": "sometimes"}},
     'queue.durability: invalid enum value \'sometimes\', expected one of "fsync", "batch", "memory"'),
    ({"listeners": [{"address": "127.0.0.1:2525"}, {"address": "127.0.0.1:2526", "tls": "maybe"}]},
     'listeners[1].tls: invalid enum value \'maybe\', expected one of "none", "starttls", "implicit"'),
    ({"shaping": [{"domain": "example.com", "tls": "always"}]},  # (an optional key)
     'shaping[0].tls: invalid enum value \'always\', expected one of "opportunistic", "required", "none"'),
])
def test_an_enum_error_lists_the_valid_values(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert str(err.value) == message


@pytest.mark.parametrize(("written", "echoed"), [
    ("1TB", "1TB"), ("1TiB", "1TiB"), ("4GiB", "4GiB"), ("1500MB", "1500MB"), ("10MiB", "10MiB"),
    ("2000000", "2MB"), ("1536KiB", "1536KiB"), ("1048577", "1048577"),
])
def test_a_size_is_echoed_exactly_in_a_readable_unit(written: str, echoed: str) -> None:
    cfg = from_dict({"queue": {"max_size": written}})
    shown = to_builtins(cfg)["queue"]["max_size"]
    assert shown == echoed
    assert parse_size(shown) == parse_size(written) == cfg.queue.max_size  # loads back the same


def test_format_size_is_exact_for_every_unit() -> None:
    for n in [0, 1, 999, 1000, 1024, 4096, 10**12, 3 * 1024**4, 5 * 10**9, 123456789]:
        assert parse_size(format_size(n)) == n
        assert len(format_size(n)) <= len(str(n))


@pytest.mark.parametrize("size", ["1KiB", "1000", "1023KiB", "1MB"])
def test_a_queue_too_small_to_work_is_refused_naming_the_key(size: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"queue": {"max_size": size}})
    assert str(err.value).startswith("queue.max_size: ")
    assert "too small" in str(err.value) and "at least 1MiB" in str(err.value)


def test_the_smallest_queue_is_accepted() -> None:
    assert from_dict({"queue": {"max_size": "1MiB"}}).queue.max_size == 1024 * 1024


def test_config_check_refuses_a_1kib_queue_and_echoes_1tb(tmp_path: Path) -> None:
    small, big = tmp_path / "small.toml", tmp_path / "big.toml"
    small.write_text('[queue]\nmax_size = "1KiB"\n')
    big.write_text('[queue]\nmax_size = "1TB"\n')
    run = [sys.executable, "-m", "engine", "config", "check", "-c"]
    done = subprocess.run([*run, str(small)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "queue.max_size: 1KiB is too small" in done.stderr
    done = subprocess.run([*run, str(big)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'max_size = "1TB"' in done.stdout and "KiB" not in done.stdout.split("[queue]")[1].split("[")[0]
