"""TLS (STARTTLS and implicit, real handshakes against a trustme CA), AUTH PLAIN and
LOGIN against a real scrypt users file, and relay control (P6, P7)."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

import pytest

from engine.inbound.users import set_user
from engine.queue.ids import id_bytes
from engine.queue.records import domain_of
from tests.integration.smtp_raw import (
    SMTP,
    SMTP_SSL,
    RawClient,
    client_tls_context,
    queue_id,
)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


PLAIN_GOOD = b64("\0alice\0secret")
PLAIN_BAD = b64("\0alice\0wrong")


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = str(tmp_path / "users")
    set_user(path, "alice", "secret", ln=10)  # low cost: fast tests
    return path


def _tls(tls_files):
    return {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]}


def _record(server, msg_id):
    return server.call(lambda: server.store.get(id_bytes(msg_id)))


def _body(server, msg_id):
    return server.call(lambda: server.store.get_body(id_bytes(msg_id)))


# --- capabilities per listener ---------------------------------------------------------
def test_capabilities_per_listener(inbound, tls_files, users_file):
    server = inbound({
        "tls": _tls(tls_files),
        "auth": {"users_file": users_file},
        "listeners": [
            {"address": "127.0.0.1:0"},
            {"address": "127.0.0.1:0", "tls": "starttls"},
            {"address": "127.0.0.1:0", "auth": "optional"},
            {"address": "127.0.0.1:0", "auth": "optional", "allow_plaintext_auth": True},
            {"address": "127.0.0.1:0", "tls": "starttls", "auth": "required"},
        ],
    })
    plain, starttls, auth_no_plain, auth_plain, starttls_auth = server.ports

    def caps(port):
        with RawClient(port) as c:
            return set(c.ehlo().lines[1:])

    assert not {"STARTTLS", "AUTH PLAIN LOGIN"} & caps(plain)
    got = caps(starttls)
    assert "STARTTLS" in got and "AUTH PLAIN LOGIN" not in got
    assert "AUTH PLAIN LOGIN" not in caps(auth_no_plain)
    got = caps(auth_plain)
    assert "AUTH PLAIN LOGIN" in got and "STARTTLS" not in got
    # Before TLS: STARTTLS, no AUTH. After: AUTH, no STARTTLS.
    with RawClient(starttls_auth) as c:
        got = set(c.ehlo().lines[1:])
        assert "STARTTLS" in got and not any(x.startswith("AUTH") for x in got)
        assert c.cmd("STARTTLS").code == 220
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        got = set(c.ehlo().lines[1:])
        assert "AUTH PLAIN LOGIN" in got and "STARTTLS" not in got


# --- implicit TLS ---------------------------------------------------------------------------
def test_implicit_tls_queues_with_esmtps(inbound, tls_files):
    server = inbound({
        "tls": _tls(tls_files),
        "listeners": [{"address": "127.0.0.1:0", "tls": "implicit"}],
    })
    ctx = client_tls_context(tls_files["ca_file"])
    with SMTP_SSL(server.port, context=ctx) as client:
        code, _ = client.ehlo("tls.client")
        assert code == 250
        assert not client.has_extn("starttls")
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert client.docmd("MAIL FROM:<a@example.com>")[0] == 250
        assert client.docmd("RCPT TO:<b@example.org>")[0] == 250
        code, text = client.data(b"Subject: implicit\r\n\r\nwrapped\r\n")
        assert code == 250, text
    msg_id = queue_id(text)
    body = _body(server, msg_id)
    assert b"Received: from tls.client ([127.0.0.1])" in body
    assert f" with ESMTPS id {msg_id}".encode() in body
    assert b"(using TLSv1." in body
    assert server.queued() == 1


def test_implicit_tls_refuses_a_plaintext_client(inbound, tls_files):
    server = inbound({
        "tls": _tls(tls_files),
        "listeners": [{"address": "127.0.0.1:0", "tls": "implicit"}],
    })
    with RawClient(server.port, banner=False) as c:
        c.send(b"EHLO plain.client\r\n")
        # No SMTP reply in plaintext: the handshake fails and the server closes.
        got = c.expect_closed()
        assert not got.startswith(b"2"), got
    assert server.queued() == 0


def test_starttls_with_smtplib(inbound, tls_files):
    server = inbound({
        "tls": _tls(tls_files),
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls"}],
    })
    with SMTP(server.port) as client:
        client.ehlo("c.test")
        code, _ = client.starttls(context=client_tls_context(tls_files["ca_file"]))
        assert code == 220
        client.ehlo("c.test")
        assert not client.has_extn("starttls")
        assert client.sendmail("a@example.com", ["b@example.org"], b"Subject: s\r\n\r\nx\r\n") == {}
    assert server.queued() == 1


def test_starttls_client_rejects_an_untrusted_certificate(inbound, tls_files):
    """The test CA is what makes the handshake pass: a client trusting nothing fails."""
    import ssl

    server = inbound({
        "tls": _tls(tls_files),
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls"}],
    })
    with SMTP(server.port) as client:
        client.ehlo("c.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())
    # The server is fine afterwards.
    with RawClient(server.port) as c:
        assert c.ehlo().code == 250


# --- AUTH ------------------------------------------------------------------------------------
@pytest.fixture
def auth_server(inbound, users_file):
    def start(**limits):
        return inbound({
            "auth": {"users_file": users_file},
            "limits": limits,
            "listeners": [{"address": "127.0.0.1:0", "auth": "required",
                           "allow_plaintext_auth": True}],
        })
    return start


def test_auth_required_plain(auth_server):
    server = auth_server()
    with RawClient(server.port) as c:
        assert "AUTH PLAIN LOGIN" in c.ehlo().lines
        r = c.cmd("MAIL FROM:<a@example.com>")
        assert (r.code, r.enhanced) == (530, "5.7.0"), r
        r = c.cmd(f"AUTH PLAIN {PLAIN_BAD}")
        assert (r.code, r.enhanced) == (535, "5.7.8"), r
        r = c.cmd(f"AUTH PLAIN {PLAIN_GOOD}")
        assert (r.code, r.enhanced) == (235, "2.7.0"), r
        r = c.cmd(f"AUTH PLAIN {PLAIN_GOOD}")
        assert (r.code, r.enhanced) == (503, "5.5.1"), r
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [x.code for x in c.replies(3)] == [250, 250, 354]
        c.send(b"Subject: a\r\n\r\nauthed\r\n.\r\n")
        done = c.reply()
        assert done.code == 250
    msg_id = queue_id(done.text)
    assert _record(server, msg_id).auth_user == "alice"
    assert b" with ESMTPA id " in _body(server, msg_id)


def test_auth_plain_with_empty_initial_response(auth_server):
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd("AUTH PLAIN")
        assert r.code == 334 and r.lines == [""], r
        r = c.cmd(PLAIN_GOOD)
        assert (r.code, r.enhanced) == (235, "2.7.0"), r


def test_auth_login_two_challenges(auth_server):
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd("AUTH LOGIN")
        assert r.code == 334 and base64.b64decode(r.lines[0]) == b"Username:", r
        r = c.cmd(b64("alice"))
        assert r.code == 334 and base64.b64decode(r.lines[0]) == b"Password:", r
        r = c.cmd(b64("secret"))
        assert (r.code, r.enhanced) == (235, "2.7.0"), r
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250


def test_auth_login_with_smtplib(auth_server):
    server = auth_server()
    with SMTP(server.port) as client:
        client.ehlo("c.test")
        client.user, client.password = "alice", "secret"
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        assert client.sendmail("a@example.com", ["b@example.org"], b"Subject: l\r\n\r\nx\r\n") == {}
    assert server.queued() == 1


def test_auth_cancel_and_bad_base64(auth_server):
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("AUTH LOGIN").code == 334
        r = c.cmd("*")
        assert r.code == 501, r
        r = c.cmd("AUTH PLAIN !!!notbase64")
        assert (r.code, r.enhanced) == (501, "5.5.2"), r
        r = c.cmd("AUTH CRAM-MD5")
        assert (r.code, r.enhanced) == (504, "5.5.4"), r
        # Back at command level; still unauthenticated.
        assert c.cmd("MAIL FROM:<a@example.com>").code == 530
        assert c.cmd(f"AUTH PLAIN {PLAIN_GOOD}").code == 235


def test_repeated_auth_failures_close_the_session(auth_server):
    server = auth_server(max_auth_failures=2)
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd(f"AUTH PLAIN {PLAIN_BAD}")
        assert (r.code, r.enhanced) == (535, "5.7.8"), r
        r = c.cmd(f"AUTH PLAIN {b64(chr(0) + 'nobody' + chr(0) + 'x')}")
        assert (r.code, r.enhanced) == (421, "4.7.0"), r
        assert c.expect_closed() == b""
    # Other sessions are unaffected.
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {PLAIN_GOOD}").code == 235


def test_pipelined_commands_wait_for_the_auth_verdict(auth_server):
    """Commands pipelined behind AUTH run after the (slow, threaded) password check,
    in order, with its outcome."""
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(f"AUTH PLAIN {PLAIN_GOOD}\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n".encode())
        got = c.replies(3)
        assert [r.code for r in got] == [235, 250, 250], got


def test_auth_on_plaintext_listener_without_permission(inbound, users_file):
    server = inbound({
        "auth": {"users_file": users_file},
        "listeners": [{"address": "127.0.0.1:0", "auth": "optional"}],
    })
    with RawClient(server.port) as c:
        assert not any(x.startswith("AUTH") for x in c.ehlo().lines)
        r = c.cmd(f"AUTH PLAIN {PLAIN_GOOD}")
        assert (r.code, r.enhanced) == (538, "5.7.11"), r
        r = c.cmd("AUTH LOGIN")
        assert (r.code, r.enhanced) == (538, "5.7.11"), r
        # The password was never checked: no 235 and no failure count.
        assert c.cmd("NOOP").code == 250


def test_auth_on_listener_without_auth(inbound, users_file):
    server = inbound({"auth": {"users_file": users_file}})
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd(f"AUTH PLAIN {PLAIN_GOOD}")
        assert (r.code, r.enhanced) == (502, "5.5.1"), r


def test_auth_after_starttls(inbound, tls_files, users_file):
    server = inbound({
        "tls": _tls(tls_files),
        "auth": {"users_file": users_file},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls", "auth": "required"}],
    })
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd(f"AUTH PLAIN {PLAIN_GOOD}")
        assert (r.code, r.enhanced) == (538, "5.7.11"), r
        assert c.cmd("MAIL FROM:<a@example.com>").code == 530
        assert c.cmd("STARTTLS").code == 220
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        assert "AUTH PLAIN LOGIN" in c.ehlo().lines
        r = c.cmd(f"AUTH PLAIN {PLAIN_GOOD}")
        assert (r.code, r.enhanced) == (235, "2.7.0"), r
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [x.code for x in c.replies(3)] == [250, 250, 354]
        c.send(b"Subject: sa\r\n\r\nboth\r\n.\r\n")
        done = c.reply()
        assert done.code == 250
    msg_id = queue_id(done.text)
    assert _record(server, msg_id).auth_user == "alice"
    assert b" with ESMTPSA id " in _body(server, msg_id)


def test_smtplib_login_after_starttls(inbound, tls_files, users_file):
    server = inbound({
        "tls": _tls(tls_files),
        "auth": {"users_file": users_file},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls", "auth": "required"}],
    })
    with SMTP(server.port) as client:
        client.starttls(context=client_tls_context(tls_files["ca_file"]))
        client.ehlo("c.test")
        code, _ = client.login("alice", "secret")
        assert code == 235
        assert client.sendmail("a@example.com", ["b@example.org"], b"Subject: x\r\n\r\ny\r\n") == {}
    with SMTP(server.port) as client:
        client.starttls(context=client_tls_context(tls_files["ca_file"]))
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login("alice", "nope")
        assert err.value.smtp_code == 535
    assert server.queued() == 1


# --- relay control (P7) ------------------------------------------------------------------------
RELAY = {"relay": {"networks": ["10.0.0.0/8"], "local_domains": ["local.test"]}}


@pytest.mark.parametrize(
    ("address", "code"),
    [
        ("user@local.test", 250),
        ("USER@LOCAL.TEST", 250),
        ("user@elsewhere.test", 554),
        ("user@sub.local.test", 554),
        ("user@local.test.elsewhere.test", 554),
        # Only the domain after the last "@" counts: these stay local.
        ("user%elsewhere.test@local.test", 250),
        ("elsewhere.test!user@local.test", 250),
        ('"user@elsewhere.test"@local.test', 250),
        # Source route: ignored (RFC 5321 §3.3), so the real domain is elsewhere.test.
        ("@local.test:user@elsewhere.test", 554),
        ("@local.test,@local.test:user@elsewhere.test", 554),
        # The reverse: a route through elsewhere to a local mailbox is local.
        ("@elsewhere.test:user@local.test", 250),
        ("user%local.test@elsewhere.test", 554),
        ('"user@local.test"@elsewhere.test', 554),
        ("user@[127.0.0.1]", 554),
    ],
)
def test_relay_control_for_untrusted_client(inbound, address, code):
    server = inbound(RELAY)
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        r = c.cmd(f"RCPT TO:<{address}>")
        assert r.code == code, (address, r)
        if code == 554:
            assert r.enhanced == "5.7.1", r
            return
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: r\r\n\r\nx\r\n.\r\n")
        done = c.reply()
        assert done.code == 250
    # Stored exactly as given, and its delivery domain is the local one.
    rcpt = _record(server, queue_id(done.text)).recipients[0].address
    assert domain_of(rcpt) == "local.test"


def test_authenticated_client_may_relay(inbound, users_file):
    server = inbound(RELAY | {
        "auth": {"users_file": users_file},
        "listeners": [{"address": "127.0.0.1:0", "auth": "optional", "allow_plaintext_auth": True}],
    })
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        assert c.cmd("RCPT TO:<user@elsewhere.test>").code == 554
        assert c.cmd("RSET").code == 250
        assert c.cmd(f"AUTH PLAIN {PLAIN_GOOD}").code == 235
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        assert c.cmd("RCPT TO:<user@elsewhere.test>").code == 250
        assert c.cmd("RCPT TO:<user@local.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: r\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250


def test_trusted_network_may_relay(inbound):
    server = inbound({"relay": {"networks": ["127.0.0.0/8"], "local_domains": ["local.test"]}})
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        assert c.cmd("RCPT TO:<user@elsewhere.test>").code == 250


def test_plain_authzid_must_match(auth_server):
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd(f"AUTH PLAIN {b64(chr(0).join(['bob', 'alice', 'secret']))}")
        assert (r.code, r.enhanced) == (501, "5.5.2"), r
        assert c.cmd("MAIL FROM:<a@example.com>").code == 530
        r = c.cmd(f"AUTH PLAIN {b64(chr(0).join(['alice', 'alice', 'secret']))}")
        assert (r.code, r.enhanced) == (235, "2.7.0"), r


def test_auth_before_starttls_is_forgotten_after_it(inbound, tls_files, users_file):
    """P6 / RFC 3207 §4.2: the server discards all knowledge from before TLS,
    including a plaintext AUTH."""
    server = inbound({
        "tls": _tls(tls_files),
        "auth": {"users_file": users_file},
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls", "auth": "required",
                       "allow_plaintext_auth": True}],
    })
    with RawClient(server.port) as c:
        assert "AUTH PLAIN LOGIN" in c.ehlo().lines
        assert c.cmd(f"AUTH PLAIN {PLAIN_GOOD}").code == 235
        assert c.cmd("STARTTLS").code == 220
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        c.ehlo()
        r = c.cmd("MAIL FROM:<a@example.com>")
        assert (r.code, r.enhanced) == (530, "5.7.0"), r
        assert c.cmd(f"AUTH PLAIN {PLAIN_GOOD}").code == 235
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250


def test_starttls_pipelined_behind_a_commit_drops_the_injection(inbound, tls_files):
    """STARTTLS that runs only after a queue commit (the machine was paused on it)
    still drops what was pipelined behind it."""
    server = inbound({
        "tls": _tls(tls_files),
        "listeners": [{"address": "127.0.0.1:0", "tls": "starttls"}],
    })
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: before tls\r\n\r\nx\r\n.\r\n"
            b"STARTTLS\r\n"
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
        )
        got = c.replies(5)
        assert [r.code for r in got] == [250, 250, 354, 250, 220], got
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        c.ehlo()
        assert c.cmd("NOOP").text == "2.0.0 OK"
        assert c.cmd("RCPT TO:<b@example.org>").code == 503
    assert server.queued() == 1


def test_auth_login_fully_pipelined(auth_server):
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        c.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64('secret')}\r\nMAIL FROM:<a@example.com>\r\n".encode())
        got = c.replies(4)
        assert [r.code for r in got] == [334, 334, 235, 250], got


def test_overlong_sasl_line_ends_the_exchange(auth_server):
    """RFC 4954 §4 allows 12288 octets per SASL line; beyond that the exchange is
    refused and the client's next line is a command again."""
    server = auth_server()
    with RawClient(server.port) as c:
        c.ehlo()
        assert c.cmd("AUTH LOGIN").code == 334
        c.send(b"QUFB" * 5000)
        c.send(b"\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (500, "5.5.2"), r
        assert c.cmd("NOOP").code == 250
        assert c.cmd("MAIL FROM:<a@example.com>").code == 530
        assert c.cmd(f"AUTH PLAIN {PLAIN_GOOD}").code == 235
