"""The checks about hosts and transport: MX, reverse DNS of each sending address,
MTA-STS and TLS-RPT. Pure, like checks_auth.py: (Context, Answers) → findings.
"""

from __future__ import annotations

from engine.doctor.answers import Answer, Answers, reverse_name, txt_with_prefix
from engine.doctor.model import ADVICE, FAIL, OK, Context, Finding, Record, Source, family, parse_tags, same_ip


def _dns_failure(check: str, name: str, answer: Answer) -> Finding:
    return Finding(check, FAIL, name, f"DNS {answer.status.value} looking up {name}: check the zone's "
                   "name servers")


# --- MX (RFC 5321 §5.1, RFC 7505) ---------------------------------------------------------


def check_mx(ctx: Context, answers: Answers) -> list[Finding]:
    domain = ctx.domain
    answer = answers.get(domain, "MX")
    publish = (Record(domain, "MX", f"10 {ctx.ehlo or 'mail.' + domain}."),)
    if answer.status.is_failure:
        return [_dns_failure("mx", domain, answer)]
    if answer.is_void:
        return [Finding("mx", FAIL, domain, (
            "no MX record: bounces, replies and feedback reports to this domain have nowhere to go, and "
            "receivers check that a sender's domain can receive mail; publish an MX for a host that "
            "accepts mail for it"), publish)]
    hosts = [r.split()[-1].rstrip(".") for r in answer.records]
    if any(not h for h in hosts):
        return [Finding("mx", FAIL, domain, (
            "null MX (\"0 .\", RFC 7505): the domain says it receives no mail, so bounces and replies to it "
            "are lost and receivers may refuse mail from it (RFC 7505 §4.2); publish a real MX"), publish)]
    for host in hosts:
        answers.hint(host, "A")
        answers.hint(host, "AAAA")
    dead = [h for h in hosts if not (answers.get(h, "A").records or answers.get(h, "AAAA").records)]
    listing = ", ".join(sorted(answer.records, key=lambda r: int(r.split()[0]) if r.split()[0].isdigit() else 0))
    if len(dead) == len(hosts):
        return [Finding("mx", FAIL, domain, f"no MX host has an address (A or AAAA): {listing}")]
    if dead:
        return [Finding("mx", ADVICE, domain, f"MX hosts without an address: {', '.join(dead)} ({listing})")]
    return [Finding("mx", OK, domain, listing)]


# --- PTR and forward-confirmed reverse DNS --------------------------------------------------


def check_ptr(ctx: Context, answers: Answers) -> list[Finding]:
    findings: list[Finding] = []
    for source in ctx.sources:  # ask for every address's PTR at once
        answers.hint(reverse_name(source.ip), "PTR")
    for source in ctx.sources:
        findings.extend(_ptr_of(source, answers, ctx.domain))
    return findings


def _ptr_of(source: Source, answers: Answers, domain: str) -> list[Finding]:
    ip, rev = source.ip, reverse_name(source.ip)
    answer = answers.get(rev, "PTR")
    name_hint = source.ehlo or f"mail.{domain}"
    if answer.status.is_failure:
        return [_dns_failure("ptr", rev, answer)]
    if not answer.records:
        return [Finding("ptr", FAIL, ip, (
            f"no PTR record ({source.origin}): receivers such as Gmail refuse mail from addresses without "
            f"reverse DNS; ask whoever holds the address block to publish it"), (Record(rev, "PTR", name_hint + "."),))]
    kind = family(ip)
    for name in answer.records:
        answers.hint(name, kind)
    forward = {name: answers.get(name, kind) for name in answer.records}
    confirmed = [n for n, a in forward.items() if any(same_ip(ip, x) for x in a.records)]
    if not confirmed:
        name = answer.records[0]
        seen = ", ".join(forward[name].records) or forward[name].status.value
        return [Finding("ptr", FAIL, ip, (
            f"forward-confirmed reverse DNS fails: {ip} has PTR {name}, but {name} {kind} is {seen}, not "
            f"{ip}; receivers treat it as no reverse DNS"), (Record(name, kind, ip),))]
    findings = [Finding("ptr", OK, ip, f"PTR {confirmed[0]}, which resolves back to {ip} (forward-confirmed)")]
    if len(answer.records) > 1:
        findings.append(Finding("ptr", ADVICE, ip, f"{len(answer.records)} PTR records ({', '.join(answer.records)}): "
                                "many receivers read only one; keep a single PTR"))
    if source.ehlo in confirmed:
        findings.append(Finding("ehlo", OK, ip, f"EHLO name {source.ehlo} is the PTR name"))
    else:
        findings.append(Finding("ehlo", ADVICE, ip, (
            f"EHLO name {source.ehlo or '(none)'} is not the PTR name {confirmed[0]}: receivers score a "
            f"mismatch; set delivery.helo_name = \"{confirmed[0]}\" or point the PTR at {source.ehlo}")))
    return findings


# --- MTA-STS (RFC 8461) and TLS-RPT (RFC 8460): advice only ----------------------------------


def check_mta_sts(ctx: Context, answers: Answers) -> list[Finding]:
    name = f"_mta-sts.{ctx.domain}"
    answers.hint(f"mta-sts.{ctx.domain}", "A")
    answers.hint(f"mta-sts.{ctx.domain}", "AAAA")
    answer = answers.get(name, "TXT")
    found = txt_with_prefix(answer.records, "v=STSv1")
    publish = (Record(name, "TXT", "v=STSv1; id=1"),)
    why = ("senders cannot require TLS for mail to the domain; publish this record (change id= whenever "
           f"the policy changes) and serve the policy at https://mta-sts.{ctx.domain}/.well-known/mta-sts.txt "
           "(RFC 8461 §3)")
    if answer.status.is_failure:
        return [Finding("mta-sts", ADVICE, name, f"DNS {answer.status.value} looking up {name}")]
    if not found:
        return [Finding("mta-sts", ADVICE, name, "no MTA-STS record: " + why, publish)]
    if len(found) > 1:
        return [Finding("mta-sts", ADVICE, name, f"{len(found)} MTA-STS records: senders then assume no policy "
                        "(RFC 8461 §3.1); keep one", publish)]
    sts_id = parse_tags(found[0]).get("id", "")
    if not (sts_id.isalnum() and len(sts_id) <= 32):
        return [Finding("mta-sts", ADVICE, name, f"id={sts_id!r}: must be 1 to 32 letters or digits "
                        "(RFC 8461 §3.1); senders ignore the record", publish)]
    host = answers.get(f"mta-sts.{ctx.domain}", "A")
    if not host.records and not answers.get(f"mta-sts.{ctx.domain}", "AAAA").records:
        return [Finding("mta-sts", ADVICE, name, f"the record is published but mta-sts.{ctx.domain} has no "
                        "address, so senders cannot fetch the policy (RFC 8461 §3.3)")]
    return [Finding("mta-sts", OK, name, f"{found[0]} (the HTTPS policy itself is not fetched)")]


def check_tls_rpt(ctx: Context, answers: Answers) -> list[Finding]:
    name = f"_smtp._tls.{ctx.domain}"
    answer = answers.get(name, "TXT")
    found = txt_with_prefix(answer.records, "v=TLSRPTv1")
    publish = (Record(name, "TXT", f"v=TLSRPTv1; rua=mailto:tls-reports@{ctx.domain}"),)
    if answer.status.is_failure:
        return [Finding("tls-rpt", ADVICE, name, f"DNS {answer.status.value} looking up {name}")]
    if not found:
        return [Finding("tls-rpt", ADVICE, name, "no TLS-RPT record: senders cannot report TLS failures of "
                        "mail to the domain (RFC 8460 §3)", publish)]
    if len(found) > 1:
        return [Finding("tls-rpt", ADVICE, name, f"{len(found)} TLS-RPT records: senders then report nothing "
                        "(RFC 8460 §3); keep one", publish)]
    rua = parse_tags(found[0]).get("rua", "")
    if not all(u.strip().startswith(("mailto:", "https:")) for u in rua.split(",")) or not rua:
        return [Finding("tls-rpt", ADVICE, name, f"rua={rua!r}: must be mailto: or https: URIs (RFC 8460 §3)",
                        publish)]
    return [Finding("tls-rpt", OK, name, found[0])]
