"""[[reactions]] fleet-wide (issue 16): a provider's "[TSS04]" seen by node A suspends
the provider on B and C too (they open no connection to it), and `ctl resume yahoo`
on B lifts it on every node. Three real `volley serve` nodes and a real redis-server;
the provider is a sink script counting sessions (tests/integration/test_reactions_serve.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.fleet_helpers import HONOURED, rcpt, reaction_provider, smtp, sock
from tests.integration.control_helpers import ask
from tests.integration.harness import ServeProcess, wait_until
from tests.integration.relay_helpers import SENDER, body, transact
from tests.integration.test_reactions_serve import SHAPING, Provider, outcomes

pytestmark = pytest.mark.timeout(240)
WAIT = 60.0


def send(node: ServeProcess, rcpts: list[str]) -> None:
    with smtp(node) as client:
        for r in rcpts:
            transact(client, SENDER, [r], body(r))


def reactions(node: ServeProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = ask(sock(node), {"cmd": "status"})["reactions"]
    return rows


def test_a_reaction_fired_on_a_holds_on_b_and_c_and_a_resume_lifts_it_everywhere(
        nodes: Any, peers: Any, dns_zone: Any) -> None:
    provider = Provider()
    sink, relay = reaction_provider(peers, dns_zone, provider)
    config = {**relay, "shaping": SHAPING, "reactions": [
        {"shaping": "yahoo", "text": r"\[TSS04\]", "action": "suspend", "duration": "1h"}]}
    a, b, c = nodes(3, config)
    send(a, ["u0@d0.test"])
    a.wait_for(lambda e: e.get("event") == "reaction_fired", WAIT)
    for n in (b, c):
        wait_until(lambda n=n: any(r["provider"] == "yahoo" and r["action"] == "suspend"
                                   for r in reactions(n)), HONOURED, "the reaction on B and C")
    before = provider.counts()
    # C has mail for the provider: held by the reaction from A, nothing reaches it.
    send(c, ["v1@d1.test", "v2@d2.test"])
    wait_until(lambda: {r["recipient"] for r in outcomes(c) if r["outcome"] == "deferred"
                        and "suspended by a reaction" in r["reply"]} >= {"v1@d1.test", "v2@d2.test"},
               WAIT, "C holds its mail")
    assert provider.counts() == before
    assert sum(1 for n in (b, c) for e in n.log if e.get("event") == "reaction_fired") == 0

    with provider.lock:
        provider.tss = False
    assert ask(sock(b), {"cmd": "resume", "domain": "yahoo"})["ok"]
    for n in (a, c):
        wait_until(lambda n=n: reactions(n) == [], HONOURED, "lifted on A and C")
    wait_until(lambda: len(sink.messages) == 3, WAIT, "every message delivered after the lift")


def test_a_hard_bounce_on_a_suppresses_on_c(nodes: Any, peers: Any, dns_zone: Any) -> None:
    """The automatic entry of a bounce (written in the outcome's transaction, in a
    worker of A) reaches C like an operator's."""
    provider = Provider()
    with provider.lock:
        provider.tss = False
        provider.refuse["gone@d0.test"] = "550 5.1.1 <gone@d0.test>: no such user"
    _, relay = reaction_provider(peers, dns_zone, provider)
    a, _, c = nodes(3, relay)
    assert rcpt(c, "gone@d0.test")[0] == 250
    send(a, ["gone@d0.test"])
    wait_until(lambda: any(r["recipient"] == "gone@d0.test" and r["outcome"] == "bounced"
                           for r in outcomes(a)), WAIT, "A's bounce")

    def refused_on_c() -> bool:
        code, text = rcpt(c, "gone@d0.test")
        return code == 550 and "suppressed (bounce)" in text

    wait_until(refused_on_c, HONOURED, "C refuses the bounced address")
    (entry,) = ask(sock(c), {"cmd": "suppress_list"})["entries"]
    assert entry["value"] == "gone@d0.test" and entry["source"].startswith("550 5.1.1")
