"""The doctor's checks and report over plain answer tables: no DNS, no I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from engine.config import from_dict
from engine.doctor.answers import Answers, Missing
from engine.doctor.checks_auth import check_dkim, check_dmarc
from engine.doctor.checks_host import check_mta_sts, check_mx, check_ptr, check_tls_rpt
from engine.doctor.model import ADVICE, FAIL, OK, Context, Finding, KeyEntry, Record, Source, org_domain
from engine.doctor.report import Report, as_json, render_text
from engine.doctor.run import keys_for
from engine.doctor.sources import sending_sources

D = "news.example.com"


@pytest.fixture(scope="module")
def key_entry(tmp_path_factory: pytest.TempPathFactory) -> KeyEntry:
    path = tmp_path_factory.mktemp("k") / "ed.pem"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cfg = from_dict({"dkim": [{"domain": "example.com", "selector": "s1", "key_file": str(path),
                               "algorithm": "ed25519-sha256"},
                              {"domain": "other.example", "selector": "s1", "key_file": str(path)}]})
    [entry] = keys_for(cfg, D)  # the parent's key signs the subdomain; other.example does not
    assert entry.domain == "example.com" and entry.key is not None
    return entry


def ctx(*keys: KeyEntry, sources: tuple[Source, ...] = ()) -> Context:
    return Context(D, sources, keys, "mail.example.com")


def levels(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.level, f.check) for f in findings]


# --- DKIM -----------------------------------------------------------------------------


def test_dkim_record_states(key_entry: KeyEntry) -> None:
    assert key_entry.key is not None
    want = key_entry.key.txt_record()
    name = "s1._domainkey.example.com"

    def run(*records: str) -> Finding:
        [f] = check_dkim(ctx(key_entry), Answers.of({name: {"TXT": list(records)}} if records else {}))
        return f

    assert run(want).level == OK
    assert run(want.replace("v=DKIM1; ", "")).level == OK  # v= is optional
    assert run(want + "; t=y").level == ADVICE
    for records, words in [((), "no DKIM key record"), ((want, want + " "), "2 key records"),
                           (("v=DKIM1; k=ed25519; p=",), "revoked"), (("v=DKIM1; k=rsa; p=AAAA",), "k=rsa"),
                           (("v=DKIM1; k=ed25519; p=AAAA",), "is not the public key")]:
        f = run(*records)
        assert f.level == FAIL and words in f.message, (records, f.message)
        assert f.publish == (Record(name, "TXT", want),)


def test_dkim_without_keys_and_with_a_broken_key() -> None:
    [f] = check_dkim(ctx(), Answers.of({}))
    assert f.level == FAIL and "no [[dkim]] entry" in f.message
    broken = KeyEntry(0, "example.com", "s1", "/nowhere.pem", error="dkim[0].key_file: /nowhere.pem: No such file")
    [f] = check_dkim(ctx(broken), Answers.of({}))
    assert f.level == FAIL and "No such file" in f.message


# --- DMARC ------------------------------------------------------------------------------


def test_dmarc_falls_back_to_the_organisational_domain(key_entry: KeyEntry) -> None:
    answers = Answers.of({"_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject; sp=quarantine"]}})
    found = check_dmarc(ctx(key_entry), answers)
    assert levels(found) == [(OK, "dmarc"), (OK, "dmarc")]
    assert "policy quarantine (the organisational domain's record" in found[0].message
    assert "d=example.com aligns with news.example.com (relaxed)" in found[1].message


def test_dmarc_strict_alignment_and_no_keys(key_entry: KeyEntry) -> None:
    answers = Answers.of({f"_dmarc.{D}": {"TXT": ["v=DMARC1; p=quarantine; adkim=s"]}})
    found = check_dmarc(ctx(key_entry), answers)
    assert levels(found) == [(OK, "dmarc"), (FAIL, "dmarc")] and "(strict" in found[1].message
    found = check_dmarc(ctx(), Answers.of({f"_dmarc.{D}": {"TXT": ["v=DMARC1; p=reject"]}}))
    assert found[-1].level == FAIL and "no DKIM key" in found[-1].message


@pytest.mark.parametrize("records, words, publish", [
    ([], "no DMARC record", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{D}"),
    (["v=DMARC1; rua=mailto:d@example.com"], "no p= tag", "v=DMARC1; p=none; rua=mailto:d@example.com"),
    (["v=DMARC1; p=maybe"], "p=maybe", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{D}"),
    (["v=DMARC1; p=none", "v=DMARC1; p=reject"], "2 DMARC records", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{D}"),
])
def test_dmarc_failures(records: list[str], words: str, publish: str) -> None:
    answers = Answers.of({f"_dmarc.{D}": {"TXT": records}} if records else {})
    [f] = check_dmarc(ctx(), answers)
    assert f.level == FAIL and words in f.message
    assert f.publish[0].value == publish


def test_dmarc_p_none_is_advice(key_entry: KeyEntry) -> None:
    found = check_dmarc(ctx(key_entry), Answers.of({f"_dmarc.{D}": {"TXT": ["v=DMARC1; p=none"]}}))
    assert levels(found) == [(OK, "dmarc"), (ADVICE, "dmarc"), (OK, "dmarc")]


def test_org_domain_is_the_last_two_labels() -> None:
    assert org_domain("a.b.Example.COM.") == "example.com"
    assert org_domain("example.com") == "example.com"


# --- MX, PTR ----------------------------------------------------------------------------------


def test_mx_hosts_without_addresses() -> None:
    zone: dict[str, dict[str, list[str]]] = {D: {"MX": ["10 a.example.com", "20 b.example.com"]}}
    [f] = check_mx(ctx(), Answers.of(zone))
    assert f.level == FAIL and "no MX host has an address" in f.message
    zone["b.example.com"] = {"AAAA": ["2001:db8::25"]}
    [f] = check_mx(ctx(), Answers.of(zone))
    assert f.level == ADVICE and "a.example.com" in f.message


def test_ptr_of_ipv6_and_several_names() -> None:
    source = Source("2001:db8::10", "mail.example.com", "--ip")
    rev = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    answers = Answers.of({rev: {"PTR": ["mail.example.com", "other.example.com"]},
                          "mail.example.com": {"AAAA": ["2001:DB8:0::10"]}})
    found = check_ptr(ctx(sources=(source,)), answers)
    assert levels(found) == [(OK, "ptr"), (ADVICE, "ptr"), (OK, "ehlo")]


# --- MTA-STS, TLS-RPT: advice at worst -------------------------------------------------------


@pytest.mark.parametrize("zone, words", [
    ({}, "no MTA-STS record"),
    ({f"_mta-sts.{D}": {"TXT": ["v=STSv1; id=1", "v=STSv1; id=2"]}}, "2 MTA-STS records"),
    ({f"_mta-sts.{D}": {"TXT": ["v=STSv1; id=not-alnum!"]}}, "must be 1 to 32 letters"),
    ({f"_mta-sts.{D}": {"TXT": ["v=STSv1; id=20260101"]}}, "has no address"),
])
def test_mta_sts_advice(zone: dict[str, Any], words: str) -> None:
    [f] = check_mta_sts(ctx(), Answers.of(zone))
    assert f.level == ADVICE and words in f.message


@pytest.mark.parametrize("records, words", [
    ([], "no TLS-RPT record"), (["v=TLSRPTv1; rua=ftp://x"], "must be mailto: or https:"),
    (["v=TLSRPTv1; rua=mailto:a@x", "v=TLSRPTv1; rua=mailto:b@x"], "2 TLS-RPT records"),
])
def test_tls_rpt_advice(records: list[str], words: str) -> None:
    [f] = check_tls_rpt(ctx(), Answers.of({f"_smtp._tls.{D}": {"TXT": records}} if records else {}))
    assert f.level == ADVICE and words in f.message


# --- sources ------------------------------------------------------------------------------------


def test_sources_in_order_of_precedence() -> None:
    cfg = from_dict({"server": {"hostname": "mail.example.com"}, "delivery": {"source_address": "192.0.2.1"}})
    assert sending_sources(cfg, ["2001:db8::0:1"], Answers())[0] == (Source("2001:db8::1", "mail.example.com",
                                                                            "--ip"),)
    assert sending_sources(cfg, [], Answers())[0][0].origin == "delivery.source_address"
    shaped = from_dict({"server": {"hostname": "mail.example.com"},
                        "delivery": {"source_address": "192.0.2.1"},
                        "egress": [{"name": "out7", "source_address": "192.0.2.7",
                                    "ehlo_name": "out7.example.com"},
                                   {"name": "out8", "source_address": "192.0.2.8"}]})
    assert sending_sources(shaped, [], Answers())[0] == (
        Source("192.0.2.7", "out7.example.com", "egress[0].source_address"),
        Source("192.0.2.8", "mail.example.com", "egress[1].source_address"))
    bare = from_dict({"server": {"hostname": "mail.example.com"}})
    with pytest.raises(Missing):
        sending_sources(bare, [], Answers())
    sources, notes = sending_sources(bare, [], Answers.of({}))
    assert sources == () and notes[0].level == FAIL and "set delivery.source_address" in notes[0].message


# --- the report -------------------------------------------------------------------------------------


def test_report_text_and_json(tmp_path: Path) -> None:
    long_txt = "v=DKIM1; k=rsa; p=" + "A" * 400
    findings = (Finding("spf", OK, D, "fine"),
                Finding("dkim", FAIL, "s._domainkey." + D, "missing", (Record("s._domainkey." + D, "TXT", long_txt),)),
                Finding("tls-rpt", ADVICE, "_smtp._tls." + D, "none"))
    report = Report(D, (Source("192.0.2.1", "mail.example.com", "--ip"),), "mail.example.com", findings)
    text = render_text(report)
    lines = text.splitlines()
    assert lines[1] == f"OK      spf      {D}: fine"
    assert lines[3].split("publish: ")[1] == (f's._domainkey.{D}. TXT "{long_txt[:255]}" "{long_txt[255:]}"')
    assert lines[-1] == f"{D} is NOT ready: 1 problem, 1 piece of advice"
    doc = json.loads(json.dumps(as_json(report)))
    assert doc["ready"] is False and doc["counts"] == {"OK": 1, "FAIL": 1, "ADVICE": 1}
    assert doc["findings"][1]["publish"][0]["value"] == long_txt
