"""The HTTP injection API against a real worker runtime (and a real `volley serve`):
real HTTP over loopback with aiohttp's client, a real LMDB queue, every JSON answer
checked against docs/openapi.json (tests/openapi_check.py)."""

from __future__ import annotations

import email
import email.policy
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import tomli_w

from engine.mail import verp
from engine.queue import suppression
from engine.queue.records import MessageRecord
from tests.integration.harness import REPO, InboundServer, base_config, merge
from tests.integration.http_helpers import (
    BARE_TOKEN,
    TOKEN,
    call,
    http_overrides,
    inject,
    newsletter,
)
from tests.integration.relay_helpers import lab  # noqa: F401  (fixture)

Start = Callable[..., InboundServer]


@pytest.fixture
def api(inbound: Start, tmp_path: Path) -> Start:
    """Factory: an in-process worker runtime serving SMTP and the HTTP API."""

    def start(extra: dict[str, Any] | None = None, **http: Any) -> InboundServer:
        return inbound(merge(http_overrides(tmp_path / "http", **http), extra or {}))

    return start


def records_by_rcpt(server: InboundServer) -> dict[str, tuple[MessageRecord, bytes]]:
    store = server.store

    def read() -> dict[str, tuple[MessageRecord, bytes]]:
        out = {}
        for raw in store.iter_ids():
            rec = store.get(raw)
            out[rec.recipients[0].address] = (rec, store.get_body(raw))
        return out

    result: dict[str, tuple[MessageRecord, bytes]] = server.call(read)
    return result


def test_bearer_tokens(api: Start) -> None:
    server = api()
    port = server.http_port
    nobody = inject(port, newsletter(1), token=None)
    assert nobody.status == 401
    # RFC 6750 §3.1: no credentials, no error code; a wrong token says invalid_token.
    assert nobody.headers["WWW-Authenticate"] == 'Bearer realm="volley"'
    wrong = inject(port, newsletter(1), token=TOKEN[:-1] + "x")
    assert wrong.status == 401
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="volley", error="invalid_token"'
    basic = inject(port, newsletter(1), headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status == 401
    assert server.queued() == 0
    assert inject(port, newsletter(1)).status == 200
    assert inject(port, newsletter(1), token=BARE_TOKEN).status == 200
    assert server.queued() == 2
    # Authentication comes first, also for the read endpoint and unknown paths.
    assert call(port, "GET", "/api/v1/campaigns/spring-2026", token=None).status == 401
    assert call(port, "GET", "/nothing/here", token=None).status == 401


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda b: b.pop("recipients"), "recipients"),
    (lambda b: b.update(priority="high"), "priority"),
    (lambda b: b.update(priority=12), "priority"),
    (lambda b: b.update(priority=-1), "priority"),
    (lambda b: b["recipients"][3].update(email=7), "recipients[3].email"),
    (lambda b: b["recipients"][2].update(substitutions=[1]), "recipients[2].substitutions"),
    (lambda b: b["recipients"][1].update(mail="x@y.test"), "recipients[1].mail"),
    (lambda b: b.update(recipients=[]), "recipients"),
    (lambda b: b.update(envelope_sender="not an address"), "envelope_sender"),
    (lambda b: b["content"].update(subject=["x"]), "content.subject"),
    (lambda b: b.update(content="text"), "content"),
    (lambda b: b.update(tenant="a b"), "tenant"),
    (lambda b: b.update(campaign_id="c" * 300), "campaign_id"),
])
def test_bad_request_names_the_field(api: Start, mutate: Callable[[dict[str, Any]], Any],
                                     field: str) -> None:
    server = api()
    body = newsletter(5)
    mutate(body)
    answer = call(server.http_port, "POST", "/api/v1/inject", raw=_json(body),
                  headers={"Content-Type": "application/json"})
    assert answer.status == 400, answer
    assert answer.body["field"] == field, answer
    assert server.queued() == 0


def _json(body: Any) -> bytes:
    return orjson.dumps(body)


def test_malformed_json_wrong_type_and_method(api: Start) -> None:
    server = api()
    port = server.http_port
    ctype = {"Content-Type": "application/json"}
    answer = call(port, "POST", "/api/v1/inject", raw=b'{"recipients": [', headers=ctype)
    assert answer.status == 400 and "malformed JSON" in answer.body["error"], answer
    answer = call(port, "POST", "/api/v1/inject", raw=b"[]", headers=ctype)
    assert answer.status == 400, answer
    answer = call(port, "POST", "/api/v1/inject", raw=_json(newsletter(1)),
                  headers={"Content-Type": "text/plain"})
    assert answer.status == 415, answer
    answer = call(port, "POST", "/api/v1/inject", raw=_json(newsletter(1)),
                  headers={"Content-Type": "application/json; charset=latin-1"})
    assert answer.status == 415, answer
    assert call(port, "GET", "/api/v1/inject").status == 405
    assert call(port, "POST", "/api/v2/inject", raw=b"{}", headers=ctype).status == 404
    assert server.queued() == 0


def test_over_size_body_and_too_many_recipients(api: Start) -> None:
    server = api(max_body_size="4KiB", max_recipients=10)
    port = server.http_port
    big = newsletter(1)
    big["content"]["text_body"] = "x" * 5000
    answer = inject(port, big)
    assert answer.status == 413 and "max_body_size" in answer.body["error"], answer
    # Chunked, no Content-Length: refused once the bytes read pass the limit.

    def chunks() -> Any:
        data = _json(big)
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    answer = call(port, "POST", "/api/v1/inject", raw=_Chunked(chunks),  # type: ignore[arg-type]
                  headers={"Content-Type": "application/json"})
    assert answer.status == 413, answer
    answer = inject(port, newsletter(11))
    assert answer.status == 413 and answer.body["field"] == "recipients", answer
    assert inject(port, newsletter(10)).status == 200
    assert server.queued() == 10


class _Chunked:
    """An async iterable body: aiohttp sends it with Transfer-Encoding: chunked."""

    def __init__(self, gen: Callable[[], Any]) -> None:
        self._gen = gen

    async def __aiter__(self) -> Any:  # noqa: D105
        for part in self._gen():
            yield part


def test_template_syntax_error_names_the_field(api: Start) -> None:
    server = api()
    body = newsletter(2)
    body["content"]["subject"] = "Hello {{ first "
    answer = inject(server.http_port, body)
    assert answer.status == 400 and answer.body["field"] == "content.subject", answer
    body = newsletter(2)
    body["content"]["headers"] = {"X-Tag": "{% if %}"}
    answer = inject(server.http_port, body)
    assert answer.status == 400 and answer.body["field"].startswith("content.headers"), answer
    assert server.queued() == 0


def test_bad_and_suppressed_recipients_reported_one_by_one(api: Start) -> None:
    server = api()
    store = server.store
    server.call(lambda: store.write_one(lambda w: suppression.add(w, [
        suppression.make("r2@example.test", "bounce", source="550 5.1.1 no such user"),
        suppression.make("blocked.test", "complaint")])))
    body = newsletter(4)
    body["recipients"][1]["email"] = "no at sign"
    body["recipients"].append({"email": "anyone@blocked.test"})
    body["recipients"].append({"email": "r4@[300.1.1.1]"})
    body["recipients"].append({"email": "r5@example.test", "name": "Eve\r\nBcc: x@evil.test"})
    answer = inject(server.http_port, body)
    assert answer.status == 200, answer
    assert answer.body["success_count"] == 2
    assert answer.body["fail_count"] == 5
    assert len(answer.body["errors"]) == 5  # the distinct reasons
    failed = {f["email"]: f["error"] for f in answer.body["failed_recipients"]}
    assert failed["r2@example.test"] == "suppressed (bounce)"
    assert failed["anyone@blocked.test"] == "suppressed (complaint)"
    assert "not a valid address" in failed["no at sign"]
    assert "address literal" in failed["r4@[300.1.1.1]"]
    assert "line break" in failed["r5@example.test"]  # a render error fails its recipient only
    assert sorted(records_by_rcpt(server)) == ["r0@example.test", "r3@example.test"]
    counts = call(server.http_port, "GET", "/api/v1/campaigns/spring-2026").body
    assert (counts["injected"], counts["suppressed"]) == (2, 2)


def test_ten_thousand_recipients_one_commit(api: Start) -> None:
    server = api()
    stats = server.runtime.committer.stats
    before = (stats.batches, stats.ops)
    answer = inject(server.http_port, newsletter(10_000, tenant="acme", priority=7))
    assert answer.status == 200, answer
    assert answer.body == {"success_count": 10_000, "fail_count": 0,
                           "failed_recipients": [], "errors": []}
    # One op in one batch: the whole request is one transaction (and, under fsync, one flush).
    assert (stats.batches, stats.ops) == (before[0] + 1, before[1] + 1)
    timings = server.runtime.http.last
    print(f"10,000 recipients: screen {timings.screen:.3f}s, render {timings.render:.3f}s,"
          f" commit {timings.commit:.3f}s")
    queued = records_by_rcpt(server)
    assert len(queued) == 10_000
    for i in (0, 4321, 9999):
        rec, data = queued[f"r{i}@example.test"]
        assert (rec.campaign, rec.tenant, rec.priority, rec.sign) == ("spring-2026", "acme", 7, True)
        assert rec.sender == "news@home.test" and rec.size == len(data)
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert msg["Subject"] == f"Hello R{i}"
        assert msg["To"].addresses[0].addr_spec == f"r{i}@example.test"
        assert f"your code is {1000 + i} (spring)" in msg.get_body(("plain",)).get_content()
        assert data.startswith(b"Received: from [127.0.0.1]") and b"with HTTP id " in data
        token = verp.token_of_message_id(msg["Message-ID"])
        assert token and verp.decode_token(token) == (f"r{i}@example.test", "spring-2026", "acme")
    counts = call(server.http_port, "GET", "/api/v1/campaigns/spring-2026?tenant=acme").body
    assert counts["injected"] == 10_000 and counts["tenant"] == "acme"


def test_campaign_counters(api: Start) -> None:
    server = api()
    port = server.http_port
    assert call(port, "GET", "/api/v1/campaigns/spring-2026").status == 404
    assert inject(port, newsletter(3)).status == 200
    assert inject(port, newsletter(2, tenant="t1")).status == 200
    shared = call(port, "GET", "/api/v1/campaigns/spring-2026")
    assert shared.status == 200
    assert (shared.body["campaign"], shared.body["tenant"], shared.body["injected"]) == (
        "spring-2026", "", 3)
    assert shared.body["first_at"] > 0 and shared.body["last_at"] >= shared.body["first_at"]
    assert call(port, "GET", "/api/v1/campaigns/spring-2026?tenant=t1").body["injected"] == 2
    assert call(port, "GET", "/api/v1/campaigns/spring-2026?tenant=t2").status == 404


def test_full_queue_stores_nothing(api: Start) -> None:
    server = api({"queue": {"max_size": "1MiB"}})
    body = newsletter(3000)
    body["content"]["text_body"] += "padding " * 60
    answer = inject(server.http_port, body)
    assert answer.status == 507, answer
    assert answer.headers["Retry-After"] == "60"
    assert server.queued() == 0  # all or nothing
    assert call(server.http_port, "GET", "/api/v1/campaigns/spring-2026").status == 404
    assert inject(server.http_port, newsletter(20)).status == 200
    assert server.queued() == 20


def test_https_with_the_smtp_certificate(api: Start, tls_files: dict[str, str]) -> None:
    server = api({"tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]}},
                 tls=True)
    answer = inject(server.http_port, newsletter(2), scheme="https", cafile=tls_files["ca_file"])
    assert answer.status == 200, answer
    _, data = records_by_rcpt(server)["r1@example.test"]
    assert b"with HTTPS id " in data


def test_delivered_personalised_with_one_click_unsubscribe(lab: Any, tmp_path: Path) -> None:
    """Through delivery to a sink: one copy per recipient, each with its own content,
    its VERP return path and the RFC 8058 pair of headers."""
    sink = lab.sink("127.0.0.2")
    lab.zone({"example.test": {"MX": [(10, "mx.example.test")]},
              "mx.example.test": {"A": ["127.0.0.2"]}})
    server = lab.start(merge(http_overrides(tmp_path / "http"),
                             {"feedback": {"address": "fbl@home.test"}}))
    body = newsletter(3, envelope_sender="fbl@home.test", list_unsubscribe={
        "url": "https://home.test/unsubscribe/{{ code }}", "mailto": "mailto:unsub@home.test"})
    answer = inject(server.http_port, body)
    assert answer.status == 200 and answer.body["success_count"] == 3, answer
    lab.wait_sink(sink, 3)
    got = {m.rcpt_tos[0]: m for m in sink.messages}
    assert sorted(got) == [f"r{i}@example.test" for i in range(3)]
    for i in range(3):
        m = got[f"r{i}@example.test"]
        assert verp.token_of_address("fbl@home.test", m.mail_from) == verp.encode_token(
            f"r{i}@example.test", "spring-2026", "")
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        assert msg["Subject"] == f"Hello R{i}"
        assert f"<https://home.test/unsubscribe/{1000 + i}>" in msg["List-Unsubscribe"]
        assert "<mailto:unsub@home.test" in msg["List-Unsubscribe"]
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    lab.wait_queue_empty()


def test_a_verp_hard_bounce_is_booked_once_and_sends_no_dsn(lab: Any, tmp_path: Path) -> None:
    """Mail whose return path is Volley's own feedback address asks for no DSN
    (NOTIFY=NEVER): Volley books the bounce itself, so a report to its own feedback
    intake would count it twice."""
    lab.sink("127.0.0.2", script=lambda v, a: (
        "550 5.1.1 no such user" if v == "RCPT" and "r1@" in a else None))
    home = lab.home_sink()
    lab.zone({"example.test": {"MX": [(10, "mx.example.test")]},
              "mx.example.test": {"A": ["127.0.0.2"]}})
    server = lab.start(merge(http_overrides(tmp_path / "http"),
                             {"feedback": {"address": "fbl@home.test"}}))
    answer = inject(server.http_port, newsletter(3, envelope_sender="fbl@home.test"))
    assert answer.status == 200 and answer.body["success_count"] == 3, answer
    lab.wait_queue_empty()  # a DSN would be queued in the bounce's own transaction
    assert home.messages == []
    counts = call(server.http_port, "GET", "/api/v1/campaigns/spring-2026").body
    assert (counts["delivered"], counts["bounced"]) == (2, 1)
    entry = server.call(lambda: server.store.suppressed("r1@example.test"))
    assert entry is not None and entry.reason == "bounce"


def test_volley_serve_answers_http(serve: Any, tmp_path: Path) -> None:
    """A real `volley serve` (two workers, each serving the API on its own
    SO_REUSEPORT socket) binds http.listen and answers on it."""
    proc = serve(http_overrides(tmp_path / "http"))
    (http,) = [a for a in proc.listeners if a.startswith("http://")]
    port = int(http.rsplit(":", 1)[1])
    for n in range(4):  # new connections: whichever worker the kernel picks answers
        answer = inject(port, newsletter(5, campaign_id=f"c{n}"))
        assert answer.status == 200 and answer.body["success_count"] == 5, answer
        assert call(port, "GET", f"/api/v1/campaigns/c{n}").body["injected"] == 5
    assert inject(port, newsletter(1), token="x" * 20).status == 401
    # SIGHUP re-reads the tokens file in every worker; the address stays as bound.
    new_token = "rotated-token-0123456789ab"
    (tmp_path / "http" / "tokens").write_text(f"ops:{new_token}\n")
    proc.signal(signal.SIGHUP)
    for _ in range(2):
        proc.wait_for(lambda e: e.get("event") == "worker_reloaded")
    assert inject(port, newsletter(1), token=TOKEN).status == 401
    assert inject(port, newsletter(1), token=new_token).status == 200



def test_unreadable_tokens_file_stops_config_check(tmp_path: Path) -> None:
    overrides = http_overrides(tmp_path / "http")
    overrides["http"]["tokens_file"] = str(tmp_path / "missing-tokens")
    path = tmp_path / "volley.toml"
    path.write_text(tomli_w.dumps(merge(base_config(tmp_path), overrides)))
    r = subprocess.run([sys.executable, "-m", "engine", "config", "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert f"http.tokens_file: cannot read {tmp_path / 'missing-tokens'}" in r.stderr, r.stderr
