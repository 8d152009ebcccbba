"""The authentication checks a receiver runs on every message: SPF, DKIM, DMARC.

Each is a pure function (Context, Answers) → findings, raising `Missing` for a DNS
answer it still needs. A FAIL carries the record to publish whenever one would fix it.
"""

from __future__ import annotations

from engine.doctor.answers import Answer, Answers, txt_with_prefix
from engine.doctor.model import ADVICE, FAIL, OK, Context, Finding, KeyEntry, Record, org_domain, parse_tags
from engine.doctor.spf import MAX_LOOKUPS, check_host, spf_records, walk
from engine.doctor.spf_terms import SpfSyntax, parse_record, suggest


def _dns_failure(check: str, name: str, answer: Answer) -> Finding:
    return Finding(check, FAIL, name, f"DNS {answer.status.value} looking up {name}: receivers would "
                   "treat it as a temporary error; check the zone's name servers")


# --- SPF (RFC 7208) ----------------------------------------------------------------------


def check_spf(ctx: Context, answers: Answers) -> list[Finding]:
    domain, ips = ctx.domain, [s.ip for s in ctx.sources]
    answer, records = spf_records(answers, domain)
    if answer.status.is_failure:
        return [_dns_failure("spf", domain, answer)]
    if not records:
        return [Finding("spf", FAIL, domain, "no SPF record (TXT \"v=spf1 ...\", RFC 7208 §4.5): receivers "
                        "get \"none\" and treat the mail as unauthenticated",
                        (Record(domain, "TXT", suggest([], ips)),))]
    if len(records) > 1:
        return [Finding("spf", FAIL, domain, f"{len(records)} SPF records; there must be exactly one, or "
                        "receivers answer permerror (RFC 7208 §4.5): publish one record that merges them",
                        (Record(domain, "TXT", suggest(records, ips)),))]
    try:
        parse_record(records[0])
    except SpfSyntax as err:
        return [Finding("spf", FAIL, domain, f"permerror: {err}", (Record(domain, "TXT", suggest(records, ips)),))]
    tree = walk(answers, domain)
    findings: list[Finding] = []
    if tree.error:
        kind = "temperror" if tree.temporary else "permerror"
        findings.append(Finding("spf", FAIL, domain, f"{kind}: {tree.error}"))
    elif tree.lookups > MAX_LOOKUPS:
        findings.append(Finding("spf", FAIL, domain, (
            f"the record needs {tree.lookups} DNS lookups (include, a, mx, ptr, exists, redirect), over the "
            f"limit of {MAX_LOOKUPS} (RFC 7208 §4.6.4): receivers answer permerror once evaluation passes the "
            "10th; replace include: and mx/a terms by the ip4:/ip6: ranges they stand for")))
    else:
        findings.append(Finding("spf", OK, domain, f"one SPF record, {tree.lookups}/{MAX_LOOKUPS} DNS lookups: "
                                f"{records[0]}"))
    for source in ctx.sources:
        findings.append(_spf_for(ctx, answers, source.ip, source.ehlo, records[0]))
    return findings


def _spf_for(ctx: Context, answers: Answers, ip: str, helo: str, record: str) -> Finding:
    res = check_host(answers, ip, ctx.domain, helo=helo)
    summary = f"{res.result} ({res.reason}; {res.lookups} DNS lookup{'' if res.lookups == 1 else 's'})"
    if res.result == "pass":
        return Finding("spf", OK, ip, f"authorised: {summary}")
    if res.result == "temperror":
        return Finding("spf", FAIL, ip, f"{summary}: receivers would defer or treat the mail as unauthenticated")
    return Finding("spf", FAIL, ip, f"not authorised: {summary}",
                   (Record(ctx.domain, "TXT", suggest([record], [ip])),))


# --- DKIM (RFC 6376, RFC 8463) --------------------------------------------------------


def check_dkim(ctx: Context, answers: Answers) -> list[Finding]:
    if not ctx.keys:
        return [Finding("dkim", FAIL, ctx.domain, (
            f"no [[dkim]] entry signs mail from {ctx.domain}: receivers (Gmail and Yahoo for bulk senders) "
            "require DKIM; add a [[dkim]] entry (domain, selector, key_file) and run the doctor again "
            "for the record to publish"))]
    for entry in ctx.keys:  # ask for every selector at once
        answers.hint(f"{entry.selector}._domainkey.{entry.domain}", "TXT")
    return [_dkim_entry(entry, answers) for entry in ctx.keys]


def _dkim_entry(entry: KeyEntry, answers: Answers) -> Finding:
    name = f"{entry.selector}._domainkey.{entry.domain}"
    if entry.key is None:
        return Finding("dkim", FAIL, name, f"the key does not load: {entry.error}")
    want = entry.key.txt_record()
    publish = (Record(name, "TXT", want),)
    answer = answers.get(name, "TXT")
    if answer.status.is_failure:
        return _dns_failure("dkim", name, answer)
    found = [r for r in answer.records if "p" in parse_tags(r)]
    if not found:
        return Finding("dkim", FAIL, name, f"no DKIM key record (dkim[{entry.index}], {entry.key_file}): "
                       "receivers cannot verify the signature (RFC 6376 §6.1.2)", publish)
    if len(found) > 1:
        return Finding("dkim", FAIL, name, f"{len(found)} key records: verifiers may read any of them "
                       "(RFC 6376 §3.6.2.2); publish only this one", publish)
    tags, wanted = parse_tags(found[0]), parse_tags(want)
    p = "".join(tags["p"].split())
    if "v" in tags and tags["v"] != "DKIM1":
        return Finding("dkim", FAIL, name, f"v={tags['v']}: must be DKIM1 (RFC 6376 §3.6.1)", publish)
    if not p:
        return Finding("dkim", FAIL, name, "the key is revoked (empty p=, RFC 6376 §3.6.1)", publish)
    if tags.get("k", "rsa").lower() != wanted["k"]:
        return Finding("dkim", FAIL, name, f"k={tags.get('k', 'rsa')} but dkim[{entry.index}] signs with "
                       f"{entry.key.algorithm}", publish)
    if p != wanted["p"]:
        return Finding("dkim", FAIL, name, f"p= is not the public key of {entry.key_file} (dkim[{entry.index}]): "
                       "every signature would fail to verify", publish)
    if "y" in tags.get("t", "").split(":"):
        return Finding("dkim", ADVICE, name, "the key matches but is in testing mode (t=y): some verifiers "
                       "treat its signatures as unsigned (RFC 6376 §3.6.1); remove t=y")
    return Finding("dkim", OK, name, f"{entry.key.algorithm} key matches {entry.key_file}")


# --- DMARC (RFC 7489) ------------------------------------------------------------------

POLICIES = ("none", "quarantine", "reject")


def _dmarc_suggestion(domain: str) -> Record:
    return Record(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}")


def check_dmarc(ctx: Context, answers: Answers) -> list[Finding]:
    domain, org = ctx.domain, org_domain(ctx.domain)
    record, where, problem = _dmarc_record(answers, domain, org)
    if problem is not None:
        return [problem]
    if record is None:
        return [Finding("dmarc", FAIL, f"_dmarc.{domain}", "no DMARC record (RFC 7489 §6.1): receivers such as "
                        "Gmail and Yahoo require one of bulk senders; start with p=none and read the rua "
                        "reports, then move to quarantine or reject", (_dmarc_suggestion(domain),))]
    tags = parse_tags(record)
    policy = tags.get("sp", tags.get("p", "")) if where != domain else tags.get("p", "")
    name = f"_dmarc.{where}"
    if "p" not in tags:
        return [Finding("dmarc", FAIL, name, "the record has no p= tag (RFC 7489 §6.3)",
                        (Record(name, "TXT", record.replace("v=DMARC1", "v=DMARC1; p=none", 1)),))]
    if policy.lower() not in POLICIES:
        return [Finding("dmarc", FAIL, name, f"p={policy}: must be none, quarantine or reject (RFC 7489 §6.3)",
                        (_dmarc_suggestion(where),))]
    findings = [Finding("dmarc", OK, name, f"policy {policy.lower()}" +
                        (f" (the organisational domain's record, RFC 7489 §6.6.3): {record}" if where != domain
                         else f": {record}"))]
    if policy.lower() == "none":
        findings.append(Finding("dmarc", ADVICE, name, "p=none only monitors: once the aggregate reports show "
                                "your mail passes, move to p=quarantine or p=reject"))
    findings.append(_alignment(ctx, tags))
    return findings


def _dmarc_record(answers: Answers, domain: str, org: str) -> tuple[str | None, str, Finding | None]:
    """(record, the domain it was found at, a finding that ends the check)."""
    names = [domain] if org == domain else [domain, org]
    for where in names:
        answers.hint(f"_dmarc.{names[-1]}", "TXT")
        answer = answers.get(f"_dmarc.{where}", "TXT")
        if answer.status.is_failure:
            return None, where, _dns_failure("dmarc", f"_dmarc.{where}", answer)
        found = txt_with_prefix(answer.records, "v=DMARC1")
        if len(found) > 1:
            return None, where, Finding("dmarc", FAIL, f"_dmarc.{where}", (
                f"{len(found)} DMARC records: receivers then apply none of them (RFC 7489 §6.6.3); "
                "publish exactly one"), (_dmarc_suggestion(where),))
        if found:
            return found[0], where, None
    return None, domain, None


def _alignment(ctx: Context, tags: dict[str, str]) -> Finding:
    """RFC 7489 §3.1.1: a DKIM d= aligns with the From: domain, relaxed (same
    organisational domain) unless adkim=s asks for the exact name."""
    strict = tags.get("adkim", "r").lower() == "s"
    keys = [e for e in ctx.keys if e.key is not None]
    aligned = [e.domain for e in keys
               if (e.domain == ctx.domain if strict else org_domain(e.domain) == org_domain(ctx.domain))]
    mode = "strict" if strict else "relaxed"
    if aligned:
        return Finding("dmarc", OK, ctx.domain, f"DKIM d={aligned[0]} aligns with {ctx.domain} ({mode})")
    have = ", ".join(f"d={e.domain}" for e in keys) or "no DKIM key"
    return Finding("dmarc", FAIL, ctx.domain, (
        f"no DKIM signature aligns with {ctx.domain} ({mode}, RFC 7489 §3.1.1): {have}; DMARC then rests on SPF "
        f"alone, which aligns only when the MAIL FROM domain is {ctx.domain}, and breaks on forwarding"))
