"""Which addresses Volley sends from, as receivers will see them: the one function that
decides it, so every check that is about "the sending address" reads the same list.

In order: the addresses given with --ip; else every `[[egress]] source_address` (with
its ehlo_name) when the config has egress pools; else `delivery.source_address`; else
the addresses of server.hostname (A and AAAA), the best guess when outbound
connections are not bound: a sender's name normally resolves to the address it sends
from, and if it does not, the PTR check says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from engine.config import Config
from engine.doctor.answers import Answers
from engine.doctor.model import FAIL, Finding, Source


def ehlo_name(cfg: Config) -> str:
    """What Volley greets with (RFC 5321 §4.1.1.1), as delivery does."""
    return (cfg.delivery.helo_name or cfg.server.hostname).rstrip(".").lower()


def sending_sources(cfg: Config, ips: Sequence[str],
                    answers: Answers) -> tuple[tuple[Source, ...], tuple[Finding, ...]]:
    """The sending addresses and any finding about them (raises Missing for DNS)."""
    ehlo = ehlo_name(cfg)
    if ips:
        return tuple(Source(str(ipaddress.ip_address(ip)), ehlo, "--ip") for ip in ips), ()
    if cfg.egress:
        return tuple(Source(str(ipaddress.ip_address(e.source_address)),
                            (e.ehlo_name or ehlo).rstrip(".").lower(),
                            f"egress[{i}].source_address") for i, e in enumerate(cfg.egress)), ()
    if cfg.delivery.source_address:
        return (Source(str(ipaddress.ip_address(cfg.delivery.source_address)), ehlo,
                       "delivery.source_address"),), ()
    host = cfg.server.hostname.rstrip(".").lower()
    answers.hint(host, "AAAA")
    a, aaaa = answers.get(host, "A"), answers.get(host, "AAAA")
    found = tuple(Source(ip, ehlo, f"server.hostname {host}") for ip in a.records + aaaa.records)
    if found:
        return found, ()
    failure = next((x.status.value for x in (a, aaaa) if x.status.is_failure), "")
    why = f"DNS {failure}" if failure else "no A or AAAA record"
    return (), (Finding("sources", FAIL, host,
                        f"cannot tell which address Volley sends from: delivery.source_address is not set "
                        f"and server.hostname {host} has {why}; set delivery.source_address, "
                        f"or name the addresses with --ip"),)
