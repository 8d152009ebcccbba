"""Every metric family the server exports has a test that makes it move and checks it
against ground truth counted outside the server (issue 14's rule).

COVERAGE lists, per family, the tests that drive it. The first test reads the families
from the /metrics text of a real `volley serve` (and the tables of
engine/observe/metrics.py, for families exported only once there is data, such as the
campaign counters) and fails when one has no entry: a new family needs its test before
it ships. The second checks each entry: the test exists, names the family and asserts.
What each test compares the figure with is said beside it."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from engine.observe.metrics import BY_CLASS, COUNTERS, GAUGES, HISTOGRAMS
from tests.integration.control_helpers import ctl
from tests.integration.harness import REPO

TRUTH = "tests/integration/test_metrics_truth.py"
RELAY = "tests/integration/test_control_relay.py::test_suspend_holds_a_domain_while_others_flow_and_resume_releases"
REFUSED = f"{TRUTH}::test_refused_transactions_are_counted_as_the_client_saw_them"
DSNS = f"{TRUTH}::test_queued_dsns_are_counted_as_the_sender_domain_receives_them"
INBOUND = f"{TRUTH}::test_inbound_figures_and_supervisor_gauges_match_the_clients_and_the_queue"
DELIVERY = f"{TRUTH}::test_delivery_counters_match_the_sink_and_the_dns_server"
EXPIRED = f"{TRUTH}::test_expired_recipients_are_counted_as_their_reports_arrive"
CLASSES = "tests/integration/test_bounce_classes.py::test_classes_in_log_campaign_suppression_and_metrics"
CAMPAIGNS = "tests/integration/test_ctl_campaigns.py::test_metrics_show_the_top_campaigns_and_sum_the_rest"

COVERAGE: dict[str, list[str]] = {
    # the client's replies (250s, refusals) and connections it made
    "volley_messages_received_total": [
        REFUSED, "tests/integration/test_control_socket.py::test_metrics_parse_and_count_what_was_received"],
    "volley_transactions_rejected_total": [REFUSED],
    "volley_connections_in_total": [INBOUND],
    "volley_sessions_in": [INBOUND],
    # the queue's records (ctl list: ids, sizes, domains)
    "volley_received_bytes_total": [INBOUND],
    "volley_queue_messages": [INBOUND],
    "volley_queue_units": [INBOUND],
    "volley_queue_bytes": [INBOUND],
    # the suspensions and the worker the test made and killed, the time it watched
    "volley_domains_suspended": [INBOUND],
    "volley_workers": [INBOUND],
    "volley_worker_restarts_total": [INBOUND],
    "volley_uptime_seconds": [INBOUND],
    # the sink's own counts (messages, bytes, connections, scripted replies, live sessions)
    "volley_messages_delivered_total": [DELIVERY, RELAY],
    "volley_messages_deferred_total": [DELIVERY, EXPIRED],
    "volley_sent_bytes_total": [DELIVERY],
    "volley_connections_out_total": [DELIVERY, RELAY],
    "volley_sessions_out": [DELIVERY],
    "volley_delivery_latency_seconds": [RELAY],
    "volley_queue_time_seconds": [RELAY],
    # the loopback DNS server's query counts
    "volley_dns_lookups_total": [DELIVERY],
    "volley_dns_cache_hits_total": [DELIVERY],
    "volley_dns_shared_answers_total": [
        "tests/integration/test_relay_process.py::test_a_domain_is_looked_up_once_for_both_workers"],
    # the peer node's own queue and received count (drain --to)
    "volley_messages_handed_over_total": [
        "tests/integration/test_drain_to.py::test_drain_to_hands_the_queue_over_with_its_history"],
    # reports that reached the sender's domain (null sender) and the recipients refused
    "volley_dsns_queued_total": [DSNS, EXPIRED],
    "volley_messages_bounced_total": [DSNS, EXPIRED],
    "volley_messages_expired_total": [EXPIRED],
    # the scripted replies by class, the campaign's recipients, the suppression list
    "volley_bounces_total": [CLASSES],
    "volley_deferrals_total": [CLASSES],
    "volley_campaign_messages_total": [CAMPAIGNS],
    "volley_suppression_entries": [CAMPAIGNS],
    # the changes the test made while Redis was down (issue 16)
    "volley_cluster_suppression_outbox": [
        "tests/cluster/test_cluster_data.py::test_suppression_added_while_redis_is_down_reaches_the_others"],
    # Redis killed and restarted by the test (issue 16)
    "volley_cluster_degraded": [
        "tests/cluster/test_degraded.py::test_redis_down_keeps_delivering_on_local_shares_and_recovers"],
}

_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)


def table_families() -> set[str]:
    return ({name for _, name, _ in COUNTERS} | {name for _, name, _ in BY_CLASS}
            | {name for _, name, _, _ in HISTOGRAMS} | set(GAUGES))


def test_every_exported_family_has_a_test_that_moves_it(serve):
    server = serve()
    text = ctl(server, "metrics").stdout
    exported = set(_TYPE.findall(text))
    names = {name for name, _ in exported}
    assert "volley_messages_received_total" in names, text[:500]  # the text was read
    families = names | table_families()
    missing = sorted(families - set(COVERAGE))
    assert not missing, f"metric families without a test that moves them (add to COVERAGE): {missing}"
    stale = sorted(set(COVERAGE) - families)
    assert not stale, f"COVERAGE lists families nobody exports: {stale}"


@cache
def _tests_in(path: str) -> dict[str, str]:
    """test function name -> its source, for one test file."""
    source = (REPO / path).read_text()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) or ""
            for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_each_listed_test_exists_names_its_family_and_asserts():
    problems = []
    for family, tests in COVERAGE.items():
        assert tests, f"{family}: no test listed"
        # Prometheus' parsers name a counter's family without _total: either spelling.
        spellings = (family, family.removesuffix("_total"))
        for test in tests:
            path, _, name = test.partition("::")
            if not (Path(REPO) / path).is_file():
                problems.append(f"{family}: {path} does not exist")
                continue
            body = _tests_in(path).get(name)
            if body is None:
                problems.append(f"{family}: no test {name} in {path}")
            elif not any(s in body for s in spellings):
                problems.append(f"{family}: {test} never names it")
            elif "assert" not in body and "wait_until(" not in body:
                problems.append(f"{family}: {test} checks nothing")
    assert not problems, "\n".join(problems)
