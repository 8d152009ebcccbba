"""One SMTP connection to the peer a queue is handed to (`volley ctl drain --to`).

The setup dialogue is delivery's (engine/delivery/dialogue.py: greeting, EHLO, STARTTLS
when offered unless tls="none", AUTH only under TLS); each message is one pure
`engine.smtp.client.Transaction`: with PIPELINING its MAIL, RCPTs and DATA (or BDAT)
leave in one write (RFC 2920). The peer must offer DSN (RFC 3461), or NOTIFY, ORCPT,
RET and ENVID would be dropped on the way: without it nothing is sent.
"""

from __future__ import annotations

import asyncio
import ssl

from engine.config import TimeoutsConfig
from engine.delivery.dialogue import SetupConnection, SetupError, setup
from engine.delivery.job import PoolSettings
from engine.delivery.outcome import reply_summary
from engine.queue.records import PENDING, MessageRecord
from engine.smtp.client import (
    QUIT,
    ClientProtocolError,
    Envelope,
    Recipient,
    Transaction,
)
from engine.smtp.replies import Reply

R451_LOST = Reply(451, "4.4.2", "connection to the peer lost")
R451_TIMEOUT = Reply(451, "4.4.1", "timeout waiting for the peer")
R550_NO_DSN = Reply(550, "5.5.4", "the peer does not offer DSN (RFC 3461): nothing handed over")


class PeerError(Exception):
    """The connection cannot be used (setup failed, or the peer lacks DSN)."""


def envelope(rec: MessageRecord, body: bytes) -> tuple[Envelope, list[int]]:
    """The transaction for `rec`'s PENDING recipients (their record indexes, in order),
    with the original sender and DSN parameters."""
    indices = [i for i, r in enumerate(rec.recipients) if r.state == PENDING]
    rcpts = [Recipient(rec.recipients[i].address, rec.recipients[i].notify,
                       rec.recipients[i].orcpt) for i in indices]
    utf8 = rec.smtputf8 and (not rec.sender.isascii()
                             or any(not r.address.isascii() for r in rcpts))
    env = Envelope(rec.sender, rcpts, body, needs_smtputf8=utf8,
                   body_8bit=rec.body_type == "8BITMIME" or not body.isascii(),
                   ret=rec.ret, envid=rec.envid)
    return env, indices


class PeerConnection:
    """A session with the peer, ready for `send` after `open`."""

    def __init__(self, host: str, port: int, settings: PoolSettings, timeouts: TimeoutsConfig,
                 tls_context: ssl.SSLContext | None) -> None:
        self.host, self.port = host, port
        self.settings = settings
        self.timeouts = timeouts
        self.tls_context = tls_context
        self.conn: SetupConnection | None = None
        self.sent = 0
        self.needs_rset = False

    @property
    def usable(self) -> bool:
        return self.conn is not None and not self.conn.closed

    async def open(self) -> None:
        """Connect and run the setup dialogue.

        Raises:
            PeerError: refused, timed out, the dialogue failed, or no DSN offered.
        """
        loop = asyncio.get_running_loop()
        conn = SetupConnection(self.host, self.host, self.port, loop)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, self.host, self.port),
                                   float(self.timeouts.connect))
            await setup(conn, self.settings, self.timeouts, self.tls_context)
        except (OSError, TimeoutError) as err:
            conn.abort()
            raise PeerError(f"cannot connect to {self.host}:{self.port}: {err or 'timeout'}") from None
        except SetupError as err:
            conn.abort()
            raise PeerError(f"{self.host}:{self.port}: {err}") from None
        if not conn.caps.dsn:
            conn.abort()
            raise PeerError(f"{self.host}:{self.port}: {reply_summary(R550_NO_DSN)}")
        self.conn, self.sent, self.needs_rset = conn, 0, False

    async def send(self, env: Envelope) -> list[Reply]:
        """One transaction; one reply per recipient (2xx: the peer has it). A lost
        connection or a timeout answers 451 for every undecided recipient and closes."""
        conn = self.conn
        assert conn is not None
        tx = Transaction(env, conn.caps, first_on_connection=self.sent == 0,
                         needs_rset=self.needs_rset)
        self.sent += 1
        if tx.precheck() is not None:
            return tx.outcomes
        conn.write_raw(tx.initial_bytes())
        t = self.timeouts
        limits = {"rset": t.mail, "mail": t.mail, "rcpt": t.rcpt, "data": t.data,
                  "data_end": t.data_end}
        try:
            while not tx.done:
                # A pipelined group's replies share one deadline: the sum of theirs.
                limit = sum(float(limits[p]) for p in tx.pending_phases)
                reply = await conn.read_reply(limit, f"the reply to {(tx.phase or '').upper()}")
                more = tx.on_reply(reply)
                if more:
                    conn.write_raw(more)
        except SetupError as err:  # timeout, lost, or a malformed reply
            tx.abort(err.reply)
        except ClientProtocolError:
            pass  # the transaction is done, unclean: every undecided recipient has a 451
        if not tx.clean:
            self.close()
        self.needs_rset = not tx.clean
        return tx.outcomes

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            conn.write_raw(QUIT)
            if conn.transport is not None:
                conn.transport.close()  # after the QUIT is written
