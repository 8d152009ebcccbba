"""What `volley serve` checks before it binds or forks, on real processes: every TLS
certificate and key loads (else exit 2 with one line naming the file; a SIGHUP with
such a file is refused), and no other Volley server already serves a listening
address (SO_REUSEPORT would otherwise let the kernel split mail between two queues).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme
from cryptography.hazmat.primitives import serialization

from engine.queue.ids import id_bytes
from tests.integration.harness import REPO, ServeProcess, base_config, merge
from tests.integration.smtp_client import send_one
from tests.integration.test_supervisor import event, read_queue, stop_ok, volley

HOST = "127.0.0.1"
EVENT_TIMEOUT = 30.0


def _write_config(tmp: Path, extra: dict[str, Any]) -> Path:
    path = tmp / "volley.toml"
    path.write_text(tomli_w.dumps(merge(base_config(tmp), extra)))
    return path


def _tls(cert_file: str, key_file: str) -> dict[str, Any]:
    return {"listeners": [{"address": f"{HOST}:0", "tls": "starttls"}],
            "tls": {"cert_file": cert_file, "key_file": key_file}}


@pytest.fixture
def bad_tls(ca: trustme.CA, tls_files: dict[str, str], tmp_path: Path):
    """(name, cert_file, key_file, expected stderr) for each file that cannot load."""
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not PEM\n\x00\xff\n")
    missing = tmp_path / "missing.pem"
    cert, key = tls_files["cert_file"], tls_files["key_file"]
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(serialization.load_pem_private_key(
        Path(key).read_bytes(), password=None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    return {
        "missing cert": (str(missing), key,
                         f"volley: tls.cert_file: cannot load {missing}: No such file or directory\n"),
        "missing key": (cert, str(missing),
                        f"volley: tls.key_file: cannot load {missing}: No such file or directory\n"),
        "garbage cert": (str(garbage), key,
                         f"volley: tls.cert_file: cannot load {garbage}: no PEM certificate in it\n"),
        "key as cert": (key, key,
                        f"volley: tls.cert_file: cannot load {key}: no PEM certificate in it\n"),
        "garbage key": (cert, str(garbage),
                        f"volley: tls.key_file: cannot load {garbage}: no PEM private key in it\n"),
        "key of another cert": (
            cert, str(other_key),
            f"volley: tls.key_file: cannot load {other_key}: does not match the certificate in {cert}\n"),
        # A worker has no terminal to ask the passphrase on: refused, never prompted for.
        "encrypted key": (
            cert, str(encrypted),
            f"volley: tls.key_file: cannot load {encrypted}: the key is encrypted; "
            "Volley needs it unencrypted\n"),
    }


CASES = ["missing cert", "missing key", "garbage cert", "key as cert", "garbage key",
         "key of another cert", "encrypted key"]


# --- 1. certificates and keys -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_serve_with_a_tls_file_that_does_not_load_exits_2_before_starting(tmp_path, bad_tls, case):
    cert, key, expected = bad_tls[case]
    cfg = _write_config(tmp_path, _tls(cert, key))
    r = volley("serve", "-c", str(cfg), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, expected)
    assert not (tmp_path / "queue").exists()  # checked before anything was created


@pytest.mark.parametrize("case", CASES)
def test_config_check_loads_the_tls_files(tmp_path, bad_tls, case):
    cert, key, expected = bad_tls[case]
    cfg = _write_config(tmp_path, _tls(cert, key))
    r = volley("config", "check", "-c", str(cfg), cwd=tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (2, expected, "")


def test_config_check_passes_good_tls_files(tmp_path, tls_files):
    cfg = _write_config(tmp_path, _tls(tls_files["cert_file"], tls_files["key_file"]))
    r = volley("config", "check", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["tls"]["key_file"] == tls_files["key_file"]


def test_reload_to_a_key_that_does_not_match_is_refused_and_workers_keep_serving(
        serve, tls_files, bad_tls):
    server = serve(_tls(tls_files["cert_file"], tls_files["key_file"]))
    data = tomllib.loads(server.config_path.read_text())
    _, wrong_key, _ = bad_tls["key of another cert"]
    data["tls"]["key_file"] = wrong_key
    server.config_path.write_text(tomli_w.dumps(data))
    server.signal(signal.SIGHUP)
    refused = server.wait_for(event("reload_refused"), EVENT_TIMEOUT)
    assert refused["error"].startswith(f"tls.key_file: cannot load {wrong_key}"), refused
    send_one(HOST, server.port, "after-refused-reload")
    assert not any(e.get("event") == "worker_exited" for e in server.log), server.log[-20:]
    stop_ok(server)


# --- 2. one Volley server per listening address -----------------------------------------


def _second_serve(tmp: Path, port: int) -> subprocess.CompletedProcess[str]:
    """`volley serve` with its own queue and control socket on `port`, to completion."""
    tmp.mkdir()
    cfg = _write_config(tmp, {"listeners": [{"address": f"{HOST}:{port}"}],
                              "server": {"workers": 2}})
    return subprocess.run(
        [sys.executable, "-m", "engine", "serve", "-c", str(cfg)], cwd=tmp,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60)


def test_second_server_on_a_served_address_exits_2_and_the_first_keeps_all_mail(
        serve, tmp_path):
    first: ServeProcess = serve()
    r = _second_serve(tmp_path / "second", first.port)
    assert r.returncode == 2
    assert r.stderr == (f"volley: listeners[0].address: {HOST}:{first.port} is already "
                        "served by another Volley server\n")
    # Every new connection still reaches the first server's workers and queue.
    ids = {id_bytes(send_one(HOST, first.port, f"after-second-{i}")).hex() for i in range(8)}
    stop_ok(first)
    assert set(read_queue(first)) == ids
    assert not any(e.get("event") == "worker_exited" for e in first.log)


def test_the_address_is_free_for_a_new_server_once_the_first_stopped(serve, tmp_path):
    first: ServeProcess = serve()
    port = first.port
    send_one(HOST, port, "leaves-time-wait")  # a closed connection must not block the next
    stop_ok(first)
    (tmp_path / "again").mkdir()
    second = ServeProcess(tmp_path / "again", {"listeners": [{"address": f"{HOST}:{port}"}]})
    try:
        assert second.port == port
        send_one(HOST, port, "on-the-second")
    finally:
        stop_ok(second)


def test_a_process_sharing_the_port_by_so_reuseport_is_not_joined(tmp_path):
    # Another program of the same user listening with SO_REUSEPORT would let our
    # sockets join its group: the kernel would hand it part of our connections.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind((HOST, 0))
        other.listen(1)
        port = other.getsockname()[1]
        r = _second_serve(tmp_path / "second", port)
    assert r.returncode == 2
    assert r.stderr == f"volley: listeners: cannot bind {HOST}:{port}: Address already in use\n"
