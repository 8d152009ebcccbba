"""DKIM through the whole relay: a client of the relay network submits over SMTP, the
scheduler signs as the message leaves (an RSA-2048 and an Ed25519 key of one domain,
RFC 8463 §5), and the copy a sink on 127.0.0.2 received verifies with dkimpy, whose
key lookups are real DNS queries (dnspython) to the loopback DNS server publishing
`selector._domainkey.example.test TXT "v=DKIM1; k=...; p=..."`.

Cases: 1 KB and 1 MB bodies, an 8-bit body (BODY=8BITMIME), SMTPUTF8 (UTF-8 display
name, subject and recipient local part). Mail from a client outside the relay network
(to a relay.local_domains domain) is delivered unsigned. A [[dkim]] key file that does
not load stops `volley config check`, `volley serve` and a SIGHUP reload with one line
naming the entry and the file.
"""

from __future__ import annotations

import re
import signal
import smtplib
import tomllib
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.config import DkimConfig
from engine.mail.dkim import load_key
from tests.integration.relay_helpers import Lab, lab  # noqa: F401  (fixture)
from tests.integration.smtp_client import send_one
from tests.integration.test_startup_checks import _write_config
from tests.integration.test_supervisor import event, volley

DOMAIN = "example.test"
AUTHOR = f"news@mail.{DOMAIN}"  # a subdomain: aligned with d=example.test
EVENT_TIMEOUT = 30.0


def ehlo(*ext: str) -> str:
    return "\r\n".join(["250-sink.test"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"])


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """[[dkim]] entries with freshly generated RSA-2048 and Ed25519 keys."""
    d = tmp_path_factory.mktemp("dkim-keys")
    entries = []
    for selector, alg, key in (
            ("s-rsa", "rsa-sha256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            ("s-ed", "ed25519-sha256", ed25519.Ed25519PrivateKey.generate())):
        path = d / f"{selector}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        entries.append({"domain": DOMAIN, "selector": selector, "key_file": str(path), "algorithm": alg})
    return entries


def start(lab: Lab, key_files: list[dict[str, Any]], extra: dict[str, Any] | None = None):
    """The sink (8BITMIME and SMTPUTF8), the zone with MX and the DKIM TXT records, the server."""
    sink = lab.sink("127.0.0.2", script=lambda v, a: ehlo("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 104857600")
                    if v == "EHLO" else None)
    zone: dict[str, Any] = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}
    for i, e in enumerate(key_files):
        key = load_key(i, DkimConfig(**e))
        zone[key.dns_name] = {"TXT": [key.txt_record()]}  # RSA: over 255 bytes, split
    lab.zone(zone)
    lab.start({"dkim": key_files, **(extra or {})})
    return sink


def verdicts(lab: Lab, data: bytes) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, keys fetched over real DNS."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = lab.dns.port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    d = dkim.DKIM(data)
    head = data.split(b"\r\n\r\n", 1)[0]
    out = []
    for i in range(len(re.findall(rb"(?im)^DKIM-Signature:", head))):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            out.append(False)
    return out


def message(tag: str, body: bytes, *, author: str = f"News <{AUTHOR}>", subject: str = "Weekly",
            extra: str = "") -> bytes:
    return (f"From: {author}\r\nTo: <jane@dest.test>\r\nSubject: {subject}\r\n"
            f"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <{tag}@mail.{DOMAIN}>\r\n"
            f"X-Test-Id: {tag}\r\n{extra}\r\n").encode() + body


def text_body(size: int) -> bytes:
    line = b"Line of the newsletter,  with  double spaces and a tab\there. \r\n"
    return (line * (size // len(line) + 1))[:size - 2] + b"\r\n"


def received(lab: Lab, sink: Any, tag: str) -> bytes:
    lab.wait_sink(sink, 1 + sum(1 for m in sink.messages if f"X-Test-Id: {tag}".encode() not in m.data))
    [data] = [m.data for m in sink.messages if f"X-Test-Id: {tag}\r\n".encode() in m.data]
    return bytes(data)


@pytest.mark.parametrize("size", [1024, 1024 * 1024])
def test_relayed_mail_carries_two_signatures_that_verify(lab: Lab, key_files, size: int):
    sink = start(lab, key_files)
    tag = f"size{size}"
    lab.send(["jane@dest.test"], message(tag, text_body(size)))
    data = received(lab, sink, tag)
    assert data.startswith(b"DKIM-Signature:")  # prepended above Volley's Received:
    assert re.findall(rb"(?m)^DKIM-Signature: v=1; a=([a-z0-9-]+);", data) == [b"rsa-sha256", b"ed25519-sha256"]
    assert verdicts(lab, data) == [True, True]
    lab.wait_queue_empty()


def test_8bit_body_verifies(lab: Lab, key_files):
    sink = start(lab, key_files)
    body = "Grüße aus Köln — 8-bit, not encoded.\r\n".encode() * 40 + b"\xff\xfe raw bytes\r\n"
    lab.send(["jane@dest.test"], message("eight", body, extra="Content-Type: text/plain; charset=utf-8\r\n"
                                         "Content-Transfer-Encoding: 8bit\r\n"), mail_params="BODY=8BITMIME")
    data = received(lab, sink, "eight")
    assert any(v == "MAIL" and "BODY=8BITMIME" in a.upper() for v, a in sink.commands)
    assert verdicts(lab, data) == [True, True]


def test_smtputf8_mail_verifies(lab: Lab, key_files):
    sink = start(lab, key_files)
    msg = message("utf8", "Hallo Jörg,\r\nδοκιμή\r\n".encode(), author=f"Jörg Müller <{AUTHOR}>",
                  subject="Grüße   aus Köln")
    lab.send(["jörg.δοκιμή@dest.test"], msg, mail_params="SMTPUTF8 BODY=8BITMIME")
    data = received(lab, sink, "utf8")
    assert sink.messages[-1].rcpt_tos == ["jörg.δοκιμή@dest.test"]
    assert any(v == "MAIL" and "SMTPUTF8" in a.upper() for v, a in sink.commands)
    assert "Jörg Müller".encode() in data
    assert verdicts(lab, data) == [True, True]


def test_mail_from_outside_the_relay_network_is_not_signed(lab: Lab, key_files):
    # 127.0.0.1 alone is the relay network; the client below speaks from 127.0.0.5, so
    # it may only send to the local domain dest.test, and Volley does not vouch for it.
    sink = start(lab, key_files, {"relay": {"networks": ["127.0.0.1/32"], "local_domains": ["dest.test"]}})
    assert lab.server is not None
    with smtplib.SMTP("127.0.0.1", lab.server.port, timeout=10, source_address=("127.0.0.5", 0)) as client:
        client.sendmail(AUTHOR, ["jane@dest.test"], message("outside", b"from the internet\r\n"))
    data = received(lab, sink, "outside")
    assert b"DKIM-Signature" not in data
    lab.send(["jane@dest.test"], message("inside", b"from the relay network\r\n"))  # 127.0.0.1
    assert verdicts(lab, received(lab, sink, "inside")) == [True, True]


# --- keys that do not load stop the server before it starts ----------------------------

def test_config_check_and_serve_name_a_missing_key_file(tmp_path: Path, key_files):
    missing = tmp_path / "gone.pem"
    cfg = _write_config(tmp_path, {"dkim": [key_files[0], {**key_files[1], "key_file": str(missing)}]})
    expected = f"volley: dkim[1].key_file: {missing}: No such file or directory\n"
    r = volley("config", "check", "-c", str(cfg), cwd=tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (2, expected, "")
    r = volley("serve", "-c", str(cfg), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, expected)
    assert not (tmp_path / "queue").exists()  # refused before anything was created


def test_reload_to_a_key_that_does_not_load_is_refused(serve, tmp_path: Path, key_files):
    server = serve({"dkim": key_files})
    data = tomllib.loads(server.config_path.read_text())
    wrong = tmp_path / "public.pem"
    wrong.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    data["dkim"][0]["key_file"] = str(wrong)
    server.config_path.write_text(tomli_w.dumps(data))
    server.signal(signal.SIGHUP)
    refused = server.wait_for(event("reload_refused"), EVENT_TIMEOUT)
    assert refused["error"] == f"dkim[0].key_file: {wrong}: not a PEM private key", refused
    send_one("127.0.0.1", server.port, "after-refused-reload")  # the workers keep serving
