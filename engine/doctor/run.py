"""One doctor run: the context from the config, the checks over fetched DNS, the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.config import Config
from engine.doctor.answers import Answers
from engine.doctor.checks_auth import check_dkim, check_dmarc, check_spf
from engine.doctor.checks_host import check_mta_sts, check_mx, check_ptr, check_tls_rpt
from engine.doctor.fetch import Lookup, settle
from engine.doctor.model import Context, Finding, KeyEntry, Source
from engine.doctor.report import Report
from engine.doctor.sources import ehlo_name, sending_sources
from engine.mail.dkim import DkimKeyError, load_key

Check = Callable[[Context, Answers], list[Finding]]
# The order of the report: what receivers look at first comes first.
CHECKS: tuple[Check, ...] = (check_mx, check_spf, check_dkim, check_dmarc, check_ptr, check_mta_sts, check_tls_rpt)


def keys_for(cfg: Config, domain: str) -> tuple[KeyEntry, ...]:
    """The `[[dkim]]` entries that sign mail from `domain` (its own or a parent's,
    as the signer picks them), each with its loaded key or the reason it did not load."""
    entries = []
    for i, entry in enumerate(cfg.dkim):
        d = entry.domain.lower()
        if domain != d and not domain.endswith("." + d):
            continue
        try:
            key = load_key(i, entry)
        except DkimKeyError as err:
            entries.append(KeyEntry(i, d, entry.selector, entry.key_file, error=str(err)))
        else:
            entries.append(KeyEntry(i, d, entry.selector, entry.key_file, key=key))
    return tuple(entries)


async def diagnose(cfg: Config, domain: str, ips: Sequence[str], lookup: Lookup,
                   checks: Sequence[Check] = CHECKS) -> Report:
    """Every check of `domain`, sending from `ips` (else what the config sends from)."""
    domain = domain.rstrip(".").lower()
    answers = Answers()
    [(sources, notes)] = await settle([lambda a: sending_sources(cfg, ips, a)], lookup, answers)
    ctx = Context(domain, sources, keys_for(cfg, domain), ehlo_name(cfg), notes)
    runs = [_bind(check, ctx) for check in checks]
    results = await settle(runs, lookup, answers)
    findings = [*notes, *(f for found in results for f in found)]
    return Report(domain, sources, ctx.ehlo, tuple(findings))


def _bind(check: Check, ctx: Context) -> Callable[[Answers], list[Finding]]:
    return lambda answers: check(ctx, answers)


__all__ = ["CHECKS", "Report", "Source", "diagnose", "keys_for"]
