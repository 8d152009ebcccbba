"""Suppression at RCPT for SMTP injection: a recipient on the shared list gets
550 5.7.1 (RFC 3463 X.7.1, delivery not authorized) naming the reason, the others of the
transaction are taken; the list lives in the queue, so it holds across a restart of
the server, in process and as `volley serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.mail import verp
from engine.queue import suppression
from tests.feedback_reports import dsn
from tests.integration.feedback_helpers import FBL, FEEDBACK, report, sent_to, token, transaction
from tests.integration.harness import InboundServer
from tests.integration.smtp_client import connect_until_banner

GONE = "gone.away@example.org"
UNKNOWN = f"550 5.1.1 <{GONE}>: Recipient address rejected: User unknown"


def _add(server: InboundServer, *entries: suppression.Suppression) -> None:
    server.call(lambda: server.store.write_one(lambda w: suppression.add(w, entries)))


def test_a_suppressed_recipient_is_refused_at_rcpt(inbound: Any) -> None:
    server = inbound()
    _add(server,
         suppression.make(GONE, "bounce", source=UNKNOWN),
         suppression.make("dead.example", "manual", source="ctl"),
         suppression.make("only.acme@example.org", "complaint", tenant="acme"))
    rcpts = [GONE, "Gone.Away@EXAMPLE.org", "anyone@dead.example", "only.acme@example.org",
             "fine@example.org"]
    replies = transaction(server.port, rcpts, b"Subject: hi\r\n\r\nhi\r\n", sender="a@volley.test")
    assert replies[1:6] == [
        (550, f"5.7.1 <{GONE}>: recipient is suppressed (bounce)"),
        (550, "5.7.1 <Gone.Away@EXAMPLE.org>: recipient is suppressed (bounce)"),
        (550, "5.7.1 <anyone@dead.example>: recipient is suppressed (manual)"),
        # A tenant's own entry is applied at delivery: the tenant is named in DATA.
        (250, "2.1.5 Recipient OK"),
        (250, "2.1.5 Recipient OK"),
    ], replies
    assert replies[-1][0] == 250
    [record] = server.call(lambda: [server.store.get(i) for i in server.store.iter_ids()])
    assert [r.address for r in record.recipients] == ["only.acme@example.org", "fine@example.org"]


def _bounce_gone(port: int) -> None:
    to = verp.verp_address(FBL, token(GONE))
    assert report(port, to, dsn(to, sent_to(GONE), [(GONE, "failed", "5.1.1", UNKNOWN)]))[0] == 250


def _refused(port: int) -> tuple[int, str]:
    client = connect_until_banner("127.0.0.1", port)
    with client:
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd("MAIL FROM:<news@volley.test>")[0] == 250
        return client.cmd(f"RCPT TO:<{GONE}>")


def test_a_late_bounce_suppresses_and_holds_across_a_restart(tmp_path: Path) -> None:
    server = InboundServer(tmp_path, FEEDBACK)
    try:
        assert _refused(server.port)[0] == 250
        _bounce_gone(server.port)
        assert _refused(server.port) == (550, f"5.7.1 <{GONE}>: recipient is suppressed (bounce)")
    finally:
        server.stop()
    again = InboundServer(tmp_path, FEEDBACK)  # the same queue directory
    try:
        assert _refused(again.port) == (550, f"5.7.1 <{GONE}>: recipient is suppressed (bounce)")
        assert again.call(lambda: again.store.suppressed(GONE)).reason == "bounce"
    finally:
        again.stop()


def test_volley_serve_keeps_the_list_across_a_restart(serve: Any, tmp_path: Path) -> None:
    first = serve(FEEDBACK)
    _bounce_gone(first.port)
    # Two workers: every connection, whichever worker takes it, reads the one list.
    for _ in range(4):
        assert _refused(first.port)[0] == 550
    queue_path = str(tmp_path / "p0" / "queue")
    assert first.stop() == 0
    second = serve({**FEEDBACK, "queue": {"path": queue_path}})
    for _ in range(4):
        assert _refused(second.port) == (550, f"5.7.1 <{GONE}>: recipient is suppressed (bounce)")
