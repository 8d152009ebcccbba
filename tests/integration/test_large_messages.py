"""Large messages through the real process tree (issue 15): `volley serve` (two workers)
relays 100 KB and 1 KB bodies, with and without lines that start with ".", to a sink
that offers CHUNKING (BDAT, RFC 3030) and one that does not (DATA, dot-stuffed), and
each sink must store exactly the bytes the client sent, after Volley's Received:
header. A dot-stuffing mistake shows here: a dotted line the client failed to stuff
loses its dot at the DATA sink (or ends the message early), one it stuffed needlessly
keeps two at the BDAT sink.

Each message is received once (by DATA or by BDAT), recorded with what the receiver
saw of its dotted lines, and delivered to both destinations from the same record.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from engine.lab.sink.protocol import start_sink
from tests.integration.harness import wait_until
from tests.integration.smtp_client import RawSmtp, queue_id
from tests.integration.test_session import codes, fast_timeouts, make_job, open_session, run_bounded, sink_at

SENDER = "alice@home.test"
ZONE = {
    "chunk.test": {"MX": [(10, "mx.chunk.test")]},
    "mx.chunk.test": {"A": ["127.0.0.2"]},
    "plain.test": {"MX": [(10, "mx.plain.test")]},
    "mx.plain.test": {"A": ["127.0.0.3"]},
}


def relay_config(dns_port: int, sink_port: int) -> dict[str, Any]:
    return {
        "server": {"workers": 2},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "min_ttl": "1s",
                "failure_ttl": "0s", "timeout": "2s"},
        "delivery": {"enabled": True, "port": sink_port, "poll_interval": "50ms",
                     "retry": "1s", "backoff": "1s", "backoff_max": "2s",
                     "timeouts": {"connect": "3s", "data": "60s", "quit": "2s"}},
    }


def big(n_lines: int, dots: bool) -> bytes:
    """Header + n_lines of 78 octets; with `dots`, lines that start with "." at the
    first body line, in the middle (".", "..", ".x") and last."""
    lines = [b"line %06d " % i + b"x" * 66 for i in range(n_lines)]
    if dots:
        lines[0] = b".first body line"
        lines[n_lines // 3] = b"."
        lines[n_lines // 2] = b".."
        lines[n_lines // 2 + 1] = b".x middle"
        lines[-1] = b".last line"
    head = f"From: <{SENDER}>\r\nTo: <bob@chunk.test>\r\nSubject: large\r\n\r\n".encode()
    return head + b"".join(line + b"\r\n" for line in lines)


BODIES = {
    "100k": big(1300, dots=False),
    "100k-dots": big(1300, dots=True),
    "1k": big(12, dots=False),
    "1k-dots": big(12, dots=True),
}


def send(port: int, data: bytes, *, bdat: bool) -> str:
    """One message to bob@chunk.test and bob@plain.test; DATA (stuffed here, the first
    line too) or one BDAT LAST chunk. Returns the queue id."""
    with RawSmtp("127.0.0.1", port, timeout=20) as client:
        assert client.banner[0] == 220
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for rcpt in ("bob@chunk.test", "bob@plain.test"):
            assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        if bdat:
            client.send(b"BDAT %d LAST\r\n" % len(data) + data)
        else:
            assert client.cmd("DATA")[0] == 354
            client.send((b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n")
        code, text = client.reply()
        assert code == 250, (code, text)
        client.cmd("QUIT")
    return queue_id(text)


def after_received(data: bytes) -> bytes:
    """The message without the one Received: field Volley put in front (its folded
    lines start with a tab)."""
    assert data.startswith(b"Received: "), data[:80]
    at = 0
    while True:
        at = data.index(b"\r\n", at) + 2
        if not data.startswith(b"\t", at):
            return data[at:]


@pytest.mark.parametrize("bdat_in", [False, True], ids=["data-in", "bdat-in"])
def test_exact_bytes_to_a_chunking_and_a_plain_sink(serve: Any, peers: Any, dns_zone: Any,
                                                    bdat_in: bool) -> None:
    chunk = peers.call(start_sink("127.0.0.2", 0, chunking=True))
    peers.sinks.append(chunk)
    plain = peers.call(start_sink("127.0.0.3", chunk.port))
    peers.sinks.append(plain)
    dns = dns_zone(ZONE)
    server = serve(relay_config(dns.port, chunk.port))
    ids = {send(server.port, data, bdat=bdat_in): name for name, data in BODIES.items()}
    for sink in (chunk, plain):
        peers.call(sink.wait_for(len(BODIES), 60), 70)
    for sink, verb in ((chunk, "BDAT"), (plain, "DATA")):
        verbs = {v for v, _ in sink.commands}
        assert verb in verbs and ({"BDAT", "DATA"} - {verb}).isdisjoint(verbs), verbs
        assert len(sink.messages) == len(BODIES)
        got = {}
        for m in sink.messages:
            qid = next(i for i in ids if i in m.data[:400].decode("ascii", "replace"))
            got[ids[qid]] = after_received(m.data)
        for name, data in BODIES.items():
            assert got[name] == data, f"{verb} sink: {name} differs"
    assert server.stop(30) == 0, server.log[-20:]


def test_bdat_after_every_rcpt_refused_is_answered_then_rset(serve: Any, peers: Any,
                                                            dns_zone: Any) -> None:
    """RFC 3030 §2/§4.2: the pipelined chunk of a transaction whose every RCPT was refused
    is read and dropped by the server and its BDAT refused; Volley waits for that reply
    and RSET comes next (§2: it MUST clear the state), whether the connection goes on or
    the pool retires it (RSET + QUIT); the next message arrives exactly."""
    def refuse_nobody(verb: str, arg: str) -> str | None:
        return "550 5.1.1 no such user" if verb == "RCPT" and "nobody@" in arg else None

    chunk = peers.call(start_sink("127.0.0.2", 0, chunking=True, script=refuse_nobody))
    peers.sinks.append(chunk)
    dns = dns_zone(ZONE)
    config = relay_config(dns.port, chunk.port)
    config["delivery"].update(max_connections_per_domain=1, idle_timeout="1s")
    server = serve(config)
    # Its body holds command lines: read as commands they would show in chunk.commands.
    refused = BODIES["1k"] + b"QUIT\r\nMAIL FROM:<evil@x.test>\r\n"
    with RawSmtp("127.0.0.1", server.port, timeout=20) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        for rcpt, data in (("nobody@chunk.test", refused), ("bob@chunk.test", BODIES["100k-dots"])):
            assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
            assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
            client.send(b"BDAT %d LAST\r\n" % len(data) + data)
            assert client.reply()[0] == 250
        client.cmd("QUIT")
    peers.call(chunk.wait_for(1, 60), 70)
    assert [after_received(m.data) for m in chunk.messages] == [BODIES["100k-dots"]]
    nobody = ("RCPT", "TO:<nobody@chunk.test>")

    def after_refused() -> list[str]:  # the verbs from the refused RCPT on
        commands = list(chunk.commands)
        return [v for v, _ in commands[commands.index(nobody):]] if nobody in commands else []

    # What follows the refused BDAT comes at the next message or the idle timeout (1 s).
    wait_until(lambda: len(after_refused()) >= 3, 30, "the command after the refused BDAT")
    assert after_refused()[:3] == ["RCPT", "BDAT", "RSET"], chunk.commands
    assert not any("evil" in arg for _, arg in chunk.commands), chunk.commands
    assert server.stop(30) == 0, server.log[-20:]


def test_quit_after_a_refused_bdat_sends_rset_first() -> None:
    """RFC 3030 §2: RSET MUST clear a failed BDAT's state before further commands, QUIT
    included; the session still closes on the QUIT's reply (timeouts.quit is 60 s here,
    the test's bound 10 s)."""
    def refuse_all(verb: str, arg: str) -> str | None:
        return "550 5.1.1 no such user" if verb == "RCPT" else None

    async def main() -> list[tuple[str, str]]:
        sink = await sink_at(chunking=True, script=refuse_all)
        timeouts = msgspec.structs.replace(fast_timeouts(), quit=60)
        session = await open_session(sink, timeouts=timeouts)
        assert session.caps.chunking and session.caps.pipelining
        result = await session.run(make_job(["nobody@d.test"], body=BODIES["1k-dots"]))
        assert codes(result) == [550]
        await session.quit()
        assert session.closed
        return list(sink.commands)

    commands = run_bounded(main)
    assert [v for v, _ in commands] == ["EHLO", "MAIL", "RCPT", "BDAT", "RSET", "QUIT"], commands
