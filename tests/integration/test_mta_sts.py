"""MTA-STS (RFC 8461) end to end: the lab DNS serves `_mta-sts.DOMAIN` TXT and the A
record of mta-sts.DOMAIN, a loopback HTTPS server (aiohttp, trustme certificate) serves
the policies, sinks with STARTTLS play the MX hosts, and an in-process server relays.

The policy server listens on one port for every domain (`mta_sts.port`, the test-only
override of 443) and answers by the Host header; it counts fetches per domain.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme
from aiohttp import web

from engine.config import from_dict
from engine.delivery.sts_fetch import FetchError, fetch_policy
from engine.delivery.sts_policies import StsPolicies
from engine.dns.resolver import Resolver
from tests.integration.harness import wait_until
from tests.integration.relay_helpers import Lab, body, lab, tag_of  # noqa: F401  (fixture)

POLICY_IP = "127.0.0.20"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "version: STSv1\r\n" f"mode: {mode}\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"


class PolicyServer:
    """HTTPS on POLICY_IP:port serving /.well-known/mta-sts.txt for mta-sts.DOMAIN."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.policies: dict[str, web.StreamResponse | str] = {}  # domain -> body or response
        self.hits: collections.Counter[str] = collections.Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        self.hits[domain] += 1
        answer = self.policies.get(domain)
        if answer is None:
            return web.Response(status=404, text="no policy")
        if isinstance(answer, str):
            return web.Response(text=answer, content_type="text/plain")
        return answer

    async def start(self) -> PolicyServer:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, POLICY_IP, 0, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Any) -> str:
    path = tmp_path / "sts-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def policies(peers: Any, ca: trustme.CA) -> Iterator[Callable[..., PolicyServer]]:
    """Factory: policies(*domains) → a PolicyServer whose certificate names mta-sts.D."""
    started: list[PolicyServer] = []

    def start(*domains: str, issuer: trustme.CA | None = None) -> PolicyServer:
        cert = (issuer or ca).issue_cert(*[f"mta-sts.{d}" for d in domains])
        server: PolicyServer = peers.call(PolicyServer(server_context(cert)).start())
        started.append(server)
        return server

    yield start
    for server in started:
        peers.call(server.close())


def sts_zone(domain: str, mx_ip: str, sts_id: str | None = "one", mx: str = "") -> dict[str, Any]:
    """DNS for one destination: MX, its A, the policy host's A, and the TXT record."""
    mx = mx or f"mx.{domain}"
    zone: dict[str, Any] = {
        domain: {"MX": [(10, mx)]},
        mx: {"A": [mx_ip]},
        f"mta-sts.{domain}": {"A": [POLICY_IP]},
    }
    if sts_id is not None:
        zone[f"_mta-sts.{domain}"] = {"TXT": [f"v=STSv1; id={sts_id};"], "TTL": 1}
    return zone


def start_relay(lab: Lab, server: PolicyServer, ca_file: str, **sts: Any) -> None:
    lab.start({"mta_sts": {"ca_file": ca_file, "port": server.port, "fetch_timeout": "10s", **sts}})


def tls_sink(lab: Lab, ca: trustme.CA, ip: str, *names: str) -> Any:
    return lab.sink(ip, starttls_context=server_context(ca.issue_cert(*names)))


def app_log(capfd: Any, seen: list[str]) -> str:
    seen.append(capfd.readouterr().err)
    return "".join(seen)


# --- enforce -------------------------------------------------------------------------


def test_enforce_with_a_valid_certificate_delivers_over_tls(lab: Lab, ca, ca_file, policies):
    sink = tls_sink(lab, ca, "127.0.0.2", "mx.good.test")
    server = policies("good.test")
    server.policies["good.test"] = policy_text("enforce", "mx.good.test")
    lab.zone(sts_zone("good.test", "127.0.0.2"))
    start_relay(lab, server, ca_file)
    lab.send(["bob@good.test"], body("sts-good"))
    lab.wait_sink(sink, 1)
    assert sink.messages[0].tls and tag_of(sink.messages[0].data) == "sts-good"
    [line] = lab.wait_log(lambda e: e["outcome"] == "delivered")
    assert line["tls"] in ("TLSv1.2", "TLSv1.3") and line["mx"] == "mx.good.test"
    assert server.hits["good.test"] == 1
    lab.wait_queue_empty()


def test_enforce_refuses_an_mx_the_policy_does_not_list(lab: Lab, ca, ca_file, policies):
    sink = tls_sink(lab, ca, "127.0.0.2", "mx.rogue.test")
    server = policies("rogue.test")
    server.policies["rogue.test"] = policy_text("enforce", "mx.elsewhere.test")
    lab.zone(sts_zone("rogue.test", "127.0.0.2"))
    start_relay(lab, server, ca_file)
    qid = lab.send(["bob@rogue.test"], body("sts-rogue"))
    [line] = lab.wait_log(lambda e: qid in (e["id"], *e.get("ids", ())))
    assert (line["outcome"], line["code"], line["enhanced"]) == ("deferred", 451, "4.7.5"), line
    assert "MTA-STS" in line["reply"] and "mx.rogue.test" in line["reply"], line
    assert sink.connections == 0 and not sink.messages  # nothing was sent anywhere
    [record] = lab.records().values()
    assert record.recipients[0].state == 0  # still queued: deferred, never bounced


def test_enforce_defers_when_the_mx_offers_no_starttls(lab: Lab, ca_file, policies):
    sink = lab.sink("127.0.0.2")  # no STARTTLS
    server = policies("plain.test")
    server.policies["plain.test"] = policy_text("enforce", "mx.plain.test")
    lab.zone(sts_zone("plain.test", "127.0.0.2"))
    start_relay(lab, server, ca_file)
    qid = lab.send(["bob@plain.test"], body("sts-plain"))
    [line] = lab.wait_log(lambda e: qid in (e["id"], *e.get("ids", ())))
    assert line["outcome"] == "deferred" and line["enhanced"].startswith("4.7."), line
    assert "MTA-STS policy" in line["reply"] and "STARTTLS" in line["reply"], line
    assert not sink.messages
    assert not any(v in ("MAIL", "RCPT", "DATA") for v, _ in sink.commands)


def test_enforce_defers_on_a_certificate_for_another_name(lab: Lab, ca, ca_file, policies):
    sink = tls_sink(lab, ca, "127.0.0.2", "someone-else.test")  # trusted CA, wrong name
    server = policies("wrongname.test")
    server.policies["wrongname.test"] = policy_text("enforce", "mx.wrongname.test")
    lab.zone(sts_zone("wrongname.test", "127.0.0.2"))
    start_relay(lab, server, ca_file)
    qid = lab.send(["bob@wrongname.test"], body("sts-name"))
    [line] = lab.wait_log(lambda e: qid in (e["id"], *e.get("ids", ())))
    assert (line["outcome"], line["enhanced"]) == ("deferred", "4.7.5"), line
    assert "MTA-STS policy: certificate verification failed for mx.wrongname.test" in line["reply"], line
    assert not sink.messages
    assert not any(v in ("MAIL", "RCPT", "DATA") for v, _ in sink.commands)


# --- testing, none, no record --------------------------------------------------------


def test_testing_mode_delivers_and_logs_what_would_have_failed(lab: Lab, ca, ca_file, policies, capfd):
    stranger = trustme.CA()  # a certificate no trusted CA signed
    sink = lab.sink("127.0.0.2", starttls_context=server_context(stranger.issue_cert("mx.trial.test")))
    server = policies("trial.test")
    server.policies["trial.test"] = policy_text("testing", "mx.trial.test")
    lab.zone(sts_zone("trial.test", "127.0.0.2"))
    start_relay(lab, server, ca_file)
    lab.send(["bob@trial.test"], body("sts-trial"))
    lab.wait_sink(sink, 1)
    assert sink.messages[0].tls  # delivered, over (unverified) TLS as without a policy
    seen: list[str] = []
    wait_until(lambda: "mta_sts_testing" in app_log(capfd, seen), 10, "the testing-mode log line")
    [note] = [x for x in "".join(seen).splitlines() if "mta_sts_testing" in x]
    assert "trial.test" in note and "certificate verification failed" in note
    lab.wait_queue_empty()


def test_no_txt_record_is_opportunistic_as_before(lab: Lab, policies, ca_file):
    stranger = trustme.CA()
    sink = lab.sink("127.0.0.2", starttls_context=server_context(stranger.issue_cert("mx.nosts.test")))
    server = policies("nosts.test")
    server.policies["nosts.test"] = policy_text("enforce", "mx.other.test")  # never asked for
    dns = lab.zone(sts_zone("nosts.test", "127.0.0.2", sts_id=None))
    start_relay(lab, server, ca_file)
    lab.send(["bob@nosts.test"], body("sts-none"))
    lab.wait_sink(sink, 1)
    assert sink.messages[0].tls
    assert server.hits["nosts.test"] == 0 and dns.count("_mta-sts.nosts.test", "TXT") >= 1
    lab.wait_queue_empty()


def test_mode_none_is_as_if_there_were_no_policy(lab: Lab, ca_file, policies):
    sink = lab.sink("127.0.0.2")  # plaintext, and an MX the policy would not list
    server = policies("off.test")
    server.policies["off.test"] = policy_text("none")
    lab.zone(sts_zone("off.test", "127.0.0.2"))
    start_relay(lab, server, ca_file)
    lab.send(["bob@off.test"], body("sts-off"))
    lab.wait_sink(sink, 1)
    assert server.hits["off.test"] == 1
    lab.wait_queue_empty()


# --- caching -------------------------------------------------------------------------


def test_one_fetch_serves_many_messages_and_a_new_id_fetches_again(lab: Lab, ca, ca_file, policies):
    sink = tls_sink(lab, ca, "127.0.0.2", "mx.cache.test")
    server = policies("cache.test")
    server.policies["cache.test"] = policy_text("enforce", "mx.cache.test")
    dns = lab.zone(sts_zone("cache.test", "127.0.0.2", sts_id="first"))
    start_relay(lab, server, ca_file)
    for i in range(6):
        lab.send(["bob@cache.test"], body(f"sts-cache-{i}"))
    lab.wait_sink(sink, 6)
    assert server.hits["cache.test"] == 1
    # The domain publishes a new policy under a new id (the TXT TTL is 1 s): the next
    # message after the TXT is looked at again fetches it, once.
    server.policies["cache.test"] = policy_text("enforce", "mx.cache.test", "*.cache.test")
    dns.set("_mta-sts.cache.test", {"TXT": ["v=STSv1; id=second;"], "TTL": 1})
    sent = [6]
    last = [0.0]

    def refetched() -> bool:
        # A probe message now and then (each may be the one that looks again).
        if server.hits["cache.test"] >= 2:
            return True
        if time.monotonic() - last[0] > 0.3:
            lab.send(["bob@cache.test"], body(f"sts-cache-{sent[0]}"))
            sent[0] += 1
            last[0] = time.monotonic()
        return False

    wait_until(refetched, 20, "a fetch of the new policy")
    lab.wait_sink(sink, sent[0])
    assert server.hits["cache.test"] == 2
    lab.wait_queue_empty()


# --- the fetch itself (sts_fetch.py) -----------------------------------------------------


def _fetch(peers: Any, dns_port: int, server: PolicyServer, ca_file: str, domain: str) -> Any:
    ctx = ssl.create_default_context(cafile=ca_file)

    async def go() -> Any:
        resolver = Resolver([f"127.0.0.1:{dns_port}"], timeout=2)
        return await asyncio.wait_for(fetch_policy(domain, resolver, ctx, port=server.port, timeout=5), 10)

    return peers.call(go())


def test_fetch_refuses_redirects_big_bodies_errors_and_untrusted_certificates(
        peers, dns_zone, policies, ca_file):
    names = ["ok.test", "redirect.test", "big.test", "missing.test", "junk.test"]
    server = policies(*names)
    dns = dns_zone({f"mta-sts.{d}": {"A": [POLICY_IP]} for d in [*names, "untrusted.test"]})
    server.policies["ok.test"] = policy_text("testing", "*.ok.test", max_age=600)
    server.policies["redirect.test"] = web.Response(
        status=301, headers={"Location": f"https://mta-sts.ok.test:{server.port}/.well-known/mta-sts.txt"})
    server.policies["big.test"] = policy_text("enforce", "mx.big.test") + "x: " + "y" * 70_000 + "\n"
    server.policies["junk.test"] = "<html>hello</html>"
    policy = _fetch(peers, dns.port, server, ca_file, "ok.test")
    assert (policy.mode, policy.mx, policy.max_age) == ("testing", ("*.ok.test",), 600)
    for domain, problem in [("redirect.test", "HTTP 301"), ("big.test", "64 KiB"),
                            ("missing.test", "HTTP 404"), ("junk.test", "line 1")]:
        with pytest.raises(FetchError, match=problem):
            _fetch(peers, dns.port, server, ca_file, domain)
    assert server.hits["ok.test"] == 1  # the redirect was not followed
    # A policy host whose certificate no trusted CA signed.
    other = policies("untrusted.test", issuer=trustme.CA())
    with pytest.raises(FetchError, match="certificate"):
        _fetch(peers, dns.port, other, ca_file, "untrusted.test")


def test_a_cached_policy_outlives_a_failed_fetch_and_a_withdrawn_record(peers, dns_zone, policies, ca_file):
    """RFC 8461 §5.1: with an unexpired cached policy, a failed fetch or a missing TXT
    record leaves it in force; once expired, the domain has no policy."""
    server = policies("keep.test")
    server.policies["keep.test"] = policy_text("enforce", "mx.keep.test")
    dns = dns_zone({"mta-sts.keep.test": {"A": [POLICY_IP]},
                    "_mta-sts.keep.test": {"TXT": ["v=STSv1; id=one"], "TTL": 1}})
    cfg = from_dict({"dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "min_ttl": "1s"},
                     "mta_sts": {"ca_file": ca_file, "port": server.port, "fetch_timeout": "5s"}})

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        sts = StsPolicies(cfg, Resolver(cfg.dns.nameservers, timeout=2), loop)
        seen: list[Any] = [await sts.policy("keep.test")]
        entry = sts._entries["keep.test"]
        # A new id, and the policy server fails: the cached policy stays.
        dns.set("_mta-sts.keep.test", {"TXT": ["v=STSv1; id=two"], "TTL": 1})
        server.policies["keep.test"] = web.Response(status=500)
        entry.checked_until = 0.0  # the TXT's TTL has run out
        seen.append(await sts.policy("keep.test"))
        # The record is withdrawn: still the cached policy, and no fetch.
        dns.set("_mta-sts.keep.test", None)
        entry.checked_until = 0.0
        seen.append(await sts.policy("keep.test"))
        entry.expires = 0.0  # max_age has passed
        seen.append(await sts.policy("keep.test"))
        return seen

    first, after_failure, after_withdrawal, expired = peers.call(scenario())
    assert first is not None and (first.mode, first.id, first.mx) == ("enforce", "one", ("mx.keep.test",))
    assert after_failure == first and after_withdrawal == first
    assert expired is None
    assert server.hits["keep.test"] == 2  # the first fetch and the failed one
