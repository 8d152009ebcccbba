"""Bounce rules: real replies from the big receivers land in the right class, an
operator's rules come first, and a bad rules file is refused naming the file and rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, from_dict
from engine.config.bounces import BOUNCE_CLASSES
from engine.mail import bounce_class
from engine.mail.bounce_rules import (
    BounceRulesError,
    Classifier,
    classifier,
    load_rules,
    parse_rules,
    shipped_classifier,
    shipped_rules,
)
from engine.observe.metrics import WorkerMetrics, render
from engine.supervisor.startup import check_startup

# (code, enhanced, text, class): replies as receivers send them (ids and addresses
# changed), and the local replies Volley makes itself.
REPLIES = [
    # Gmail
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try "
     "double-checking the recipient's email address for typos or unnecessary spaces. For more "
     "information, go to https://support.google.com/mail/?p=NoSuchUser 41be03b00d2f7-b7f3fb7c5"
     "a5si1234pgb.12 - gsmtp", "bad_mailbox"),
    (550, "5.2.1", "The email account that you tried to reach is inactive. For more information,"
     " go to https://support.google.com/mail/?p=DisabledUser - gsmtp", "inactive_mailbox"),
    (550, "5.2.1", "The email account that you tried to reach is disabled. - gsmtp",
     "inactive_mailbox"),
    (452, "4.2.2", "The recipient's inbox is out of storage space. Please direct the recipient "
     "to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp", "quota"),
    (552, "5.2.2", "The email account that you tried to reach is over quota. - gsmtp", "quota"),
    (550, "5.7.26", "Unauthenticated email from example.com is not accepted due to domain's "
     "DMARC policy. Please contact the administrator of example.com domain. - gsmtp", "auth"),
    (550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail "
     "requires all senders to authenticate with either SPF or DKIM. - gsmtp", "auth"),
    (550, "5.7.25", "The IP address sending this message does not have a PTR record setup, or "
     "the corresponding forward DNS entry does not point to the sending IP. - gsmtp", "auth"),
    (421, "4.7.0", "[192.0.2.1] Our system has detected that this message is suspicious due to "
     "the very low reputation of the sending IP address. To protect our users from spam, mail "
     "sent from your IP address has been temporarily rate limited. - gsmtp", "reputation"),
    (550, "5.7.1", "[192.0.2.1] Our system has detected that this message is likely "
     "unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been "
     "blocked. - gsmtp", "spam_block"),
    (450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents"
     " additional messages from being delivered. - gsmtp", "rate_limited"),
    (530, "5.7.0", "Must issue a STARTTLS command first. - gsmtp", "tls"),
    (421, "4.7.0", "Try again later, closing connection. (EHLO) - gsmtp", "transient"),
    # Microsoft (Outlook.com, Exchange Online)
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your "
     "Internet service provider since part of their network is on our block list (S3150).",
     "reputation"),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]. To request removal from "
     "this list please visit https://sender.office.com/", "reputation"),
    (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     "bad_mailbox"),
    (550, "5.5.0", "Requested action not taken: mailbox unavailable", "bad_mailbox"),
    (451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due to IP "
     "reputation.", "reputation"),
    (451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77719)",
     "rate_limited"),
    (550, "5.7.509", "Access denied, sending domain example.com does not pass DMARC "
     "verification and has a DMARC policy of reject.", "auth"),
    # Yahoo / AOL
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
     "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
     "reputation"),
    (554, "5.7.9", "Message not accepted for policy reasons.  See "
     "https://postmaster.yahooinc.com/error-codes", "policy"),
    (552, "", "1 Requested mail action aborted, mailbox not found", "bad_mailbox"),
    (554, "", "30 Sorry, your message to someone@yahoo.com cannot be delivered. This mailbox is"
     " disabled (554.30)", "inactive_mailbox"),
    # Comcast, Spamhaus, Barracuda
    (554, "5.7.1", "192.0.2.1 found on one or more DNSBLs, see "
     "http://postmaster.comcast.net/smtp-error-codes.php#BL000010", "reputation"),
    (554, "5.7.1", "Comcast block for spam. Please see "
     "http://postmaster.comcast.net/smtp-error-codes.php#RP-001", "reputation"),
    (554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org;"
     " https://www.spamhaus.org/query/ip/192.0.2.1", "reputation"),
    (550, "5.1.1", "Service unavailable; Client host [192.0.2.1] blocked using "
     "Barracuda Reputation", "reputation"),  # the text beats a misleading 5.1.1
    # Postfix, Exim and others
    (550, "5.1.1", "<nobody@example.net>: Recipient address rejected: User unknown in virtual "
     "mailbox table", "bad_mailbox"),
    (550, "", "Unrouteable address", "bad_mailbox"),
    (554, "5.7.1", "<x@example.net>: Relay access denied", "policy"),
    (450, "4.7.1", "<x@example.net>: Recipient address rejected: Greylisted, see "
     "http://postgrey.schweikert.ch/", "transient"),
    (552, "5.2.2", "Quota exceeded (mailbox for user is full)", "quota"),
    (554, "5.7.1", "Message rejected as spam by Content Filtering.", "spam_block"),
    (500, "5.5.1", "Command unrecognized", "protocol"),
    (535, "5.7.8", "Error: authentication failed: authentication failure", "auth"),
    # Volley's own replies (engine/dns/mx.py, engine/delivery/outcome.py, dialogue.py)
    (550, "5.1.2", "Domain example.invalid does not exist (DNS NXDOMAIN)", "dns"),
    (556, "5.1.10", "Recipient address has null MX (example.net accepts no mail, RFC 7505)",
     "dns"),
    (451, "4.4.3", "DNS lookup for example.net failed (SERVFAIL), will retry", "dns"),
    (451, "4.4.4", "Unable to find a usable mail exchanger for example.net", "dns"),
    (454, "4.7.5", "TLS handshake with mx.example.net failed", "tls"),
    (454, "4.7.0", "authentication as bob failed: 535 5.7.8 no", "auth"),
    (421, "4.4.1", "connection to 192.0.2.1:25 refused", "transient"),
    (451, "4.5.0", "Malformed reply from remote server", "protocol"),
    (554, "5.4.7", "delivery time expired; last reply: 421 4.7.0 [TSS04] Messages from x "
     "temporarily deferred", "expired"),
    # Nothing known: by code
    (550, "", "go away", "other"),
    (451, "", "local problem", "transient"),
]


@pytest.mark.parametrize(("code", "enhanced", "text", "cls"), REPLIES,
                         ids=[f"{c} {e} {t[:30]}" for c, e, t, _ in REPLIES])
def test_real_replies_are_classified(code: int, enhanced: str, text: str, cls: str) -> None:
    assert shipped_classifier().classify(code, enhanced, text) == cls


def test_shipped_rules_are_valid_lower_case_and_end_in_catch_alls() -> None:
    rules = shipped_rules()
    assert len(rules) > 40
    assert all(r.cls in BOUNCE_CLASSES for r in rules)
    assert all(r.text is None or (r.folded and r.text.pattern == r.text.pattern.lower())
               for r in rules)
    # the last two catch every 4xx and 5xx: nothing reaches the built-in fallback
    assert [(r.code.pattern if r.code else "", r.cls) for r in rules[-2:]] == [
        (r"4\d\d", "transient"), (r"5\d\d", "other")]


def test_text_is_case_insensitive_for_every_rule(tmp_path: Path) -> None:
    shouted = "THE EMAIL ACCOUNT THAT YOU TRIED TO REACH DOES NOT EXIST."
    assert shipped_classifier().classify(550, "5.0.0", shouted) == "bad_mailbox"
    f = tmp_path / "r.toml"
    f.write_text('[[rule]]\ntext = "Custom Block"\nclass = "reputation"\n')
    assert classifier(str(f)).classify(550, "5.1.1", "a CUSTOM block here") == "reputation"


def test_operator_rules_come_before_the_shipped_ones(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        '# our smarthost says "mailbox unavailable" when it throttles us\n'
        '[[rule]]\ncode = "550"\nenhanced = "5.5."\ntext = "mailbox unavailable"\n'
        'class = "rate_limited"\n'
        '[[rule]]\nenhanced = "x.7.1"\ntext = "\\\\(X-\\\\d+\\\\)"\nclass = "policy"\n')
    mine = classifier(str(f))
    assert mine.classify(550, "5.5.0", "Requested action not taken: mailbox unavailable") == \
        "rate_limited"
    assert shipped_classifier().classify(550, "5.5.0", "mailbox unavailable") == "bad_mailbox"
    # an "x" class digit matches 4 and 5; the rule applies only where all it names match
    assert mine.classify(451, "4.7.1", "later (X-12)") == "policy"
    assert mine.classify(451, "4.7.1", "later") == "transient"
    # everything else still falls through to the shipped rules
    assert mine.classify(550, "5.1.1", "no such user") == "bad_mailbox"


def test_code_and_enhanced_forms() -> None:
    rules = parse_rules('[[rule]]\ncode = "55x"\nclass = "quota"\n'
                        '[[rule]]\ncode = 421\nclass = "rate_limited"\n'
                        '[[rule]]\nenhanced = "5.1."\nclass = "bad_mailbox"\n'
                        '[[rule]]\nenhanced = "4.4.1"\nclass = "dns"\n', "t.toml")
    c = Classifier(rules)
    assert c.classify(552, "", "") == "quota"
    assert c.classify(421, "4.7.0", "") == "rate_limited"
    assert c.classify(501, "5.1.3", "") == "bad_mailbox"
    assert c.classify(451, "4.4.1", "") == "dns"
    assert c.classify(451, "4.4.10", "") == "transient"  # exact: not a prefix of 4.4.10
    assert c.classify(501, "5.10.1", "") == "other"  # "5.1." is not a prefix of "5.10.1"


@pytest.mark.parametrize(("body", "error"), [
    ('[[rule]]\nclass = "quota"\n', "rule[0]: name at least one of code, enhanced, text"),
    ('[[rule]]\ncode = "550"\n', "rule[0]: class is missing"),
    ('[[rule]]\ncode = "550"\nclass = "quota"\n[[rule]]\ncode = "5xx"\nclass = "mailbox"\n',
     "rule[1].class: expected one of bad_mailbox"),
    ('[[rule]]\ntext = "(unclosed"\nclass = "quota"\n',
     "rule[0].text: bad regular expression: missing ), unterminated subpattern"),
    ('[[rule]]\ncode = "5.1.1"\nclass = "quota"\n', "rule[0].code: expected a reply code"),
    ('[[rule]]\nenhanced = "5.1"\nclass = "quota"\n', "rule[0].enhanced: expected an enhanced"),
    ('[[rule]]\ntext = "x"\nclas = "quota"\n', 'rule[0]: unknown key "clas"'),
    ('[[rules]]\ntext = "x"\nclass = "quota"\n', 'unknown key "rules" (expected [[rule]]'),
    ('[[rule]\n', "not valid TOML"),
])
def test_bad_rules_file_names_the_file_and_the_rule(tmp_path: Path, body: str, error: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(BounceRulesError) as exc:
        load_rules(str(f))
    assert str(exc.value).startswith(f"{f}: ")
    assert error in str(exc.value)


def test_startup_check_refuses_a_bad_or_missing_rules_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[[rule]]\ncode = "550"\nclass = "quota"\n[[rule]]\ntext = "a["\nclass = "tls"\n')
    cfg = from_dict({"bounces": {"rules_file": str(f)}})
    with pytest.raises(ConfigError, match=rf"^bounces.rules_file: {f}: rule\[1\].text: bad "):
        check_startup(cfg)
    missing = from_dict({"bounces": {"rules_file": str(tmp_path / "nope.toml")}})
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read: No such file"):
        check_startup(missing)
    f.write_text('[[rule]]\ntext = "a"\nclass = "tls"\n')
    check_startup(cfg)  # fixed: passes


def test_suppress_classes_are_checked_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r'bounces.suppress_classes\[1\]: unknown class "gone"'):
        from_dict({"bounces": {"suppress_classes": ["bad_mailbox", "gone"]}})


def test_policy_follows_the_config(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('[[rule]]\ntext = "moved away"\nclass = "bad_mailbox"\n')
    cfg = from_dict({"bounces": {"rules_file": str(f), "suppress_classes": ["bad_mailbox"]}})
    policy = bounce_class.policy_for(cfg)
    assert policy is bounce_class.policy_for(cfg)  # compiled once per configuration
    assert policy.classify(550, "", "user moved away") == "bad_mailbox"
    assert policy.suppresses("bad_mailbox") and not policy.suppresses("inactive_mailbox")
    off = from_dict({"suppression": {"auto_bounce": False}})
    assert not bounce_class.policy_for(off).suppresses("bad_mailbox")
    # a file broken after the startup check: the shipped rules stay in force
    f.write_text("not toml [")
    broken = bounce_class.policy_for(from_dict({"bounces": {"rules_file": str(f)}}))
    assert broken.classify(550, "", "user moved away") == "other"


def test_by_class_counters_merge_and_render() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.count_class("bounced", "bad_mailbox")
    a.count_class("bounced", "bad_mailbox")
    b.count_class("bounced", "reputation")
    b.count_class("deferred", "rate_limited")
    total = WorkerMetrics.merge([a.snapshot(), b.snapshot()])
    assert total["by_class"] == {"bounced": {"bad_mailbox": 2, "reputation": 1},
                                 "deferred": {"rate_limited": 1}}
    text = render(total, [])
    assert 'volley_bounces_total{class="bad_mailbox"} 2' in text
    assert 'volley_bounces_total{class="reputation"} 1' in text
    assert 'volley_deferrals_total{class="rate_limited"} 1' in text
    # an old snapshot without the family still merges
    assert WorkerMetrics.merge([{"counters": {}}])["by_class"] == {"bounced": {}, "deferred": {}}
