"""Per-recipient delivery outcome: replies → delivered / deferred / bounced / expired.

Pure: no I/O, no clock (``now`` is an argument). The caller commits
``Applied.record`` (mark-done per recipient right after the remote final reply, P3),
deletes the message when ``Applied.done``, builds DSNs from ``Applied.dsn_entries``
with `engine.delivery.dsn.build_dsn`, and tells the pool to back the destination
off when ``Applied.backoff``.

Rules (RFC 5321 §4.2.1, first digit of the reply code):

- 2xx → DELIVERED; 4xx → DEFERRED (retried per ``delivery.retry``); 5xx → BOUNCED.
- 1xx/3xx or a nonsense code as a *final* per-recipient reply is a protocol error by
  the remote; it is treated as DEFERRED (retrying is the safe side: at-least-once, P2).
- A deferral of a message at or past ``delivery.max_age`` becomes EXPIRED with a
  5.4.7 reply (RFC 3463 §3.5 "Delivery time expired") whose text keeps the last reply.
- ``backoff``: any reply was 421 (RFC 5321 §4.2.3 "service not available, closing
  transmission channel") or the caller says the destination failed (connection
  refused / no answer). Local connection failures built with `transient_failure`
  for those kinds carry code 421 themselves, so they trigger it too.
"""

from __future__ import annotations

import enum
import random

import msgspec

from engine.delivery.retry import deadline, expired, next_attempt
from engine.queue.records import BOUNCED, DELIVERED, EXPIRED, PENDING, MessageRecord, Recipient
from engine.smtp.replies import Reply


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"


def classify(reply: Reply) -> Verdict:
    """Verdict by the first digit of the code (never EXPIRED: that needs the message age)."""
    first = reply.code // 100
    if first == 2:
        return Verdict.DELIVERED
    if first == 5:
        return Verdict.BOUNCED
    # 4xx, and any reply that is not a legal final reply (1xx, 3xx, <100, >599).
    return Verdict.DEFERRED


# Local (non-SMTP) failures as replies. Enhanced codes from RFC 3463 §3.5 (X.4.x
# network and routing) and §3.8 (X.7.x security). kind → (code, enhanced).
# - refused / timeout: no SMTP service reachable: 421 (RFC 5321 §4.2.3), 4.4.1
#   "No answer from host" — 421 also raises the backoff flag.
# - lost: connection dropped or reset mid-session: RFC 5321 §3.8 says treat it
#   "as if a 451 response had been received"; 4.4.2 "Bad connection".
# - dns: SERVFAIL / timeout: 4.4.3 "Directory server failure" — defer, never bounce
#   (P11).
# - route: MX-to-self with a better but unusable MX: 4.4.4 "Unable to route" (P11).
# - tls_required: policy requires TLS and the host does not offer STARTTLS:
#   454 (RFC 3207 §4) with 4.7.4 "Security features not supported".
# - tls_failed: STARTTLS handshake or certificate check failed: 454, 4.7.5
#   "Cryptographic failure".
# - local: our own trouble (queue read error...): 451 4.3.0.
TRANSIENT_KINDS: dict[str, tuple[int, str]] = {
    "refused": (421, "4.4.1"),
    "timeout": (421, "4.4.1"),
    "lost": (451, "4.4.2"),
    "dns": (451, "4.4.3"),
    "route": (451, "4.4.4"),
    "tls_required": (454, "4.7.4"),
    "tls_failed": (454, "4.7.5"),
    "local": (451, "4.3.0"),
}


def transient_failure(kind: str, text: str) -> Reply:
    """A 4xx Reply for a local failure of `kind` (one of `TRANSIENT_KINDS`).

    `text` is the human explanation, e.g. "connect to mx.example.com[192.0.2.1]:25:
    Connection refused"; it becomes the reply text (and so the DSN Diagnostic-Code
    and the 5.4.7 expiry text if the message never gets further).

    Raises:
        ValueError: unknown kind.
    """
    try:
        code, enhanced = TRANSIENT_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown transient failure kind {kind!r}; "
                         f"expected one of {sorted(TRANSIENT_KINDS)}") from None
    return Reply(code, enhanced, text)


def reply_summary(reply: Reply) -> str:
    """One-line form "550 5.1.1 text": multi-line replies joined by single spaces.

    Stored as `Recipient.last_reply` and used inside the 5.4.7 expiry text.
    """
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else f"{reply.code}"
    body = " ".join(line for line in reply.lines)
    return f"{head} {body}" if body else head


def expiry_reply(last_reply: str) -> Reply:
    """The 5.4.7 reply an expired recipient bounces with (RFC 3463 §3.5 X.4.7)."""
    text = "delivery time expired"
    if last_reply:
        text += f"; last reply: {last_reply}"
    return Reply(554, "5.4.7", text)


class Applied(msgspec.Struct):
    """The result of one `apply` / `expire_pending`; lists hold recipient indexes."""

    record: MessageRecord
    delivered: list[int]
    deferred: list[int]
    bounced: list[int]  # BOUNCED and EXPIRED
    done: bool  # no PENDING recipient left: delete the message
    backoff: bool  # back the destination off (421 or destination_failed)
    replies: dict[int, Reply] = {}  # the final reply of each index changed here

    def dsn_entries(self, action: str = "failed") -> list[tuple[Recipient, Reply, str]]:
        """(recipient, reply, action) for each bounced index, in index order.

        Feed to `engine.delivery.dsn.build_dsn` (which applies NOTIFY rules itself).
        """
        return [(self.record.recipients[i], self.replies[i], action) for i in sorted(self.bounced)]


def _expire(rcpt: Recipient) -> Reply:
    """Mark `rcpt` EXPIRED; its final reply is the 5.4.7 one, quoting the last reply."""
    final = expiry_reply(rcpt.last_reply)
    rcpt.state = EXPIRED
    rcpt.last_reply = reply_summary(final)
    return final


def _copy(record: MessageRecord) -> MessageRecord:
    """A new record with new Recipient objects (the input is never mutated)."""
    return msgspec.structs.replace(
        record, recipients=[msgspec.structs.replace(r) for r in record.recipients]
    )


def apply(
    record: MessageRecord,
    results: dict[int, Reply],
    now: float,
    *,
    schedule: tuple[float, ...],
    max_age: float,
    rng: random.Random | None = None,
    destination_failed: bool = False,
) -> Applied:
    """Apply this attempt's per-recipient replies to a copy of `record`.

    `results` maps recipient index → the reply for that recipient in this attempt.
    Each attempted recipient gets ``attempts += 1`` and ``last_reply``. Deferred ones
    get ``next_attempt`` from the schedule (jittered when `rng` is given), clamped to
    the expiry deadline; if the message is already at/past ``max_age`` they become
    EXPIRED with `expiry_reply`. A 2xx or 5xx is final whatever the age.

    Only the recipients in `results` change: other PENDING recipients may be in flight
    to other destinations; the scheduler expires them with `expire_pending`. A result
    for a recipient that is no longer PENDING is ignored (a recipient already marked
    delivered is never downgraded, e.g. on a replayed batch after a crash, P3).

    Raises:
        IndexError: a result index outside the recipient list (a caller bug).
    """
    new = _copy(record)
    n = len(new.recipients)
    delivered: list[int] = []
    deferred: list[int] = []
    bounced: list[int] = []
    replies: dict[int, Reply] = {}
    backoff = destination_failed
    too_old = expired(new.received_at, now, max_age)
    limit = deadline(new.received_at, max_age)
    for i in sorted(results):
        if not 0 <= i < n:
            raise IndexError(f"result for recipient {i}, but the message has {n} recipients")
        reply = results[i]
        if reply.code == 421:
            backoff = True
        rcpt = new.recipients[i]
        if rcpt.state != PENDING:
            continue
        rcpt.attempts += 1
        rcpt.last_reply = reply_summary(reply)
        verdict = classify(reply)
        if verdict is Verdict.DELIVERED:
            rcpt.state = DELIVERED
            delivered.append(i)
        elif verdict is Verdict.BOUNCED:
            rcpt.state = BOUNCED
            bounced.append(i)
        elif too_old:
            reply = _expire(rcpt)
            bounced.append(i)
        else:
            rcpt.next_attempt = min(next_attempt(rcpt.attempts, now, schedule, rng), limit)
            deferred.append(i)
        replies[i] = reply
    done = all(r.state != PENDING for r in new.recipients)
    return Applied(new, delivered, deferred, bounced, done, backoff, replies)


def expire_pending(record: MessageRecord, now: float, max_age: float,
                   indices: list[int] | None = None) -> Applied:
    """Expire every PENDING recipient of a message at/past `max_age` (scheduler stage).

    Covers recipients never attempted (their last_reply is empty, so the 5.4.7 text
    is just "delivery time expired") and recipients waiting for a retry. A message
    younger than `max_age` comes back unchanged (a copy), with empty lists.
    `indices` limits it to those recipients: the scheduler expires one (message,
    domain) unit at a time, and other domains' recipients may be in flight.
    """
    new = _copy(record)
    bounced: list[int] = []
    replies: dict[int, Reply] = {}
    if expired(new.received_at, now, max_age):
        for i, rcpt in enumerate(new.recipients):
            if rcpt.state != PENDING or (indices is not None and i not in indices):
                continue
            replies[i] = _expire(rcpt)
            bounced.append(i)
    done = all(r.state != PENDING for r in new.recipients)
    return Applied(new, [], [], bounced, done, False, replies)
