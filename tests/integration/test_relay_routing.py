"""Relay routing end to end: MX failover and load spreading, implicit MX, the DNS
facts that bounce (null MX, NXDOMAIN) and the failures that defer (SERVFAIL, P11),
loop detection (MX to ourselves), and [[routes]] smarthosts (with AUTH over TLS).

Each test: a loopback DNS zone, sinks on 127.0.0.x sharing one port, an in-process
server relaying to them; DSNs go to the sender's domain (home.test → 127.0.0.9)."""

from __future__ import annotations

import socket
import ssl

from tests.integration.harness import wait_until
from tests.integration.relay_helpers import (
    SENDER,
    Lab,
    body,
    check_dsn,
    dsns,
    lab,  # noqa: F401  (fixture)
    send_many,
    tag_of,
)

# --- MX failover and spreading -------------------------------------------------------


def test_failover_to_the_next_mx_when_the_best_refuses_connections(lab: Lab):
    good = lab.sink("127.0.0.3")  # nothing listens on 127.0.0.2 at this port
    lab.zone({
        "fo.test": {"MX": [(10, "mx1.fo.test"), (20, "mx2.fo.test")]},
        "mx1.fo.test": {"A": ["127.0.0.2"]},
        "mx2.fo.test": {"A": ["127.0.0.3"]},
    })
    lab.start()
    lab.send(["bob@fo.test"], body("fo-1"))
    lab.wait_sink(good, 1)
    assert good.messages[0].rcpt_tos == ["bob@fo.test"]
    [line] = lab.wait_log(lambda e: e["outcome"] == "delivered")
    assert line["mx"] == "mx2.fo.test" and line["ip"] == "127.0.0.3"
    lab.wait_queue_empty()


def test_failover_when_the_best_mx_greets_with_421(lab: Lab):
    busy = lab.sink("127.0.0.2", script=lambda v, a: "421 4.3.2 too busy" if v == "BANNER" else None)
    good = lab.sink("127.0.0.3")
    lab.zone({
        "fo.test": {"MX": [(10, "mx1.fo.test"), (20, "mx2.fo.test")]},
        "mx1.fo.test": {"A": ["127.0.0.2"]},
        "mx2.fo.test": {"A": ["127.0.0.3"]},
    })
    lab.start()
    lab.send(["bob@fo.test"], body("fo-2"))
    lab.wait_sink(good, 1)
    assert busy.connections >= 1 and not busy.messages
    lab.wait_queue_empty()


def test_equal_preferences_share_the_traffic(lab: Lab):
    a = lab.sink("127.0.0.2")
    b = lab.sink("127.0.0.3")
    lab.zone({
        "eq.test": {"MX": [(10, "mxa.eq.test"), (10, "mxb.eq.test")]},
        "mxa.eq.test": {"A": ["127.0.0.2"]},
        "mxb.eq.test": {"A": ["127.0.0.3"]},
    })
    # One message per connection: every connection picks its host afresh, so with 40
    # messages a one-sided split has probability 2**-39.
    server = lab.start({"delivery": {"max_messages_per_connection": 1}})
    send_many(server.port, [(["bob@eq.test"], body(f"eq-{i}")) for i in range(40)])
    wait_until(lambda: len(a.messages) + len(b.messages) >= 40, 30, "40 deliveries")
    assert len(a.messages) > 0 and len(b.messages) > 0, (len(a.messages), len(b.messages))
    assert len(a.messages) + len(b.messages) == 40
    lab.wait_queue_empty()


# --- DNS facts and failures (P11) ------------------------------------------------------


def test_implicit_mx_delivers_to_the_domain_address(lab: Lab):
    sink = lab.sink("127.0.0.2")
    dns = lab.zone({"bare.test": {"A": ["127.0.0.2"]}})
    lab.start()
    lab.send(["bob@bare.test"], body("imp"))
    lab.wait_sink(sink, 1)
    assert dns.count("bare.test", "MX") >= 1 and dns.count("bare.test", "A") >= 1
    [line] = lab.wait_log(lambda e: e["outcome"] == "delivered")
    assert line["mx"] == "bare.test" and line["ip"] == "127.0.0.2"
    lab.wait_queue_empty()


def test_null_mx_bounces_556_with_a_dsn_to_the_sender(lab: Lab):
    home = lab.home_sink()
    lab.zone({"nullmx.test": {"MX": [(0, ".")]}})
    lab.start()
    qid = lab.send(["bob@nullmx.test"], body("null-mx"))
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bob@nullmx.test"], status="5.1.10")
    assert "556 5.1.10" in dsn.diagnostics[0]
    assert b"X-Test-Id: null-mx" in dsn.raw  # the original's headers come back
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert (line["outcome"], line["code"], line["enhanced"]) == ("bounced", 556, "5.1.10")
    lab.wait_queue_empty()


def test_nxdomain_bounces_5_1_2(lab: Lab):
    home = lab.home_sink()
    lab.zone({})
    lab.start()
    qid = lab.send(["bob@nosuch.test"], body("nx"))
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bob@nosuch.test"], status="5.1.2")
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert (line["outcome"], line["enhanced"]) == ("bounced", "5.1.2")
    lab.wait_queue_empty()


def test_servfail_defers_4_4_3_and_delivers_once_the_zone_is_fixed(lab: Lab):
    home = lab.home_sink()
    sink = lab.sink("127.0.0.2")
    dns = lab.zone({"flaky.test": "SERVFAIL"})
    lab.start()
    qid = lab.send(["bob@flaky.test"], body("servfail"))
    lines = lab.wait_log(lambda e: e["id"] == qid and e["outcome"] == "deferred", 2)
    assert all(e["enhanced"] == "4.4.3" and e["code"] == 451 for e in lines), lines
    assert [e["attempt"] for e in lines[:2]] == [1, 2]
    [record] = lab.records().values()  # still queued, never bounced
    assert record.recipients[0].state == 0
    assert not home.messages, "a DNS failure must never bounce"
    assert dns.count("flaky.test", "A") == 0, "no A fallback after a failed MX lookup"
    dns.set("flaky.test", {"MX": [(10, "mx.flaky.test")]})
    dns.set("mx.flaky.test", {"A": ["127.0.0.2"]})
    lab.wait_sink(sink, 1)
    lab.wait_queue_empty()
    assert not home.messages


# --- loops -----------------------------------------------------------------------------


def test_mx_pointing_at_ourselves_bounces_5_4_6_and_never_loops(lab: Lab):
    # The server listens on 127.0.0.1:P and delivers to port P: an MX of 127.0.0.1 is
    # itself. The sender's domain has a sink on 127.0.0.9:P for the DSN.
    home = lab.home_sink()
    port = lab.port
    probe = socket.socket()
    try:  # the port must be free on 127.0.0.1 too (the sink only holds 127.0.0.9)
        probe.bind(("127.0.0.1", port))
    finally:
        probe.close()
    lab.zone({
        "loop.test": {"MX": [(10, "mx.loop.test")]},
        "mx.loop.test": {"A": ["127.0.0.1"]},
    })
    server = lab.start({"listeners": [{"address": f"127.0.0.1:{port}"}]})
    assert server.port == port
    qid = lab.send(["bob@loop.test"], body("loop"))
    lab.wait_sink(home, 1)
    [dsn] = dsns(home)
    check_dsn(dsn, to=SENDER, recipients=["bob@loop.test"], status="5.4.6")
    [line] = lab.wait_log(lambda e: e["id"] == qid)
    assert (line["outcome"], line["enhanced"]) == ("bounced", "5.4.6")
    lab.wait_queue_empty()
    # Only our own submission ever reached the listener: nothing was relayed to itself.
    assert server.runtime.ctx.stats.received == 1
    assert len(home.messages) == 1 and home.connections == 1


# --- [[routes]] ---------------------------------------------------------------------------


def test_smarthost_route_bypasses_mx(lab: Lab):
    smart = lab.sink("127.0.0.4")
    dns = lab.zone({})  # smart.test has no DNS data at all
    lab.start({"routes": [{"domain": "smart.test", "host": f"127.0.0.4:{lab.port}"}]})
    lab.send(["bob@smart.test"], body("smart"))
    lab.wait_sink(smart, 1)
    assert smart.messages[0].rcpt_tos == ["bob@smart.test"]
    assert dns.count("smart.test", "MX") == 0
    [line] = lab.wait_log(lambda e: e["outcome"] == "delivered")
    assert line["ip"] == "127.0.0.4"
    lab.wait_queue_empty()


def test_wildcard_smarthost_with_auth_over_tls(lab: Lab, ca, tmp_path):
    cert = ca.issue_cert("smart.volley.test", "127.0.0.4")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    smart = lab.sink("127.0.0.4", starttls_context=ctx, auth={"relayuser": "s3cret"})
    dns = lab.zone({})
    secret = tmp_path / "smarthost.pw"
    secret.write_text("s3cret\n")
    lab.start({"routes": [{"domain": "*", "host": f"127.0.0.4:{lab.port}",
                           "auth_user": "relayuser", "auth_password_file": str(secret)}]})
    lab.send(["bob@anywhere.test"], body("smart-auth"))
    lab.wait_sink(smart, 1)
    msg = smart.messages[0]
    assert msg.tls and smart.auth_users == ["relayuser"]
    assert tag_of(msg.data) == "smart-auth"
    assert dns.count("anywhere.test", "MX") == 0 and dns.total() == 0
    [line] = lab.wait_log(lambda e: e["outcome"] == "delivered")
    assert line["tls"].startswith("TLSv1")
    lab.wait_queue_empty()


def test_required_tls_to_a_host_without_starttls_defers(lab: Lab):
    sink = lab.sink("127.0.0.2")  # no STARTTLS offered
    lab.zone({
        "sec.test": {"MX": [(10, "mx.sec.test")]},
        "mx.sec.test": {"A": ["127.0.0.2"]},
    })
    lab.start({"routes": [{"domain": "sec.test", "tls": "required"}]})
    qid = lab.send(["bob@sec.test"], body("tls-req"))
    [line] = lab.wait_log(lambda e: qid in (e["id"], *e.get("ids", ())))
    assert line["outcome"] == "deferred" and line["enhanced"].startswith("4.7."), line
    assert not sink.messages and not sink.refused
    assert not any(v in ("MAIL", "RCPT", "DATA") for v, _ in sink.commands)
    [record] = lab.records().values()
    assert record.recipients[0].state == 0


def test_opportunistic_starttls_is_used_and_logged(lab: Lab, ca):
    cert = ca.issue_cert("mx.tls.test", "127.0.0.2")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    sink = lab.sink("127.0.0.2", starttls_context=ctx)
    lab.zone({
        "tls.test": {"MX": [(10, "mx.tls.test")]},
        "mx.tls.test": {"A": ["127.0.0.2"]},
    })
    lab.start()
    lab.send(["bob@tls.test"], body("tls-opp"))
    lab.wait_sink(sink, 1)
    assert sink.messages[0].tls
    [line] = lab.wait_log(lambda e: e["outcome"] == "delivered")
    assert line["tls"] in ("TLSv1.2", "TLSv1.3"), line
    lab.wait_queue_empty()



async def _forwarder(host: str, port: int, to_host: str, to_port: int):
    """A TCP port forward host:port → to_host:to_port: this relay as seen through NAT."""
    import asyncio

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(to_host, to_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, host, port, reuse_address=True)


def test_mx_named_as_our_hostname_behind_nat_bounces_5_4_6(lab: Lab):
    """The best MX is this relay's own host name (server.hostname) but resolves to an
    address that is not one of the listener's (NAT, a proxy): the (ip, port) check
    cannot see it, the name check must (worker.py: "plus whatever server.hostname
    resolves to, added by the DNS layer's own local-name check")."""
    home = lab.home_sink()
    port = lab.port
    lab.zone({
        "natloop.test": {"MX": [(10, "mx.volley.test")]},  # the harness's server.hostname
        "mx.volley.test": {"A": ["127.0.0.2"]},
    })
    server = lab.start({"listeners": [{"address": f"127.0.0.1:{port}"}],
                        "delivery": {"max_age": "20s"}})
    nat = lab.peers.call(_forwarder("127.0.0.2", port, "127.0.0.1", port))
    try:
        qid = lab.send(["bob@natloop.test"], body("natloop"))
        lab.wait_sink(home, 1, timeout=10)
        [dsn] = dsns(home)
        check_dsn(dsn, to=SENDER, recipients=["bob@natloop.test"], status="5.4.6")
        [line] = lab.wait_log(lambda e: e["id"] == qid)
        assert (line["outcome"], line["enhanced"]) == ("bounced", "5.4.6")
        assert server.runtime.ctx.stats.received == 1, "the message looped through the relay"
    finally:
        nat.close()
