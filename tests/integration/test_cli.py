"""The `volley` command line, run as a real process (`python -m engine`)."""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from engine import config
from engine.inbound.passwords import verify_password
from engine.inbound.users import UserDb
from engine.version import __version__

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 30


def volley(
    *args: str, cwd: Path, stdin: str | bytes = b""
) -> subprocess.CompletedProcess[str]:
    """Run `python -m engine ARGS` in `cwd` with the checkout on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd,
        env=env,
        input=data,
        capture_output=True,
        timeout=TIMEOUT,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def test_version(tmp_path: Path) -> None:
    r = volley("--version", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout == f"volley {__version__}\n"


def test_no_command_is_usage_error(tmp_path: Path) -> None:
    r = volley(cwd=tmp_path)
    assert r.returncode == 2
    assert "usage: volley" in r.stderr


def test_config_check_defaults_round_trip(tmp_path: Path) -> None:
    r = volley("config", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    cfg = config.from_dict(tomllib.loads(r.stdout))
    assert cfg == config.load(None)
    assert config.dump_toml(cfg) == r.stdout


def test_config_check_file(tmp_path: Path) -> None:
    path = tmp_path / "volley.toml"
    path.write_text('[limits]\nmax_message_size = "10MiB"\ncommand_timeout = "5m"\n')
    r = volley("config", "check", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(r.stdout)
    assert data["limits"]["max_message_size"] == "10MiB"
    assert data["limits"]["command_timeout"] == "5m"
    assert config.from_dict(data) == config.load(path)


def test_config_check_bad_address(tmp_path: Path) -> None:
    path = tmp_path / "volley.toml"
    path.write_text('[[listeners]]\naddress = "foo"\n')
    r = volley("config", "check", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == 'volley: listeners[0].address: expected "host:port", got "foo"\n'


def test_config_check_zero_outbound_connections(tmp_path: Path) -> None:
    path = tmp_path / "volley.toml"
    path.write_text("[delivery]\nmax_connections = 0\n")
    r = volley("config", "check", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 2
    assert "max_connections: must be at least 1" in r.stderr


def test_config_check_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "volley.toml"
    path.write_text("[queue]\npaht = \"var/q\"\n")
    r = volley("config", "check", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "volley: queue.paht: unknown key\n"


def test_config_check_missing_file(tmp_path: Path) -> None:
    r = volley("config", "check", "-c", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("volley: ") and "nope.toml" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_passwd_from_stdin(tmp_path: Path) -> None:
    r = volley("passwd", "alice", cwd=tmp_path, stdin="s3cret pässword\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "volley: user alice saved in var/users\n"
    users = tmp_path / "var" / "users"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    user, _, encoded = users.read_text().strip().partition(":")
    assert user == "alice"
    assert encoded.startswith("$scrypt$ln=14,r=8,p=1$")
    assert verify_password("s3cret pässword", encoded)
    assert "s3cret" not in r.stdout + r.stderr


def test_passwd_then_load(tmp_path: Path) -> None:
    users = tmp_path / "etc" / "users"
    for name, pw in (("alice", "one"), ("bob", "two"), ("alice", "three")):
        r = volley("passwd", name, "-f", str(users), cwd=tmp_path, stdin=f"{pw}\r\n")
        assert r.returncode == 0, r.stderr
    db = UserDb.load(str(users))
    assert len(db) == 2
    assert verify_password("three", db.lookup("alice") or "")
    assert verify_password("two", db.lookup("bob") or "")


def test_passwd_uses_users_file_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "volley.toml"
    cfg.write_text('[auth]\nusers_file = "conf/smtp-users"\n')
    r = volley("passwd", "alice", "-c", str(cfg), cwd=tmp_path, stdin="pw\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "volley: user alice saved in conf/smtp-users\n"
    assert len(UserDb.load(str(tmp_path / "conf" / "smtp-users"))) == 1


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_passwd_refuses_empty_password(tmp_path: Path, stdin: str) -> None:
    r = volley("passwd", "alice", cwd=tmp_path, stdin=stdin)
    assert r.returncode == 2
    assert r.stderr == "volley: empty password refused\n"
    assert not (tmp_path / "var").exists()


def test_passwd_refuses_bad_user_name(tmp_path: Path) -> None:
    r = volley("passwd", "a:b", cwd=tmp_path, stdin="pw\n")
    assert r.returncode == 2
    assert r.stderr == "volley: user name must not contain ':'\n"


def test_passwd_refuses_malformed_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# ok\nbroken line\n")
    r = volley("passwd", "alice", "-f", str(users), cwd=tmp_path, stdin="pw\n")
    assert r.returncode == 2
    assert r.stderr == f"volley: {users}:2: expected user:hash\n"
    assert users.read_text() == "# ok\nbroken line\n"


def test_passwd_bad_config_is_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "volley.toml"
    cfg.write_text("[auth]\nusers = 1\n")
    r = volley("passwd", "alice", "-c", str(cfg), cwd=tmp_path, stdin="pw\n")
    assert r.returncode == 2
    assert r.stderr == "volley: auth.users: unknown key\n"


# --- the terminal path: getpass asks twice ------------------------------------------


def _run_on_pty(args: list[str], cwd: Path, answers: list[str]) -> tuple[int, str]:
    """Run volley with a pty as its controlling terminal (getpass reads /dev/tty)."""
    import pty

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    pid, fd = pty.fork()
    if pid == 0:  # child: exec at once, nothing else is safe after fork
        try:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "engine", *args], env)
        finally:
            os._exit(127)
    output = b""
    pending = list(answers)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # Answer each prompt once it appears, so no input is lost to a tcflush.
            prompts = output.lower().count(b"password:")
            while pending and prompts > len(answers) - len(pending):
                os.write(fd, pending.pop(0).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty semantics")
def test_passwd_on_terminal_asks_twice(tmp_path: Path) -> None:
    code, out = _run_on_pty(["passwd", "alice"], tmp_path, ["tty-pw", "tty-pw"])
    assert code == 0, out
    assert "Password:" in out and "Repeat password:" in out
    assert "tty-pw" not in out  # no echo
    db = UserDb.load(str(tmp_path / "var" / "users"))
    assert verify_password("tty-pw", db.lookup("alice") or "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty semantics")
def test_passwd_on_terminal_mismatch(tmp_path: Path) -> None:
    code, out = _run_on_pty(["passwd", "alice"], tmp_path, ["one", "two"])
    assert code == 2
    assert "volley: passwords do not match" in out
    assert not (tmp_path / "var").exists()
