"""Micro benchmarks for DKIM signing: one signature on a 1 KB message with RSA-2048 and
with Ed25519, both at once, a 1 MB body, and relaxed body canonicalization alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.config import DkimConfig
from engine.mail.dkim import DkimSigner
from engine.mail.dkim_canon import relaxed_body

HEAD = (
    b"Received: from client.example (127.0.0.1) by mx.example.com; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: News <newsletter@lists.example.com>\r\nTo: jane.doe@example.org\r\n"
    b"Subject: Weekly\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1234@lists.example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
)
LINE = b"Line of the body, plain text,  two spaces here and a trailing one \r\n"


def message(size: int) -> bytes:
    body = (LINE * (size // len(LINE) + 1))[:size - len(HEAD) - 2] + b"\r\n"
    return HEAD + body


MSG_1K = message(1024)
MSG_1M = message(1024 * 1024)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DkimConfig]:
    d: Path = tmp_path_factory.mktemp("dkim-bench")
    out = {}
    pairs: list[tuple[str, Any]] = [
        ("rsa-sha256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ed25519-sha256", ed25519.Ed25519PrivateKey.generate())]
    for alg, key in pairs:
        path = d / f"{alg}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        out[alg] = DkimConfig(domain="example.com", selector=alg[:3], key_file=str(path),
                              algorithm=alg)  # type: ignore[arg-type]
    return out


def test_sign_1k_rsa2048(benchmark, keys) -> None:
    signer = DkimSigner.from_config([keys["rsa-sha256"]])
    assert MSG_1K and len(MSG_1K) == 1024
    assert benchmark(signer.sign, MSG_1K).startswith(b"DKIM-Signature:")


def test_sign_1k_ed25519(benchmark, keys) -> None:
    signer = DkimSigner.from_config([keys["ed25519-sha256"]])
    assert benchmark(signer.sign, MSG_1K).startswith(b"DKIM-Signature:")


def test_sign_1k_rsa_and_ed25519(benchmark, keys) -> None:
    signer = DkimSigner.from_config([keys["rsa-sha256"], keys["ed25519-sha256"]])
    assert benchmark(signer.sign, MSG_1K).count(b"DKIM-Signature:") == 2


def test_sign_1m_ed25519(benchmark, keys) -> None:
    signer = DkimSigner.from_config([keys["ed25519-sha256"]])
    assert benchmark(signer.sign, MSG_1M).startswith(b"DKIM-Signature:")


def test_relaxed_body_1k(benchmark) -> None:
    assert benchmark(relaxed_body, MSG_1K[len(HEAD):]).endswith(b"\r\n")


def test_relaxed_body_1m(benchmark) -> None:
    assert benchmark(relaxed_body, MSG_1M[len(HEAD):]).endswith(b"\r\n")
