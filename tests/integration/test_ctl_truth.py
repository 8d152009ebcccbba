"""What `volley ctl` tells an operator is what happened (issue 14): the queue's figures
add up and agree between views, reload, flush, mx and drain say what they did. Each
test runs a real `volley serve` and checks the printed figures against what the client
sent and was accepted (its queue ids), counted here independently."""

from __future__ import annotations

from typing import Any

from tests.integration.control_helpers import ctl, ctl_json
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import body, send_many

WAIT = 40.0


def _queued(server: Any, n_units: int) -> dict[str, Any]:
    """The status queue counts once the walk has seen `n_units` (the totals are cached)."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.update(ctl_json(server, "status")["queue"])
        return bool(seen.get("units") == n_units)

    wait_until(done, WAIT, f"status showing {n_units} units")
    return seen


# --- finding: the queue line counts suspended mail twice; by sender disagrees with by domain --


def test_queue_views_add_up_and_agree_with_the_queue(serve):
    server = serve()  # delivery off: every unit stays queued and ready
    ctl(server, "suspend", "held.test")
    # Ground truth, counted here: 6 messages to held.test, 5 with 2 recipients there (11
    # recipients, 6 (message, domain) units), from two senders; 2 more to free.test.
    held = [([f"a{i}@held.test", f"b{i}@held.test"] if i else [f"a{i}@held.test"], body(f"h{i}"))
            for i in range(6)]
    ids = send_many(server.port, held[:3], sender="one@home.test")
    ids += send_many(server.port, held[3:], sender="two@home.test")
    ids += send_many(server.port, [([f"c{i}@free.test"], body(f"f{i}")) for i in range(2)],
                     sender="one@home.test")
    assert len(set(ids)) == 8
    units, held_units = 8, 6

    q = _queued(server, units)
    assert (q["messages"], q["ready"], q["deferred"], q["suspended"]) == (8, 2, 0, held_units)
    line = next(ln for ln in ctl(server, "status").stdout.splitlines() if ln.startswith("queue"))
    assert "8 delivery units" in line and "2 ready, 0 deferred, 6 suspended" in line, line

    by_domain = ctl_json(server, "queue", "--by", "domain")
    by_sender = ctl_json(server, "queue", "--by", "sender")
    by_age = ctl_json(server, "queue", "--by", "age")
    want = {"units": units, "ready": 2, "deferred": 0, "suspended": held_units, "domains": 2}
    for view in (by_domain, by_sender, by_age):
        assert {k: view["totals"][k] for k in want} == want, view["by"]
        for row in view["rows"]:
            assert row["ready"] + row["deferred"] + row.get("suspended", 0) == row["total"], row
    assert by_sender["totals"]["messages"] == 8
    domains = {r["key"]: r for r in by_domain["rows"]}
    assert (domains["held.test"]["total"], domains["held.test"]["state"]) == (held_units, "suspended")
    senders = {r["key"]: r for r in by_sender["rows"]}
    assert senders["two@home.test"] == {**senders["two@home.test"], "total": 3, "suspended": 3,
                                        "ready": 0, "state": "suspended"}
    assert (senders["one@home.test"]["total"], senders["one@home.test"]["suspended"],
            senders["one@home.test"]["ready"]) == (5, 3, 2)
    shown = ctl(server, "queue", "--by", "sender").stdout
    assert "8 delivery units in 2 domains: 2 ready, 0 deferred, 6 suspended" in shown, shown
