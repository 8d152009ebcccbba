"""The doctor's SPF evaluator (RFC 7208) over plain answer tables: no DNS, no I/O."""

from __future__ import annotations

import pytest

from engine.doctor.answers import Answer, Answers, Missing, Status
from engine.doctor.spf import check_host, walk
from engine.doctor.spf_terms import MacroContext, SpfSyntax, expand, parse_record, suggest

D = "example.com"


def spf(record: str) -> Answers:
    return Answers.of({D: {"TXT": [record, "other=text"]}})


def result(answers: Answers, ip: str, domain: str = D) -> str:
    return check_host(answers, ip, domain).result


# --- terms --------------------------------------------------------------------------


def test_parse_record_terms() -> None:
    terms = parse_record("v=spf1 ip4:192.0.2.0/24 -a:mail.example.com/28//64 ~mx ?include:x.example "
                         "exists:%{i}.x.example redirect=y.example exp=e.example unknown=kept")
    assert [(t.qualifier, t.name, t.value, t.cidr4, t.cidr6) for t in terms] == [
        ("+", "ip4", "192.0.2.0", 24, None), ("-", "a", "mail.example.com", 28, 64), ("~", "mx", "", None, None),
        ("?", "include", "x.example", None, None), ("+", "exists", "%{i}.x.example", None, None),
        ("", "redirect", "y.example", None, None), ("", "exp", "e.example", None, None),
        ("", "unknown", "kept", None, None)]


@pytest.mark.parametrize("record, words", [
    ("v=spf1 ipv4:192.0.2.1 -all", "unknown mechanism"),
    ("v=spf1 ip4:2001:db8::1 -all", "not an IPv4 address"),
    ("v=spf1 ip4:192.0.2.0/33", "bad prefix length"),
    ("v=spf1 include -all", "needs a domain"),
    ("v=spf1 a: -all", "empty domain"),
    ("v=spf1 redirect=a.example redirect=b.example", "more than once"),
    ("v=spf1 exists:%{x}.example", "macro letter"),
    ("v=spf1 exists:50%.example", "malformed macro"),
    ("v=spf1 -all:foo", "takes no argument"),
    ("spf1 -all", 'start with "v=spf1"'),
])
def test_syntax_errors(record: str, words: str) -> None:
    with pytest.raises(SpfSyntax, match=words):
        parse_record(record)


@pytest.mark.parametrize("spec, want", [
    # RFC 7208 §7.4, sender strong-bad@email.example.com, 192.0.2.3.
    ("%{s}", "strong-bad@email.example.com"), ("%{o}", "email.example.com"), ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"), ("%{d3}", "email.example.com"), ("%{d2}", "example.com"),
    ("%{d1}", "com"), ("%{dr}", "com.example.email"), ("%{d2r}", "example.email"), ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"), ("%{lr}", "strong-bad"), ("%{lr-}", "bad.strong"), ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
])
def test_macro_examples_of_rfc_7208(spec: str, want: str) -> None:
    ctx = MacroContext("192.0.2.3", "strong-bad@email.example.com", "mx.example.org", "email.example.com")
    assert expand(spec, ctx) == want


def test_macro_ipv6() -> None:
    ctx = MacroContext("2001:db8::cb01", "strong-bad@email.example.com", "h.example", "email.example.com")
    assert expand("%{ir}.%{v}._spf.%{d2}", ctx) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


def test_suggest_merges_and_adds_missing_addresses() -> None:
    assert suggest([], ["192.0.2.1", "2001:db8::1"]) == "v=spf1 ip4:192.0.2.1 ip6:2001:db8::1 ~all"
    assert suggest(["v=spf1 mx -all", "v=spf1 include:x.example ~all"], ["192.0.2.1"]) == (
        "v=spf1 ip4:192.0.2.1 mx include:x.example -all")
    assert suggest(["v=spf1 ip4:192.0.2.1 redirect=_spf.example.com"], ["192.0.2.1"]) == (
        "v=spf1 ip4:192.0.2.1 redirect=_spf.example.com")
    assert suggest(["v=spf1 bogus:x mx -all"], ["192.0.2.9"]) == "v=spf1 ip4:192.0.2.9 mx -all"


# --- evaluation ------------------------------------------------------------------------


def test_qualifiers_and_the_default() -> None:
    assert result(spf("v=spf1 ip4:192.0.2.0/24 -all"), "192.0.2.77") == "pass"
    assert result(spf("v=spf1 ip4:192.0.2.0/24 -all"), "192.0.3.1") == "fail"
    assert result(spf("v=spf1 ip4:192.0.2.0/24 ~all"), "192.0.3.1") == "softfail"
    assert result(spf("v=spf1 ip4:192.0.2.0/24 ?all"), "192.0.3.1") == "neutral"
    assert result(spf("v=spf1 ip4:192.0.2.0/24"), "192.0.3.1") == "neutral"
    assert result(spf("v=spf1 ip6:2001:db8::/32 -all"), "2001:db8:1::5") == "pass"
    assert result(spf("v=spf1 ip6:2001:db8::/32 -all"), "192.0.2.1") == "fail"  # ip6 never matches IPv4
    assert result(Answers.of({D: {"TXT": ["hello"]}}), "192.0.2.1") == "none"
    assert result(Answers.of({}), "192.0.2.1") == "none"


def test_a_and_mx_with_dual_cidr() -> None:
    answers = Answers.of({
        D: {"TXT": ["v=spf1 a/24 mx:mx.example.com//64 -all"], "A": ["192.0.2.1"]},
        "mx.example.com": {"MX": ["10 m1.example.com", "20 m2.example.com"]},
        "m2.example.com": {"AAAA": ["2001:db8::1"]},
    })
    assert result(answers, "192.0.2.200") == "pass"
    assert result(answers, "2001:db8::ffff") == "pass"
    assert result(answers, "2001:db9::1") == "fail"


def test_include_and_redirect() -> None:
    zone = {"inc.example.net": {"TXT": ["v=spf1 ip4:198.51.100.0/24 -all"]},
            "red.example.net": {"TXT": ["v=spf1 ip4:203.0.113.5 -all"]}}
    answers = Answers.of({D: {"TXT": ["v=spf1 include:inc.example.net redirect=red.example.net"]}, **zone})
    assert result(answers, "198.51.100.7") == "pass"
    assert result(answers, "203.0.113.5") == "pass"
    assert result(answers, "192.0.2.1") == "fail"  # the include's -all is only "no match"
    res = check_host(Answers.of({D: {"TXT": ["v=spf1 include:nothing.example.net -all"]}}), "192.0.2.1", D)
    assert res.result == "permerror" and "no SPF record at nothing.example.net" in res.reason
    res = check_host(Answers.of({D: {"TXT": ["v=spf1 redirect=nothing.example.net"]}}), "192.0.2.1", D)
    assert res.result == "permerror" and "redirect=nothing.example.net" in res.reason


def test_exists_with_macros_and_ptr() -> None:
    answers = Answers.of({
        D: {"TXT": ["v=spf1 exists:%{ir}.%{v}._spf.%{d} ptr -all"]},
        "1.2.0.192.in-addr._spf.example.com": {"A": ["127.0.0.2"]},
        "5.2.0.192.in-addr.arpa": {"PTR": ["out.example.com"]},
        "out.example.com": {"A": ["192.0.2.5"]},
        "6.2.0.192.in-addr.arpa": {"PTR": ["out.example.org"]},
        "out.example.org": {"A": ["192.0.2.6"]},
    })
    assert result(answers, "192.0.2.1") == "pass"  # exists
    assert result(answers, "192.0.2.5") == "pass"  # ptr under example.com, forward-confirmed
    assert result(answers, "192.0.2.6") == "fail"  # ptr outside the domain


def test_the_lookup_limit_counts_nested_terms() -> None:
    zone = {f"i{i}.example.net": {"TXT": [f"v=spf1 a:h{i}.example.net -all"]} for i in range(6)}
    for i in range(6):
        zone[f"h{i}.example.net"] = {"A": [f"198.51.100.{i}"]}
    includes = " ".join(f"include:i{i}.example.net" for i in range(6))
    answers = Answers.of({D: {"TXT": [f"v=spf1 {includes} -all"]}, **zone})
    ok = check_host(answers, "198.51.100.4", D)
    assert (ok.result, ok.lookups) == ("pass", 10)  # 5 includes and their a:, then the 5th include's a
    over = check_host(answers, "198.51.100.5", D)
    assert over.result == "permerror" and "more than 10 DNS lookups" in over.reason
    tree = walk(answers, D)
    assert tree.lookups == 12 and not tree.error


def test_void_lookups_limit() -> None:
    answers = spf("v=spf1 a:n1.example.net a:n2.example.net a:n3.example.net -all")
    res = check_host(answers, "192.0.2.1", D)
    assert res.result == "permerror" and "void lookups" in res.reason and res.void_lookups == 3
    assert result(spf("v=spf1 a:n1.example.net a:n2.example.net -all"), "192.0.2.1") == "fail"


def test_mx_with_more_than_ten_hosts_is_permerror() -> None:
    answers = Answers.of({D: {"TXT": ["v=spf1 mx -all"], "MX": [f"{i} m{i}.example.com" for i in range(11)]}})
    res = check_host(answers, "192.0.2.1", D)
    assert res.result == "permerror" and "11 MX hosts" in res.reason


def test_include_loop_is_permerror() -> None:
    answers = spf("v=spf1 include:example.com -all")
    assert result(answers, "192.0.2.1") == "permerror"
    assert "include loop" in walk(answers, D).error


def test_two_records_and_dns_failures() -> None:
    two = Answers.of({D: {"TXT": ["v=spf1 -all", "v=spf1 +all"]}})
    assert result(two, "192.0.2.1") == "permerror"
    failing = Answers({(D, "TXT"): Answer(Status.OK, ("v=spf1 include:x.example.net -all",)),
                       ("x.example.net", "TXT"): Answer(Status.SERVFAIL)})
    res = check_host(failing, "192.0.2.1", D)
    assert res.result == "temperror" and "servfail" in res.reason
    assert walk(failing, D).temporary


def test_missing_answers_are_asked_for_with_hints() -> None:
    answers = Answers({(D, "TXT"): Answer(Status.OK, ("v=spf1 include:a.example.net include:b.example.net -all",))})
    with pytest.raises(Missing) as info:
        check_host(answers, "192.0.2.1", D)
    assert info.value.key == ("a.example.net", "TXT")
    assert answers.hints == {("a.example.net", "TXT"), ("b.example.net", "TXT")}
