"""The unit of delivery work handed from the scheduler to a site pool, and its result.

A Job is one message's recipients in one domain: one SMTP transaction. The pool owns
it from `submit` until it calls `done` exactly once, with a reply for every
recipient index it was given (never fewer): that is how the scheduler knows nothing
was dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from engine.dns.mx import Route
from engine.observe import log
from engine.queue.records import MessageRecord
from engine.smtp.client import Envelope
from engine.smtp.client import Recipient as EnvelopeRecipient
from engine.smtp.replies import Reply


class PoolSettings(msgspec.Struct, frozen=True):
    """Per-destination limits, from [delivery] and a matching [[routes]] entry."""

    max_connections: int = 20
    max_messages_per_connection: int = 1000
    idle_timeout: float = 10.0
    max_connection_age: float = 300.0
    port: int = 25
    tls: str = "opportunistic"  # "opportunistic" | "required" | "none"
    tls_verify: bool = False
    tls_ca_file: str = ""  # extra CA bundle (PEM) trusted when tls_verify is on
    auth_user: str = ""
    auth_password: str = ""
    # The EHLO name and the address outbound connections bind to: [delivery]'s, or the
    # [[egress]] entry's chosen for the job (egress.py); both are part of the pool's key.
    helo_name: str = "localhost"
    source_address: str = ""
    backoff: float = 60.0
    backoff_max: float = 3600.0
    rate: float = 0.0  # messages per second handed to sessions; 0 = unlimited
    # A throttled domain's pool serves that domain alone; "" = every domain of the site.
    only_domain: str = ""
    # RCPTs per transaction; a job with more is sent as several (pool_queue.split_job).
    # 0 = no limit of ours (the receiver's 452 still splits, RFC 5321 §4.5.3.1.10).
    max_recipients: int = 0
    # The [[shaping]] entry's name (shaping.py) and its server-wide limits, held across
    # every pool and worker serving that provider (shared_limits.py); "" / 0 = none.
    provider: str = ""
    provider_connections: int = 0
    provider_rate: float = 0.0  # messages per second
    provider_connect_rate: float = 0.0  # new connections per second
    # "enforce" | "testing": the domain's MTA-STS policy mode (RFC 8461), set by the
    # planner, read by connect.py; "" = none.
    mta_sts: str = ""
    # The [[routes]] entry's egress_pool ("" = none named): one input of egress.py's
    # choice, cleared in the settings it binds to a source.
    egress_pool: str = ""


class JobResult(msgspec.Struct, frozen=True):
    """What became of a job: built once, by the session or the pool that decided it."""

    # recipient index (into MessageRecord.recipients) → the reply that decided it
    replies: dict[int, Reply]
    mx_host: str = ""
    ip: str = ""
    tls: str = ""  # "TLSv1.3" etc., "" for plaintext
    # A 421, a refused connection or no reachable host: the pool backs off and the
    # scheduler should not try this destination again before `retry_after`.
    destination_failed: bool = False
    retry_after: float = 0.0  # loop.time() value; 0 = the normal retry schedule
    remote_dsn: bool = False  # the receiver advertised DSN (it takes over NOTIFY=SUCCESS)
    attempt_started: float = 0.0  # loop.time() when the transaction started
    # False: the job was handed back unsent (the pool is shutting down); it stays due
    # in the queue unchanged, with no attempt counted.
    attempted: bool = True
    # The replies are our own refusals of recipients on the suppression list.
    suppressed: bool = False


class Job:
    """One message's recipients in one domain, for one SMTP transaction."""

    __slots__ = ("record", "body", "prefix", "indices", "domain", "route", "done",
                 "needs_smtputf8", "body_8bit", "created")

    def __init__(
        self,
        record: MessageRecord,
        body: bytes,
        indices: list[int],
        domain: str,
        route: Route,
        done: Callable[[JobResult], None],
        created: float,
        prefix: bytes = b"",
    ) -> None:
        """`body` is the stored body as it is (never copied); `prefix` the header lines
        sent before it (a DKIM-Signature ending in CRLF), written with it in one
        scatter write."""
        self.record = record
        self.body = body
        self.prefix = prefix
        self.indices = indices
        self.domain = domain
        self.route = route
        self.done = done
        self.created = created
        # RFC 6531: a non-ASCII envelope address needs SMTPUTF8 from the receiver.
        self.needs_smtputf8 = record.smtputf8 and (
            not record.sender.isascii()
            or any(not record.recipients[i].address.isascii() for i in indices)
        )
        self.body_8bit = record.body_type == "8BITMIME" or not body.isascii()


def build_envelope(job: Job) -> Envelope:
    """The client Envelope for a job: its recipients in `job.indices` order.

    Raises IndexError for an index outside the record (a caller bug).
    """
    record = job.record
    recipients = record.recipients
    rcpts = []
    for i in job.indices:
        r = recipients[i]
        rcpts.append(EnvelopeRecipient(r.address, r.notify, r.orcpt))
    return Envelope(
        record.sender, rcpts, job.body,
        needs_smtputf8=job.needs_smtputf8, body_8bit=job.body_8bit,
        ret=record.ret, envid=record.envid, prefix=job.prefix, dot_lines=record.dot_lines,
    )


# RFC 3463 X.3.2 "System not accepting network messages": we are stopping. 451, not 421,
# so the scheduler does not back the destination off for our own shutdown.
R451_SHUTTING_DOWN = Reply(451, "4.3.2", "Delivery agent shutting down; will retry")


def safe_done(job: Job, result: JobResult) -> None:
    try:
        job.done(result)
    except Exception as err:  # the scheduler's bug must not break the pool
        log.error("job_done_error", domain=job.domain, error=repr(err))


def unsent(job: Job) -> JobResult:
    """The result of a job handed back unsent because the pool is closing."""
    return JobResult({i: R451_SHUTTING_DOWN for i in job.indices}, attempted=False)
