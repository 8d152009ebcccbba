"""Replies that tell the client what is wrong, over real sockets into `volley`'s inbound
server: HELP lists only what this listener offers this session, 555 names the parameter
it refuses (RFC 5321 §4.1.1.11, RFC 1869 §6), and DATA/BDAT out of order say what is
missing (a MAIL, an accepted RCPT), as RCPT before MAIL does."""

from __future__ import annotations

from pathlib import Path

from engine.inbound.users import set_user
from tests.integration.smtp_raw import RawClient, client_tls_context


def _help(c: RawClient) -> set[str]:
    r = c.cmd("HELP")
    assert (r.code, r.enhanced) == (214, "2.0.0")
    return set(r.text.split("commands:", 1)[1].split())


def test_help_lists_only_what_the_listener_offers(inbound, tls_files, tmp_path: Path) -> None:
    users = str(tmp_path / "users")
    set_user(users, "alice", "secret", ln=10)  # low cost: a fast test
    server = inbound({
        "tls": {"cert_file": tls_files["cert_file"], "key_file": tls_files["key_file"]},
        "auth": {"users_file": users},
        "listeners": [
            {"address": "127.0.0.1:0"},
            {"address": "127.0.0.1:0", "tls": "starttls", "auth": "required"},
        ],
    })
    plain, starttls_auth = server.ports
    base = {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"}
    with RawClient(plain) as c:
        offered = {line.split()[0] for line in c.ehlo().lines[1:]}  # the EHLO reply: truth
        assert not {"STARTTLS", "AUTH"} & offered
        assert _help(c) == base | {"BDAT"}  # CHUNKING offered; neither STARTTLS nor AUTH
    with RawClient(starttls_auth) as c:
        assert _help(c) == base  # before EHLO nothing is offered yet
        offered = {line.split()[0] for line in c.ehlo().lines[1:]}
        assert "STARTTLS" in offered and "AUTH" not in offered
        assert _help(c) == base | {"BDAT", "STARTTLS"}
        assert c.cmd("STARTTLS").code == 220
        c.starttls_handshake(client_tls_context(tls_files["ca_file"]))
        offered = {line.split()[0] for line in c.ehlo().lines[1:]}
        assert "AUTH" in offered and "STARTTLS" not in offered
        assert _help(c) == base | {"BDAT", "AUTH"}


def test_555_names_the_parameter_it_refuses(inbound) -> None:
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<a@example.com> FOO=bar")
        assert (r.code, r.text) == (555, "5.5.4 MAIL FROM parameter FOO not recognized")
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=100").code == 250
        r = c.cmd("RCPT TO:<b@example.org> X-TRACK")
        assert (r.code, r.text) == (555, "5.5.4 RCPT TO parameter X-TRACK not recognized")


def test_data_and_bdat_out_of_order_say_what_is_missing(inbound) -> None:
    server = inbound()
    with RawClient(server.port) as c:
        c.ehlo()
        need_mail = (503, "5.5.1 Need MAIL command first")
        r = c.cmd("RCPT TO:<b@example.org>")
        assert (r.code, r.text) == need_mail
        r = c.cmd("DATA")
        assert (r.code, r.text) == need_mail  # as RCPT before MAIL
        c.send("BDAT 5 LAST\r\nhello")  # the chunk follows regardless (RFC 3030 §2)
        r = c.reply()
        assert (r.code, r.text) == need_mail
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
        r = c.cmd("DATA")  # a sender, but no recipient yet
        assert (r.code, r.enhanced) == (554, "5.5.1")
        assert "RCPT" in r.text and "recipients" in r.text
        assert c.cmd("RCPT TO:<b@example.org>").code == 250
        assert c.cmd("DATA").code == 354  # (and the session is still sound)
