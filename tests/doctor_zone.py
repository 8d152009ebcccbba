"""A sending domain that is ready in every respect, for the `volley doctor` tests.

`good_zone(keys)` is the zone the lab DNS serves (origin "." so the reverse names of
in-addr.arpa and ip6.arpa are served too); `doctor_config(...)` the config that sends
from it: delivery.source_address 192.0.2.10 and 2001:db8::10 via --ip, EHLO
mail.example.test, an Ed25519 and an RSA [[dkim]] key. The addresses are documentation
ranges (RFC 5737, RFC 3849): they are data in the zone; nothing connects to them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.config import Config, from_dict
from engine.doctor.run import keys_for

DOMAIN = "example.test"
SOURCE = "192.0.2.10"
SOURCE6 = "2001:db8::10"
EHLO = "mail.example.test"
REV = "10.2.0.192.in-addr.arpa"


@dataclass
class Keys:
    ed_file: str
    rsa_file: str
    ed_txt: str
    rsa_txt: str


def _pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return data


def make_keys(directory: Path) -> Keys:
    """An Ed25519 and an RSA-2048 key in `directory`, with the TXT each must have."""
    ed, rs = directory / "ed.pem", directory / "rsa.pem"
    ed.write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    rs.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    cfg = doctor_config(Keys(str(ed), str(rs), "", ""), [])
    entries = keys_for(cfg, DOMAIN)
    assert entries[0].key is not None and entries[1].key is not None
    return Keys(str(ed), str(rs), entries[0].key.txt_record(), entries[1].key.txt_record())


def config_data(keys: Keys, nameservers: list[str]) -> dict[str, Any]:
    return {
        "server": {"hostname": EHLO},
        "delivery": {"source_address": SOURCE},
        "dns": {"nameservers": nameservers, "timeout": "3s"},
        "dkim": [
            {"domain": DOMAIN, "selector": "ed1", "key_file": keys.ed_file, "algorithm": "ed25519-sha256"},
            {"domain": DOMAIN, "selector": "rsa1", "key_file": keys.rsa_file},
        ],
    }


def doctor_config(keys: Keys, nameservers: list[str]) -> Config:
    return from_dict(config_data(keys, nameservers))


def config_toml(keys: Keys, nameservers: list[str]) -> str:
    ns = ", ".join(f'"{n}"' for n in nameservers)
    return f"""
[server]
hostname = "{EHLO}"

[delivery]
source_address = "{SOURCE}"

[dns]
nameservers = [{ns}]
timeout = "3s"

[[dkim]]
domain = "{DOMAIN}"
selector = "ed1"
key_file = "{keys.ed_file}"
algorithm = "ed25519-sha256"

[[dkim]]
domain = "{DOMAIN}"
selector = "rsa1"
key_file = "{keys.rsa_file}"
"""


def good_zone(keys: Keys) -> dict[str, Any]:
    return copy.deepcopy({
        DOMAIN: {"MX": [(10, "mx1.example.test")],
                 "TXT": ["v=spf1 ip4:192.0.2.10 include:_spf.example.test -all", "site-verification=abc"]},
        "mx1.example.test": {"A": ["192.0.2.25"]},
        "_spf.example.test": {"TXT": ["v=spf1 ip6:2001:db8::/48 mx ~all"]},
        "ed1._domainkey.example.test": {"TXT": [keys.ed_txt]},
        "rsa1._domainkey.example.test": {"TXT": [keys.rsa_txt]},  # over 255 octets: split strings
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.test"]},
        REV: {"PTR": [EHLO]},
        "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": {"PTR": [EHLO]},
        EHLO: {"A": [SOURCE], "AAAA": [SOURCE6]},
        "_mta-sts.example.test": {"TXT": ["v=STSv1; id=20260101"]},
        "mta-sts.example.test": {"A": ["192.0.2.30"]},
        "_smtp._tls.example.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tls-reports@example.test"]},
    })
