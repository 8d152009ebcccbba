"""Bounce classes on the delivery path: every delivery-log line carries the class of its
reply, the campaign counts bounces by class, the mailbox classes suppress (beside
suppression.codes), an operator's rules file comes first, and the by-class metric
families add up to the refusals the sink gave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.observe.metrics import render
from tests.integration.harness import InboundServer
from tests.integration.relay_helpers import (
    Counter,
    Lab,
    lab,  # noqa: F401  (fixture)
    rcpt_of,
)
from tests.integration.test_campaign_outcomes import ZONE, counts, queue_campaign_mail

# What the sink answers at RCPT: always, or (the 4xx ones) the first time only.
REFUSALS = {
    "gone": "550 5.1.1 The email account that you tried to reach does not exist.",
    # Outlook's wording for a missing mailbox, under a code not in suppression.codes:
    # only its class (bad_mailbox) suppresses it.
    "unavailable": "550 5.5.0 Requested action not taken: mailbox unavailable",
    "blocked": "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
               "zen.spamhaus.org",
    "full": "452 4.2.2 The recipient's inbox is out of storage space.",
    "slow": "450 4.7.0 custom throttle, come back soon",  # the operator's rule: rate_limited
}
EXPECTED = {  # recipient -> (outcome, class) of its last delivery-log line
    "gone": ("bounced", "bad_mailbox"), "unavailable": ("bounced", "bad_mailbox"),
    "blocked": ("bounced", "reputation"), "full": ("delivered", ""),
    "slow": ("delivered", ""), "ok": ("delivered", ""),
}


def _start(lab: Lab, tmp_path: Path, refused: Counter, bounces: dict[str, Any]) -> InboundServer:
    rules = tmp_path / "rules.toml"
    rules.write_text('# our own smarthost\'s wording\n'
                     '[[rule]]\ncode = "4xx"\ntext = "custom throttle"\nclass = "rate_limited"\n')

    def script(verb: str, arg: str) -> str | None:
        if verb != "RCPT":
            return None
        local = rcpt_of(arg).partition("@")[0]
        reply = REFUSALS.get(local)
        if reply is None or (reply[0] == "4" and refused.get(local) >= 1):
            return None
        refused.bump(local)
        refused.bump("*")
        return reply

    lab.sink("127.0.0.2", script=script)
    lab.home_sink()
    lab.zone(ZONE)
    return lab.start({"delivery": {"retry": "1s"},
                      "bounces": {"rules_file": str(rules), **bounces}})


def _send_all(lab: Lab, server: InboundServer) -> None:
    queue_campaign_mail(server, [f"{r}@dest.test" for r in EXPECTED], campaign="c", tenant="t")
    lab.wait_queue_empty()
    # the queue empties when the last outcome commits; its log line follows
    lab.wait_log(lambda e: e["outcome"] == "delivered" and e["recipient"].endswith("dest.test"),
                 count=3)


def _suppressed(server: InboundServer, local: str) -> bool:
    return server.call(lambda: server.store.suppressed(f"{local}@dest.test", "")) is not None


def test_classes_in_log_campaign_suppression_and_metrics(lab: Lab, tmp_path: Path):
    refused = Counter()
    server = _start(lab, tmp_path, refused, {})
    _send_all(lab, server)

    lines = [e for e in lab.log() if e["recipient"].endswith("@dest.test")]
    assert all("class" in e for e in lab.log())
    last = {e["recipient"].partition("@")[0]: (e["outcome"], e["class"]) for e in lines}
    assert last == EXPECTED
    deferrals = {(e["recipient"].partition("@")[0], e["class"])
                 for e in lines if e["outcome"] == "deferred"}
    assert deferrals == {("full", "quota"), ("slow", "rate_limited")}

    c = counts(server, "c", "t")
    assert (c.delivered, c.deferred, c.bounced) == (3, 2, 3)
    assert c.bounced_by_class == {"bad_mailbox": 2, "reputation": 1}

    # gone: by its code (5.1.1) and class; unavailable: by its class alone; a reputation
    # block says nothing about the mailbox.
    assert _suppressed(server, "gone") and _suppressed(server, "unavailable")
    assert not _suppressed(server, "blocked")
    assert "5.5.0" in server.call(lambda: server.store.suppressed("unavailable@dest.test")).source

    text = server.call(lambda: render(server.runtime.metrics.snapshot(), []))
    samples = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("volley_bounces_total{", "volley_deferrals_total{"))}
    assert samples == {
        'volley_bounces_total{class="bad_mailbox"}': 2,
        'volley_bounces_total{class="reputation"}': 1,
        'volley_deferrals_total{class="quota"}': 1,
        'volley_deferrals_total{class="rate_limited"}': 1,
    }
    assert sum(samples.values()) == refused.get("*") == 5  # every refusal the sink gave


def test_without_mailbox_classes_only_the_codes_suppress(lab: Lab, tmp_path: Path):
    server = _start(lab, tmp_path, Counter(), {"suppress_classes": []})
    _send_all(lab, server)
    assert _suppressed(server, "gone")  # 5.1.1 is in suppression.codes
    assert not _suppressed(server, "unavailable") and not _suppressed(server, "blocked")
    assert counts(server, "c", "t").bounced_by_class == {"bad_mailbox": 2, "reputation": 1}
