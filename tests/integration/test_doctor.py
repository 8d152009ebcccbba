"""`volley doctor` against the loopback DNS server: a good zone and broken ones.

Every lookup goes to the lab DNS on 127.0.0.1 (the config's dns.nameservers); the
addresses in the zones are documentation ranges that nothing connects to. Most cases
call `diagnose` with the real resolver; a few run `python -m engine doctor` as a process
for the exit status and the printed records.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from engine.doctor.fetch import DoctorResolver
from engine.doctor.model import ADVICE, FAIL, Finding
from engine.doctor.report import Report
from engine.doctor.run import diagnose
from engine.lab.dns import dns_server_thread
from engine.mail.dkim import DkimKey
from tests.doctor_zone import (
    DOMAIN,
    EHLO,
    REV,
    SOURCE,
    SOURCE6,
    Keys,
    config_data,
    config_toml,
    doctor_config,
    good_zone,
    make_keys,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("doctor-keys"))


def run_doctor(keys: Keys, zone: dict[str, Any], ips: list[str] | None = None,
               data: dict[str, Any] | None = None) -> Report:
    with dns_server_thread(zone, origin=".") as server:
        cfg_data = data or config_data(keys, [])
        cfg_data["dns"] = {"nameservers": [server.address], "timeout": "3s"}
        from engine.config import from_dict

        cfg = from_dict(cfg_data)
        resolver = DoctorResolver(list(cfg.dns.nameservers), float(cfg.dns.timeout))
        return asyncio.run(diagnose(cfg, DOMAIN, ips or [], resolver.lookup))


def fails(report: Report) -> list[Finding]:
    return [f for f in report.findings if f.level == FAIL]


def one_fail(report: Report, check: str) -> Finding:
    found = fails(report)
    assert [f.check for f in found] == [check], [(f.check, f.message) for f in found]
    return found[0]


def test_good_zone_is_ready(keys: Keys) -> None:
    report = run_doctor(keys, good_zone(keys), ips=[SOURCE, SOURCE6])
    assert report.ready, [(f.check, f.subject, f.message) for f in fails(report)]
    assert not [f for f in report.findings if f.level == ADVICE]
    checks = {(f.check, f.subject) for f in report.findings}
    for want in [("mx", DOMAIN), ("spf", SOURCE), ("spf", SOURCE6), ("dkim", "ed1._domainkey.example.test"),
                 ("dkim", "rsa1._domainkey.example.test"), ("ptr", SOURCE), ("ptr", SOURCE6),
                 ("ehlo", SOURCE), ("mta-sts", "_mta-sts.example.test"), ("tls-rpt", "_smtp._tls.example.test")]:
        assert want in checks


def test_sources_default_to_the_hostname_addresses(keys: Keys) -> None:
    data = config_data(keys, [])
    del data["delivery"]
    report = run_doctor(keys, good_zone(keys), data=data)
    assert [(s.ip, s.origin) for s in report.sources] == [(SOURCE, f"server.hostname {EHLO}"),
                                                         (SOURCE6, f"server.hostname {EHLO}")]
    assert report.ready


def _no_spf(z: dict[str, Any], k: Keys) -> None:
    z[DOMAIN]["TXT"] = ["site-verification=abc"]


def _spf_elsewhere(z: dict[str, Any], k: Keys) -> None:
    z[DOMAIN]["TXT"] = ["v=spf1 ip4:192.0.2.99 -all"]


def _spf_over_limit(z: dict[str, Any], k: Keys) -> None:
    includes = " ".join(f"include:l{i}.example.test" for i in range(11))
    z[DOMAIN]["TXT"] = [f"v=spf1 ip4:{SOURCE} {includes} -all"]
    for i in range(11):
        z[f"l{i}.example.test"] = {"TXT": [f"v=spf1 ip4:198.51.100.{i} -all"]}


def _two_spf(z: dict[str, Any], k: Keys) -> None:
    z[DOMAIN]["TXT"] = ["v=spf1 ip4:192.0.2.10 -all", "v=spf1 include:_spf.example.test -all"]


def _dkim_missing(z: dict[str, Any], k: Keys) -> None:
    del z["ed1._domainkey.example.test"]


def _dkim_other_key(z: dict[str, Any], k: Keys) -> None:
    other = DkimKey("example.test", "ed1", "ed25519-sha256", "relaxed", "relaxed", ("From",), False,
                    ed25519.Ed25519PrivateKey.generate())
    z["ed1._domainkey.example.test"] = {"TXT": [other.txt_record()]}


def _no_dmarc(z: dict[str, Any], k: Keys) -> None:
    del z["_dmarc.example.test"]


def _no_mx(z: dict[str, Any], k: Keys) -> None:
    del z[DOMAIN]["MX"]


def _null_mx(z: dict[str, Any], k: Keys) -> None:
    z[DOMAIN]["MX"] = [(0, ".")]


def _no_ptr(z: dict[str, Any], k: Keys) -> None:
    del z[REV]


def _ptr_not_confirmed(z: dict[str, Any], k: Keys) -> None:
    z[EHLO]["A"] = ["192.0.2.99"]


# (case, zone change, the check that fails, words of its message, the record to publish:
# its zone line starts with this, or holds each "|"-separated part)
BROKEN: list[tuple[str, Callable[[dict[str, Any], Keys], None], str, str, str]] = [
    ("no-spf", _no_spf, "spf", "no SPF record", f'{DOMAIN}. TXT "v=spf1 ip4:{SOURCE} ~all"'),
    ("spf-not-authorising", _spf_elsewhere, "spf", "not authorised: fail",
     f'{DOMAIN}. TXT "v=spf1 ip4:{SOURCE} ip4:192.0.2.99 -all"'),
    ("spf-over-10-lookups", _spf_over_limit, "spf", "needs 11 DNS lookups", ""),
    ("two-spf-records", _two_spf, "spf", "2 SPF records",  # merged, in the order the DNS gave them
     f'{DOMAIN}. TXT "v=spf1 |ip4:{SOURCE} |include:_spf.example.test |-all"'),
    ("dkim-missing", _dkim_missing, "dkim", "no DKIM key record",
     'ed1._domainkey.example.test. TXT "v=DKIM1; k=ed25519; p='),
    ("dkim-other-key", _dkim_other_key, "dkim", "is not the public key of", "ed1._domainkey.example.test. TXT"),
    ("no-dmarc", _no_dmarc, "dmarc", "no DMARC record", '_dmarc.example.test. TXT "v=DMARC1; p=none;'),
    ("no-mx", _no_mx, "mx", "no MX record", f"{DOMAIN}. MX 10 {EHLO}."),
    ("null-mx", _null_mx, "mx", "RFC 7505", f"{DOMAIN}. MX 10 {EHLO}."),
    ("no-ptr", _no_ptr, "ptr", "no PTR record", f"{REV}. PTR {EHLO}."),
    ("fcrdns-mismatch", _ptr_not_confirmed, "ptr", "forward-confirmed reverse DNS fails", f"{EHLO}. A {SOURCE}"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_zone_names_the_problem_and_the_record(keys: Keys, case: Any) -> None:
    _name, change, check, words, publish = case
    zone = good_zone(keys)
    change(zone, keys)
    report = run_doctor(keys, zone)
    assert not report.ready
    finding = one_fail(report, check)
    assert words in finding.message
    if publish:
        parts = publish.split("|")
        assert any(r.zone_line().startswith(parts[0]) and all(p in r.zone_line() for p in parts)
                   for r in finding.publish), finding.publish
    if check == "dkim":  # the record printed is the configured key's, whole
        assert finding.publish[0].value == keys.ed_txt


def test_ehlo_not_the_ptr_name_is_advice(keys: Keys) -> None:
    zone = good_zone(keys)
    zone[REV] = {"PTR": ["out-10.example.test"]}
    zone["out-10.example.test"] = {"A": [SOURCE]}
    report = run_doctor(keys, zone)
    assert report.ready
    [advice] = [f for f in report.findings if f.level == ADVICE]
    assert advice.check == "ehlo" and 'helo_name = "out-10.example.test"' in advice.message


def test_dns_failure_is_a_failure_not_a_missing_record(keys: Keys) -> None:
    zone = good_zone(keys)
    zone["_dmarc.example.test"] = "SERVFAIL"
    report = run_doctor(keys, zone)
    finding = one_fail(report, "dmarc")
    assert "DNS servfail" in finding.message and not finding.publish


# --- the command, as a process ------------------------------------------------------------


def volley(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def _command(keys: Keys, zone: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    with dns_server_thread(zone, origin=".") as server:
        conf = tmp_path / "volley.toml"
        conf.write_text(config_toml(keys, [server.address]))
        result = volley("doctor", DOMAIN, "-c", str(conf), *args, cwd=tmp_path)
        assert server.total() > 0  # the lab server was asked, not the system's resolver
        return result


def test_command_good_zone_exits_0(keys: Keys, tmp_path: Path) -> None:
    r = _command(keys, good_zone(keys), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and r.stdout.rstrip().endswith(f"{DOMAIN} is ready to send")
    assert f"OK      spf      {SOURCE}: authorised: pass" in r.stdout


def test_command_broken_zone_exits_1_with_the_records(keys: Keys, tmp_path: Path) -> None:
    zone = good_zone(keys)
    _no_spf(zone, keys)
    _dkim_other_key(zone, keys)
    r = _command(keys, zone, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("FAIL    spf      example.test: no SPF record") for line in lines)
    assert f'publish: {DOMAIN}. TXT "v=spf1 ip4:{SOURCE} ~all"' in r.stdout
    assert f'publish: ed1._domainkey.example.test. TXT "{keys.ed_txt}"' in r.stdout
    assert "NOT ready: 2 problems" in lines[-1]


def test_command_advice_only_exits_0_and_json(keys: Keys, tmp_path: Path) -> None:
    zone = good_zone(keys)
    del zone["_mta-sts.example.test"], zone["_smtp._tls.example.test"]
    r = _command(keys, zone, tmp_path, "--json", "--ip", SOURCE6)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ready"] is True and doc["counts"]["FAIL"] == 0 and doc["counts"]["ADVICE"] == 2
    assert [s["ip"] for s in doc["sources"]] == [SOURCE6]
    advice = {f["check"]: f for f in doc["findings"] if f["level"] == "ADVICE"}
    assert advice["mta-sts"]["publish"][0]["name"] == "_mta-sts.example.test"
    assert advice["tls-rpt"]["publish"][0]["value"] == "v=TLSRPTv1; rua=mailto:tls-reports@example.test"


@pytest.mark.parametrize("args, words", [
    (["doctor", DOMAIN, "--frobnicate"], "unrecognized arguments"),
    (["doctor", DOMAIN, "-c", "missing.toml"], "missing.toml"),
    (["doctor", "not a domain", "-c", "missing.toml"], "DOMAIN: expected a domain name"),
    (["doctor", DOMAIN, "--ip", "300.1.1.1"], "expected an IPv4 or IPv6 address"),
    (["doctor"], "DOMAIN"),
])
def test_command_bad_usage_exits_2(tmp_path: Path, args: list[str], words: str) -> None:
    # Each fails before any DNS query: no resolver is set up.
    r = volley(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr and r.stdout == ""


def test_doctor_config_helper_matches_the_toml(keys: Keys) -> None:
    import tomllib

    from engine.config import from_dict

    assert from_dict(tomllib.loads(config_toml(keys, ["127.0.0.1:53"]))) == doctor_config(keys, ["127.0.0.1:53"])
