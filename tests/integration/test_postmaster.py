"""RCPT TO:<postmaster> (RFC 5321 §4.5.1: the bare name, no domain) over real loopback
sockets into a real LMDB queue. With server.postmaster set it is queued for that
address; unset it gets 550 5.1.1; no path ever queues an address without a domain."""

from __future__ import annotations

import msgspec
import pytest

from engine import config as config_mod
from engine.queue.ids import id_bytes
from tests.integration.relay_helpers import (
    Lab,
    body,
    lab,  # noqa: F401  (fixture)
    tag_of,
)
from tests.integration.smtp_raw import RawClient, queue_id

PM = "hostmaster@volley.test"


def _recipients(server, msg_id: str) -> list[str]:
    record = server.call(lambda: server.store.get(id_bytes(msg_id)))
    return [r.address for r in record.recipients]


def _send(c: RawClient, rcpt: str = "<postmaster>"):
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.com>").code == 250
    return c.cmd(f"RCPT TO:{rcpt}")


def test_postmaster_unset_is_refused_by_name_and_nothing_is_queued(inbound):
    server = inbound()
    with RawClient(server.port) as c:
        reply = _send(c)
        assert reply.code == 550
        assert reply.enhanced == "5.1.1"
        assert "server.postmaster" in reply.text
        # The transaction has no recipient: DATA cannot start, nothing is stored.
        assert c.cmd("DATA").code == 554
    assert server.queued() == 0


@pytest.mark.parametrize("spelling", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_postmaster_set_is_queued_for_the_configured_address(inbound, spelling):
    server = inbound({"server": {"postmaster": PM}})
    with RawClient(server.port) as c:
        assert _send(c, spelling).code == 250
        assert c.cmd("RCPT TO:<b@example.net>").code == 250
        assert c.cmd("DATA", enhanced=False).code == 354
        msg_id = queue_id(c.cmd(b"Subject: hi\r\n\r\nbody\r\n.").text)
    assert _recipients(server, msg_id) == [PM, "b@example.net"]


def test_postmaster_is_taken_from_a_client_that_may_not_relay(inbound):
    # RFC 5321 §4.5.1: postmaster is reachable by anyone, relay rights or not.
    server = inbound({"server": {"postmaster": PM}, "relay": {"networks": ["192.0.2.0/24"]}})
    with RawClient(server.port) as c:
        assert _send(c, "<b@example.net>").code == 554  # the relay rule is on
        assert c.cmd("RCPT TO:<postmaster>").code == 250
        assert c.cmd("DATA", enhanced=False).code == 354
        msg_id = queue_id(c.cmd(b"Subject: hi\r\n\r\nbody\r\n.").text)
    assert _recipients(server, msg_id) == [PM]


def test_postmaster_unset_between_rcpt_and_data_is_not_queued_domainless(inbound):
    # A reload that unsets server.postmaster after the 250 to RCPT: the message gets
    # a temporary refusal instead of a recipient with an empty domain in the queue.
    server = inbound({"server": {"postmaster": PM}})
    with RawClient(server.port) as c:
        assert _send(c).code == 250
        unset = msgspec.structs.replace(
            server.cfg, server=msgspec.structs.replace(server.cfg.server, postmaster=""))
        server.call(lambda: server.runtime.apply_config(unset))
        assert c.cmd("DATA", enhanced=False).code == 354
        reply = c.cmd(b"Subject: hi\r\n\r\nbody\r\n.")
        assert reply.code == 451
        # The retry gets the clear answer.
        assert c.cmd("RSET").code == 250
        assert _send(c).code == 550
    assert server.queued() == 0


@pytest.mark.parametrize("value", ["postmaster", "pm@", "@volley.test", "a b@volley.test",
                                   "<pm@volley.test>", "pm@volley..test"])
def test_server_postmaster_must_be_an_address_with_a_domain(value):
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.from_dict({"server": {"postmaster": value}})
    assert str(err.value).startswith("server.postmaster: expected an address with a domain")


def test_server_postmaster_round_trips_through_config_check_form():
    cfg = config_mod.from_dict({"server": {"postmaster": PM}})
    assert cfg.server.postmaster == PM
    assert config_mod.from_dict(config_mod.to_builtins(cfg)) == cfg


def test_postmaster_mail_is_relayed_to_the_configured_address(lab: Lab):
    # The mapped recipient is an ordinary one from then on: looked up in DNS and
    # delivered to its MX, which sees RCPT TO the configured address, never <postmaster>.
    sink = lab.sink("127.0.0.2")
    lab.zone({"pm.test": {"MX": [(10, "mx.pm.test")]}, "mx.pm.test": {"A": ["127.0.0.2"]}})
    lab.start({"server": {"postmaster": "hostmaster@pm.test"}})
    lab.send(["postmaster"], body("to-postmaster"))
    lab.wait_sink(sink, 1)
    lab.wait_queue_empty()
    (msg,) = sink.messages
    assert msg.rcpt_tos == ["hostmaster@pm.test"]
    assert tag_of(msg.data) == "to-postmaster"
