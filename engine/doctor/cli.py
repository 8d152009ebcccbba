"""`volley doctor DOMAIN [-c FILE] [--ip ADDR]... [--json]`: is DOMAIN ready to send?

Exit status: 0 when nothing FAILs (advice alone does not count), 1 when something
does or DNS cannot be asked at all, 2 for bad usage (an unknown option, a DOMAIN that
is not a domain name, a config that does not load) as every `volley` command.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from engine.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 or IPv6 address, got {text!r}") from None


def add_parser(sub: Any) -> None:
    """Register `volley doctor` on the `volley` subparsers."""
    p = sub.add_parser(
        "doctor", help="check a sending domain's DNS (SPF, DKIM, DMARC, MX, PTR, MTA-STS, TLS-RPT)",
        description=("Look up what receivers will check of mail from DOMAIN sent by this Volley, "
                     "through dns.nameservers of the config (else the system resolver), and print "
                     "what is wrong and the record to publish. Exit 0 when ready, 1 when not."))
    p.add_argument("domain", metavar="DOMAIN", help="the From: domain of the mail Volley sends")
    p.add_argument("-c", "--config", metavar="FILE", default=None,
                   help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--ip", metavar="ADDR", action="append", type=_ip, default=[],
                   help="a sending address to check (repeatable); default: [[egress]] source "
                        "addresses, else delivery.source_address, else the addresses of server.hostname")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    import dns.resolver

    from engine.config import ConfigError, load
    from engine.doctor.fetch import DoctorResolver
    from engine.doctor.report import render_json, render_text
    from engine.doctor.run import diagnose
    from engine.doctor.spf_terms import valid_domain

    domain: str = args.domain.strip().rstrip(".").lower()
    if not valid_domain(domain):
        raise CliError(f"DOMAIN: expected a domain name such as example.com, got {args.domain!r}", EXIT_USAGE)
    try:
        cfg = load(args.config)
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    try:
        resolver = DoctorResolver(list(cfg.dns.nameservers), float(cfg.dns.timeout))
    except (ValueError, dns.resolver.NoResolverConfiguration) as err:
        raise CliError(f"cannot set up DNS: {err}; set dns.nameservers", EXIT_FAILURE) from None
    report = asyncio.run(diagnose(cfg, domain, args.ip, resolver.lookup))
    print(render_json(report) if args.json else render_text(report), end="", flush=True)
    return EXIT_OK if report.ready else EXIT_FAILURE
