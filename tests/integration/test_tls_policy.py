"""The inbound TLS policy (P6) as a client sees it: TLS 1.2 or later only, no weak
ciphers, renegotiation refused, and an ordinary `openssl s_client -starttls smtp` works.

The client is OpenSSL's own command-line tool, not Python's ssl module, so the checks do
not share a library configuration with the server they test.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Callable
from typing import IO, Any

import pytest

from engine import config as config_mod
from engine.inbound.tls import make_server_tls_context
from tests.integration.harness import InboundServer

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
WEAK = ("NULL", "EXPORT", "RC4", "DES-CBC3", "3DES", "MD5", "anon")


@pytest.fixture
def tls_server(inbound: Callable[..., InboundServer], tls_files: dict[str, str]) -> InboundServer:
    return inbound({
        "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls"}],
    })


def s_client(port: int, ca_file: str, *args: str, script: str = "EHLO client.test\n") -> str:
    """Run `openssl s_client -starttls smtp` with `script` on its stdin; its whole output.

    -ign_eof keeps the session open after the script, so what the script provoked (a
    renegotiation, a command) is answered before the client leaves on its own QUIT."""
    assert OPENSSL is not None
    done = subprocess.run(
        [OPENSSL, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
         "-CAfile", ca_file, "-crlf", "-ign_eof", *args],
        input=script + "QUIT\n", capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def test_the_server_context_allows_tls12_and_later_strong_ciphers_no_renegotiation(
        tls_files: dict[str, str]) -> None:
    cfg = config_mod.from_dict({"tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]}})
    ctx = make_server_tls_context(cfg)
    assert ctx is not None
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    names = [c["name"] for c in ctx.get_ciphers()]
    assert names and not [n for n in names if any(w in n for w in WEAK)]


@needs_openssl
def test_openssl_s_client_starttls_works(tls_server: InboundServer, tls_files: dict[str, str]) -> None:
    out = s_client(tls_server.port, tls_files["ca_file"])
    assert "Verify return code: 0 (ok)" in out
    assert "250-mx.volley.test" in out  # our EHLO answer, read over the TLS session
    assert "221 " in out  # and QUIT answered: the session ended cleanly
    protocol = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Protocol")]
    assert protocol and protocol[0] in {"TLSv1.2", "TLSv1.3"}


@needs_openssl
@pytest.mark.parametrize("old", ["-tls1", "-tls1_1"])
def test_tls_before_1_2_is_refused(tls_server: InboundServer, tls_files: dict[str, str], old: str) -> None:
    out = s_client(tls_server.port, tls_files["ca_file"], old, "-cipher", "DEFAULT:@SECLEVEL=0")
    if "unknown option" in out or "wrong version number" in out and "CONNECTED" not in out:
        pytest.skip(f"this openssl cannot offer {old}")
    assert "Cipher is (NONE)" in out or "no protocols available" in out
    assert "250-mx.volley.test" not in out  # no SMTP over it
    # The server is unharmed: a modern client still gets through.
    assert "Verify return code: 0 (ok)" in s_client(tls_server.port, tls_files["ca_file"])


@needs_openssl
def test_client_renegotiation_is_refused(tls_server: InboundServer, tls_files: dict[str, str]) -> None:
    # A line "R" asks s_client for a renegotiation (TLS 1.3 has none, so 1.2). s_client
    # reads such commands only without -ign_eof, so stdin stays open until it is answered.
    assert OPENSSL is not None
    with subprocess.Popen(
        [OPENSSL, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{tls_server.port}",
         "-CAfile", tls_files["ca_file"], "-crlf", "-tls1_2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as client:
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write("EHLO client.test\n")
            client.stdin.flush()
            # s_client prints "250 STARTTLS" itself; our EHLO answer's last line follows.
            before = _read_until(client.stdout, "250 ", skip="250 STARTTLS")
            client.stdin.write("R\nNOOP\n")  # the NOOP makes s_client read the answer
            client.stdin.flush()
            after = _read_until(client.stdout, "no renegotiation")
        finally:
            client.kill()
    assert "250-mx.volley.test" in before
    assert "RENEGOTIATING" in after  # the client did ask
    assert "no renegotiation" in after  # and the server refused with the alert


def _read_until(stream: IO[str], marker: str, skip: str = "", limit: int = 200) -> str:
    """Lines of `stream` up to the first holding `marker` (or EOF); the test's timeout
    bounds the wait, `limit` the lines."""
    seen = []
    for _ in range(limit):
        line = stream.readline()
        seen.append(line)
        if not line or (marker in line and not (skip and skip in line)):
            break
    return "".join(seen)


@needs_openssl
def test_the_renegotiation_check_catches_a_server_that_allows_it(tls_files: dict[str, str], tmp_path: Any) -> None:
    """Negative control: `openssl s_server` with client renegotiation allowed shows what
    the check above would see if our server renegotiated."""
    assert OPENSSL is not None
    with subprocess.Popen(
        [OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-cert", tls_files["cert_file"],
         "-key", tls_files["key_file"], "-tls1_2", "-legacy_renegotiation", "-client_renegotiation",
         "-naccept", "1", "-ign_eof"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True,
    ) as server:
        try:
            _renegotiate_against(server, tls_files["ca_file"])
        finally:
            server.kill()


def _renegotiate_against(server: subprocess.Popen[str], ca_file: str) -> None:
    assert OPENSSL is not None
    assert server.stdout is not None
    first = ""
    for _ in range(5):  # notes such as "Using default temp DH parameters" come first
        first = server.stdout.readline()  # until "ACCEPT 127.0.0.1:PORT"
        if first.startswith("ACCEPT") or not first:
            break
    if not first.startswith("ACCEPT"):
        pytest.skip(f"this openssl s_server cannot allow client renegotiation: {first.strip()}")
    port = int(first.rsplit(":", 1)[1])
    done = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca_file,
         "-tls1_2"], input="R\n", capture_output=True, text=True, timeout=30)
    out = done.stdout + done.stderr
    assert "RENEGOTIATING" in out and "no renegotiation" not in out
