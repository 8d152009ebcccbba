"""DKIM signing (engine/mail/dkim.py, dkim_canon.py, headers.py), checked by an
independent verifier: every signature here is verified by dkimpy, whose DNS lookup is
answered from the keys' own TXT records (the integration test does real DNS).

What they prove: the RFC 6376 §3.4.5 canonicalization example; every canonicalization
× algorithm verifies; two keys give two signatures from one body canonicalization;
alignment is the From: domain or a parent of it; over_sign (§8.15) makes an added
header break the signature; Volley's own Received: and 8-bit/UTF-8 content do not
break it; a key that cannot load is a DkimKeyError naming the entry and the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import engine.mail.dkim as dkim_mod
from engine import config as config_mod
from engine.config import DkimConfig
from engine.mail.dkim import DkimKeyError, DkimSigner
from engine.mail.dkim_canon import relaxed_body, relaxed_header, simple_body, simple_header
from engine.mail.headers import from_domain, split_message
from engine.supervisor.startup import check_startup

NOW = 1_700_000_000
MESSAGE = (
    b"Received: from client.test (127.0.0.1) by mx.volley.test; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: News <news@sub.example.com>\r\n"
    b"To: jane@dest.test\r\n"
    b"Subject:  Weekly   news \r\n\tfolded  part\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@sub.example.com>\r\n"
    b"\r\n"
    b"Hello  there \t\r\n\r\nsecond paragraph\r\n\r\n\r\n"
)
WEAK_RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBUwIBADANBgkqhkiG9w0BAQEFAASCAT0wggE5AgEAAkEAmFF1YWcm4nb5i42u
2ox3JqCOEMbiG5/Pog+vXh5kCrpQJUGtaiZSPeyrhYI+piq5vxXgtueETBq1b3eb
SVLwpQIDAQABAkAoxc1c+GbBQkXEZHXEzMrsTRgaR5KpAFttLzOrRwlSkWlABmKJ
bUrpThor+mMjnoW9/j3bhiI5apL2Ue17wJz1AiEAxwzez00qlVQjyM4CsVrez+Oz
zvNr66qD/VS/rQ3hrQMCIQDD5cT3XIIHnoPp2fkBYQtsSzFU92scMOvctFZsyO6X
NwIgFouXpQVJgHZyQylKVspDGGrjD9q0a5H5tzTlLPW4jP8CIGo3FNrCD8atzfxn
sTlsMtNe2bqmBC9e3yPlq86EC8l1AiAreWeYM/s0UABYdYiPdi2UtkP5kC4w3nFF
gRn3Zq/znA==
-----END PRIVATE KEY-----
"""


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("dkim")
    out = {}
    for name, key in (("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                      ("ed25519", ed25519.Ed25519PrivateKey.generate()),
                      ("ec", ec.generate_private_key(ec.SECP256R1()))):
        (d / f"{name}.pem").write_bytes(_pem(key))
        out[name] = str(d / f"{name}.pem")
    return out


def entry(keys: dict[str, str], alg: str = "rsa", **kw: Any) -> DkimConfig:
    kw.setdefault("domain", "example.com")
    kw.setdefault("selector", f"s-{alg}")
    return DkimConfig(key_file=keys[alg], algorithm="rsa-sha256" if alg == "rsa" else "ed25519-sha256", **kw)


def verify_all(signer: DkimSigner, signed: bytes) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of `signed`, top first."""
    records = {f"{k.dns_name}.".encode(): k.txt_record().encode() for k in signer.keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    d = dkim.DKIM(signed)
    count = len(re.findall(rb"(?im)^DKIM-Signature:", signed.split(b"\r\n\r\n")[0]))
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:  # a body hash mismatch raises
            verdicts.append(False)
    return verdicts


def tags(field: bytes) -> dict[str, str]:
    value = re.sub(r"\s+", "", field.decode().partition(":")[2])
    return dict(t.split("=", 1) for t in value.split(";") if t)


# --- canonicalization (RFC 6376 §3.4.5) and the header split -------------------------

RFC_EXAMPLE = (b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n"
               b" C \r\nD \t E\r\n\r\n\r\n")


def test_rfc_6376_example_canonicalization():
    fields, body_at = split_message(RFC_EXAMPLE)
    assert [f.name for f in fields] == ["a", "b"]
    assert b"".join(relaxed_header(f.name, f.raw) for f in fields) == b"a:X\r\nb:Y Z\r\n"
    assert b"".join(simple_header(f.raw) for f in fields) == b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
    body = RFC_EXAMPLE[body_at:]
    assert relaxed_body(body) == b" C\r\nD E\r\n"
    assert simple_body(body) == b" C \r\nD \t E\r\n"


@pytest.mark.parametrize(("body", "simple", "relaxed"), [
    (b"", b"\r\n", b""),                                   # §3.4.3 / §3.4.4 empty body
    (b"\r\n\r\n", b"\r\n", b""),
    (b"x", b"x\r\n", b"x\r\n"),                           # a CRLF is added
    (b"a  \r\n \t\r\n\r\n", b"a  \r\n \t\r\n", b"a\r\n"),  # a WSP-only line is empty when relaxed
    (b"caf\xc3\xa9\t \xff\r\n", b"caf\xc3\xa9\t \xff\r\n", b"caf\xc3\xa9 \xff\r\n"),  # bytes, not text
])
def test_body_canonicalization_edges(body: bytes, simple: bytes, relaxed: bytes):
    assert simple_body(body) == simple
    assert relaxed_body(body) == relaxed


def test_split_message_without_body_or_headers():
    fields, at = split_message(b"Subject: x\r\n")
    assert [f.raw for f in fields] == [b"Subject: x"] and at == len(b"Subject: x\r\n")
    assert split_message(b"\r\nbody\r\n") == ([], 2)


@pytest.mark.parametrize(("value", "domain"), [
    (b"a@Example.COM", "example.com"),
    (b'"Smith, J@ne" <j@ex.test>', "ex.test"),            # an @ in the display name
    (b"j@ex.test (J@ne at other.test)", "ex.test"),        # and in a comment
    (b"=?utf-8?q?J=C3=B6rg?= <j@ex.test>", "ex.test"),
    ("Jörg <jörg@bücher.example>".encode(), "xn--bcher-kva.example"),  # RFC 6532, A-label
    (b"a@x.test, b@y.test", None),                        # two author domains
    (b"undisclosed", None),
])
def test_from_domain(value: bytes, domain: str | None):
    fields, _ = split_message(b"From: " + value + b"\r\n\r\nx\r\n")
    assert from_domain(fields) == domain


# --- signatures verified by dkimpy -----------------------------------------------------

@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"])
@pytest.mark.parametrize("alg", ["rsa", "ed25519"])
def test_every_canonicalization_and_algorithm_verifies(keys, canon: str, alg: str):
    signer = DkimSigner.from_config([entry(keys, alg, canonicalization=canon)])
    field = signer.sign(MESSAGE, now=NOW)
    t = tags(field)
    assert (t["a"], t["c"], t["d"], t["t"]) == (f"{alg}-sha256", canon, "example.com", str(NOW))
    assert "l" not in t
    assert t["h"].split(":") == ["From", "Subject", "Date", "To", "Message-ID"]  # present ones only
    assert verify_all(signer, field + MESSAGE) == [True]
    tampered = MESSAGE.replace(b"second paragraph", b"second paragraph!")
    assert verify_all(signer, field + tampered) == [False]


def test_two_keys_two_signatures_one_body_canonicalization(keys, monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = dkim_mod.canon_body
    monkeypatch.setattr(dkim_mod, "canon_body", lambda c, b: calls.append(c) or real(c, b))
    signer = DkimSigner.from_config([entry(keys, "rsa"), entry(keys, "ed25519")])
    fields = signer.sign(MESSAGE, now=NOW)
    assert fields.count(b"DKIM-Signature:") == 2 and calls == ["relaxed"]
    assert verify_all(signer, fields + MESSAGE) == [True, True]
    for line in fields.split(b"\r\n")[:-1]:
        assert len(line) <= 78, line  # folded (RFC 5322 §2.1.1)


def test_received_header_and_later_trace_fields_do_not_matter(keys):
    signer = DkimSigner.from_config([entry(keys, "ed25519")])
    field = signer.sign(MESSAGE, now=NOW)
    assert "received" not in tags(field)["h"].lower()
    relayed = b"Received: from mx.volley.test by mx.dest.test; later\r\n" + field + MESSAGE
    assert verify_all(signer, relayed) == [True]


def test_8bit_and_utf8_headers(keys):
    message = ("From: \"Jörg Müller\" <jörg@example.com>\r\nTo: δοκιμή@dest.test\r\n"
               "Subject: Grüße  aus   Köln\r\n\r\nÄpfel \t und  Birnen\r\n").encode() + b"\xff\xfe raw\r\n"
    for canon in ("relaxed/relaxed", "simple/simple"):
        signer = DkimSigner.from_config([entry(keys, "rsa", canonicalization=canon),
                                         entry(keys, "ed25519", canonicalization=canon)])
        assert verify_all(signer, signer.sign(message, now=NOW) + message) == [True, True]


def test_alignment_from_domain_or_a_parent(keys):
    signer = DkimSigner.from_config([entry(keys, "rsa")])  # d=example.com
    for author, signed in (("a@example.com", True), ("a@sub.example.com", True),
                           ("a@deep.sub.EXAMPLE.com", True), ("a@other.com", False),
                           ("a@notexample.com", False), ("a@example.com.evil.test", False)):
        message = f"From: {author}\r\nSubject: x\r\n\r\nbody\r\n".encode()
        field = signer.sign(message, now=NOW)
        assert bool(field) is signed, author
        if signed:
            assert tags(field)["d"] == "example.com"
            assert verify_all(signer, field + message) == [True]


def test_without_one_from_nothing_is_signed(keys):
    signer = DkimSigner.from_config([entry(keys, "rsa")])
    assert signer.sign(b"Subject: no author\r\n\r\nbody\r\n") == b""
    assert signer.sign(b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n") == b""
    assert signer.sign(b"\r\nno header at all\r\n") == b""
    assert not DkimSigner.from_config([]) and DkimSigner.from_config([]).sign(MESSAGE) == b""


def test_over_sign_refuses_added_headers(keys):
    plain = DkimSigner.from_config([entry(keys, "rsa", headers=["From", "Subject", "Reply-To"])])
    over = DkimSigner.from_config([entry(keys, "ed25519", headers=["From", "Subject", "Reply-To"],
                                         over_sign=True)])
    assert tags(plain.sign(MESSAGE, now=NOW))["h"] == "From:Subject"
    # Each name once more than it occurs, an absent one once (RFC 6376 §8.15).
    assert tags(over.sign(MESSAGE, now=NOW))["h"] == "From:From:Subject:Subject:Reply-To"
    for added in (b"Subject: something else\r\n", b"Reply-To: attacker@evil.test\r\n",
                  b"From: attacker@evil.test\r\n"):
        assert verify_all(over, over.sign(MESSAGE, now=NOW) + added + MESSAGE) == [False], added
    # Without over-signing a Subject added on top is not seen (the bottom one is signed).
    assert verify_all(plain, plain.sign(MESSAGE, now=NOW) + b"Subject: x\r\n" + MESSAGE) == [True]
    assert verify_all(over, over.sign(MESSAGE, now=NOW) + MESSAGE) == [True]


def test_repeated_headers_are_all_signed_bottom_up(keys):
    message = b"From: a@example.com\r\nTo: x@d.test\r\nTo: y@d.test\r\n\r\nbody\r\n"
    signer = DkimSigner.from_config([entry(keys, "rsa")])
    field = signer.sign(message, now=NOW)
    assert tags(field)["h"] == "From:To:To"
    assert verify_all(signer, field + message) == [True]
    assert verify_all(signer, field + message.replace(b"x@d.test", b"z@d.test")) == [False]


# --- keys that do not load -------------------------------------------------------------

@pytest.fixture
def bad_keys(keys: dict[str, str], tmp_path: Path) -> dict[str, tuple[str, str, str]]:
    """(algorithm, key file, expected reason) for each key that must be refused."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not PEM\x00\xff\n")
    public = tmp_path / "public.pem"
    public.write_bytes(serialization.load_pem_private_key(Path(keys["rsa"]).read_bytes(), None)
                       .public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(serialization.load_pem_private_key(Path(keys["ed25519"]).read_bytes(), None)
                          .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    weak = tmp_path / "weak.pem"
    weak.write_bytes(WEAK_RSA_512)
    missing = str(tmp_path / "missing.pem")
    return {
        "missing": ("rsa-sha256", missing, "No such file or directory"),
        "directory": ("rsa-sha256", str(tmp_path), "Is a directory"),
        "garbage": ("rsa-sha256", str(garbage), "not a PEM private key"),
        "public key": ("rsa-sha256", str(public), "not a PEM private key"),
        "encrypted": ("ed25519-sha256", str(encrypted), "the key is encrypted; Volley needs it unencrypted"),
        "rsa as ed25519": ("ed25519-sha256", keys["rsa"], "is an RSA key but algorithm is ed25519-sha256"),
        "ed25519 as rsa": ("rsa-sha256", keys["ed25519"], "is an Ed25519 key but algorithm is rsa-sha256"),
        "ec key": ("rsa-sha256", keys["ec"], "is an EC (ECDSA) key; DKIM signs with RSA "
                   "(rsa-sha256) or Ed25519 (ed25519-sha256, RFC 8463)"),
        "512-bit rsa": ("rsa-sha256", str(weak), "the RSA key has 512 bits; RFC 8301 §3.2 requires "
                        "at least 1024 (2048 recommended)"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "public key", "encrypted",
                                  "rsa as ed25519", "ed25519 as rsa", "ec key", "512-bit rsa"])
def test_bad_key_is_refused_naming_entry_and_file(keys, bad_keys, case: str):
    alg, path, reason = bad_keys[case]
    good = entry(keys, "rsa")
    bad = DkimConfig(domain="example.com", selector="bad", key_file=path, algorithm=alg)  # type: ignore[arg-type]
    with pytest.raises(DkimKeyError) as err:
        DkimSigner.from_config([good, bad])
    assert str(err.value) == f"dkim[1].key_file: {path}: {reason}"


def test_startup_check_refuses_a_bad_key(keys, tmp_path: Path):
    missing = str(tmp_path / "nope.pem")
    base = {"queue": {"path": str(tmp_path / "q")}}
    good = config_mod.from_dict({**base, "dkim": [{"domain": "example.com", "selector": "s",
                                                   "key_file": keys["rsa"]}]})
    check_startup(good)
    cfg = config_mod.from_dict({**base, "dkim": [{"domain": "example.com", "selector": "s",
                                                  "key_file": missing}]})
    with pytest.raises(config_mod.ConfigError, match=re.escape(
            f"dkim[0].key_file: {missing}: No such file or directory")):
        check_startup(cfg)
