"""Edge cases of the relay path: remote limits (SIZE, recipients per transaction,
messages per connection), NOTIFY=SUCCESS with and without a DSN-capable next hop,
one message for several domains, smarthost by name, stop and restart with mail
still queued."""

from __future__ import annotations

from pathlib import Path

from engine.lab.sink.protocol import NO_REPLY
from tests.integration.harness import InboundServer, merge, wait_until
from tests.integration.relay_helpers import (
    FAST,
    SENDER,
    Counter,
    Lab,
    body,
    check_dsn,
    dsns,
    lab,  # noqa: F401  (fixture)
    rcpt_of,
    send,
    send_many,
    tag_of,
)

ZONE = {
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.2"]},
}


def ehlo(*ext: str):
    lines = ["250-sink.test"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"]
    return "\r\n".join(lines)


def test_message_over_the_remote_size_limit_bounces_without_sending(lab: Lab):
    sink = lab.sink("127.0.0.2", script=lambda v, a: ehlo("PIPELINING", "8BITMIME", "SIZE 1000")
                    if v == "EHLO" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    pad = "X-Pad: " + "x" * 900 + "\r\n" + "X-Pad2: " + "y" * 900 + "\r\n"
    qid = lab.send(["bob@dest.test"], body("big", extra=pad))
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert line["outcome"] == "bounced" and line["enhanced"].startswith("5.3."), line
    lab.wait_sink(home, 1)
    check_dsn(dsns(home)[0], to=SENDER, recipients=["bob@dest.test"], status=line["enhanced"])
    assert not any(v == "MAIL" for v, _ in sink.commands)
    lab.wait_queue_empty()


def test_recipients_refused_for_too_many_are_retried(lab: Lab):
    per_tx = Counter()

    def script(verb: str, arg: str) -> str | None:
        if verb == "MAIL":
            per_tx.counts["n"] = 0
        if verb == "RCPT" and per_tx.bump("n") > 10:
            return "452 4.5.3 too many recipients"
        return None

    sink = lab.sink("127.0.0.2", script=script)
    lab.zone(ZONE)
    lab.start()
    rcpts = [f"r{i}@dest.test" for i in range(25)]
    lab.send(rcpts, body("many"))
    lab.wait_sink(sink, 3, timeout=15)
    got = [r for m in sink.messages for r in m.rcpt_tos]
    assert sorted(got) == sorted(rcpts), got
    assert [len(m.rcpt_tos) for m in sink.messages] == [10, 10, 5]
    lab.wait_queue_empty()


def test_max_messages_per_connection_retires_connections(lab: Lab):
    sink = lab.sink("127.0.0.2")
    lab.zone({**ZONE, "dest.test": {"delay": 1, "MX": [(10, "mx.dest.test")]}})
    server = lab.start({"delivery": {"max_messages_per_connection": 2,
                                     "max_connections_per_domain": 1}, "dns": {"timeout": "3s"}})
    send_many(server.port, [(["bob@dest.test"], body(f"mpc{i}")) for i in range(6)])
    lab.wait_sink(sink, 6)
    assert sink.connections == 3, sink.connections
    assert sink.max_live == 1
    assert [v for v, _ in sink.commands].count("QUIT") >= 2
    lab.wait_queue_empty()


def test_notify_success_without_remote_dsn_sends_a_relayed_report(lab: Lab):
    sink = lab.sink("127.0.0.2")  # no DSN extension
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    lab.send(["bob@dest.test"], body("relayed"), rcpt_params="NOTIFY=SUCCESS,FAILURE")
    lab.wait_sink(sink, 1)
    lab.wait_sink(home, 1)
    [report] = dsns(home)
    assert report.mail_from == "" and report.rcpt_tos == [SENDER]
    assert "Action: relayed" in report.status_text
    assert report.statuses == ["2.0.0"], report.status_text
    assert report.final_recipients == ["bob@dest.test"]
    assert not any("NOTIFY" in a for v, a in sink.commands if v == "RCPT")
    lab.wait_queue_empty()


def test_notify_success_passes_on_to_a_dsn_capable_next_hop(lab: Lab):
    sink = lab.sink("127.0.0.2", script=lambda v, a: ehlo("PIPELINING", "8BITMIME", "DSN")
                    if v == "EHLO" else None)
    home = lab.home_sink()
    lab.zone(ZONE)
    lab.start()
    qid = lab.send(["bob@dest.test"], body("passon"), mail_params="RET=HDRS ENVID=e1",
                   rcpt_params="NOTIFY=SUCCESS ORCPT=rfc822;bob@dest.test")
    lab.wait_sink(sink, 1)
    rcpt_args = [a for v, a in sink.commands if v == "RCPT"]
    assert "NOTIFY=SUCCESS" in rcpt_args[0] and "ORCPT=rfc822;bob@dest.test" in rcpt_args[0]
    mail_args = [a for v, a in sink.commands if v == "MAIL"]
    assert "RET=HDRS" in mail_args[0] and "ENVID=e1" in mail_args[0]
    lab.wait_log(lambda e: e["id"] == qid and e["outcome"] == "delivered")
    lab.wait_queue_empty()
    assert not home.messages and home.connections == 0


def test_one_message_for_several_domains(lab: Lab):
    tries = Counter()

    def b_script(verb: str, arg: str) -> str | None:
        if verb == "RCPT" and tries.bump(rcpt_of(arg)) == 1:
            return "450 4.2.1 try again"
        return None

    a = lab.sink("127.0.0.2")
    b = lab.sink("127.0.0.3", script=b_script)
    home = lab.home_sink()
    lab.zone({
        "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": ["127.0.0.2"]},
        "b.test": {"MX": [(10, "mx.b.test")]}, "mx.b.test": {"A": ["127.0.0.3"]},
    })
    lab.start()
    qid = lab.send(["x@a.test", "y@b.test", "z@gone.test", "w@a.test"], body("multi"))
    lab.wait_sink(b, 1)
    lab.wait_sink(home, 1)
    lab.wait_queue_empty()
    assert [m.rcpt_tos for m in a.messages] == [["x@a.test", "w@a.test"]]
    assert [m.rcpt_tos for m in b.messages] == [["y@b.test"]]
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["z@gone.test"], status="5.1.2")
    outcomes = sorted((e["recipient"], e["outcome"], e["attempt"]) for e in
                      lab.wait_log(lambda e: e["id"] == qid, 5))
    assert outcomes == [("w@a.test", "delivered", 1), ("x@a.test", "delivered", 1),
                        ("y@b.test", "deferred", 1), ("y@b.test", "delivered", 2),
                        ("z@gone.test", "bounced", 1)]


def test_smarthost_given_by_name(lab: Lab):
    smart = lab.sink("127.0.0.4")
    dns = lab.zone({"relay.smart.test": {"A": ["127.0.0.4"]}})
    lab.start({"routes": [{"domain": "*.far.test", "host": f"relay.smart.test:{lab.port}"}]})
    lab.send(["bob@deep.far.test"], body("byname"))
    lab.wait_sink(smart, 1)
    assert dns.count("deep.far.test", "MX") == 0
    assert dns.count("relay.smart.test", "A") >= 1
    lab.wait_queue_empty()


def _server(tmp: Path, dns_port: int, sink_port: int, extra: dict | None = None) -> InboundServer:
    overrides = merge(FAST, {"dns": {"nameservers": [f"127.0.0.1:{dns_port}"]},
                             "delivery": {"port": sink_port}})
    return InboundServer(tmp, merge(overrides, extra or {}))


def test_stop_with_a_hung_delivery_keeps_the_message_and_restart_delivers(lab: Lab, tmp_path):
    hang = [True]
    sink = lab.sink("127.0.0.2", script=lambda v, a: NO_REPLY if v == "DATA" and hang[0] else None)
    dns = lab.zone(ZONE)
    server = _server(tmp_path / "srv", dns.port, lab.port)
    stopped = False
    try:
        qid = send(server.port, ["bob@dest.test"], body("hung"))
        wait_until(lambda: any(v == "DATA" for v, _ in sink.commands), 10, "DATA sent")
        assert len(sink.live) == 1
        # shutdown_timeout is 5 s here; stop() gives up with TimeoutError after 30 s, so
        # returning at all shows the hung session did not hold the stop.
        server.stop()
        stopped = True
        wait_until(lambda: not sink.live, 10, "the hung session closed by the stop")
    finally:
        if not stopped:
            server.stop()
    hang[0] = False
    again = _server(tmp_path / "srv", dns.port, lab.port)
    try:
        lab.wait_sink(sink, 1)
        assert tag_of(sink.messages[0].data) == "hung"
        wait_until(lambda: again.queued() == 0, 10, "queue empty after restart")
    finally:
        again.stop()
    assert qid


def test_expiry_of_one_domain_leaves_a_delivery_in_flight_elsewhere_alone(lab: Lab):
    # x@a.test: the transaction hangs at DATA (in flight); y@b.test: always 451.
    a = lab.sink("127.0.0.2", script=lambda v, arg: NO_REPLY if v == "DATA" else None)
    lab.sink("127.0.0.3", script=lambda v, arg: "451 4.3.0 later" if v == "RCPT" else None)
    home = lab.home_sink()
    lab.zone({
        "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": ["127.0.0.2"]},
        "b.test": {"MX": [(10, "mx.b.test")]}, "mx.b.test": {"A": ["127.0.0.3"]},
    })
    lab.start({"delivery": {"max_age": "3s", "timeouts": {"data": "30s"}}})
    qid = lab.send(["x@a.test", "y@b.test"], body("inflight"))
    wait_until(lambda: any(v == "DATA" for v, _ in a.commands), 10, "a.test in flight")
    lab.wait_log(lambda e: e["id"] == qid and e["recipient"] == "y@b.test"
                 and e["outcome"] == "expired", timeout=15)

    async def answer_data() -> None:  # a.test finally answers: 354, then 250 for the body
        for proto in list(a.live):
            proto.mode = "data"
            proto.buf[:0] = b"\r\n"
            proto.scan = 0
            proto.transport.write(b"354 go ahead\r\n")

    lab.peers.call(answer_data())
    lab.wait_sink(a, 1)
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    assert dsn.final_recipients == ["y@b.test"], "x@a.test was delivered, not expired"
