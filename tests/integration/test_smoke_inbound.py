"""The harness itself works: a message sent with smtplib is in LMDB after its 250."""

from __future__ import annotations

import smtplib

import pytest

from engine.queue.ids import id_bytes


def test_message_is_queued_before_250(inbound):
    server = inbound()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.docmd("MAIL FROM:<a@example.com>")
        assert code == 250
        assert client.docmd("RCPT TO:<b@example.org>")[0] == 250
        code, text = client.data(b"Subject: hi\r\n\r\nbody\r\n")
        assert code == 250, text
    msg_id = text.decode().rsplit(" ", 1)[1]
    record = server.call(lambda: server.store.get(id_bytes(msg_id)))
    assert record.sender == "a@example.com"
    assert [r.address for r in record.recipients] == ["b@example.org"]
    body = server.call(lambda: server.store.get_body(id_bytes(msg_id)))
    assert body.startswith(b"Received: from client.test ([127.0.0.1])")
    assert body.endswith(b"Subject: hi\r\n\r\nbody\r\n")


def test_serve_process_accepts_mail(serve):
    proc = serve()
    with smtplib.SMTP("127.0.0.1", proc.port, timeout=10) as client:
        errors = client.sendmail("a@example.com", ["b@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        assert errors == {}
    assert proc.stop() == 0


@pytest.mark.parametrize("durability", ["batch", "memory"])
def test_every_durability_level_queues_before_250(inbound, durability):
    server = inbound({"queue": {"durability": durability}})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for i in range(5):
            assert client.sendmail("a@example.com", ["b@example.org"], b"Subject: %d\r\n\r\nx\r\n" % i) == {}
    assert server.queued() == 5
