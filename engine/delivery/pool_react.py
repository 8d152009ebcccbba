"""How a site pool reacts to what its provider says ([[reactions]], reactions.py has
the theory of operation) and obeys a suspension or halving in force.

`PoolReacting` is the part of `SitePool` that does this; the attributes it declares
are the pool's own, set up by `SitePool.__init__`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from engine.delivery.job import Job, JobResult, PoolSettings, safe_done
from engine.delivery.pool_queue import JobQueue
from engine.delivery.provider_gate import ProviderGate
from engine.delivery.reactions import Rule, bounced, first_match, remote
from engine.delivery.session import DeliverySession
from engine.smtp.replies import Reply

# Setup failures that carry the provider's own reply (dialogue.SetupError.kind); the
# others ("connect", TLS) are Volley's account of a failed connection.
_SPOKEN = ("greeting", "ehlo", "auth", "protocol")


def held_reply(provider: str, until: float) -> Reply:
    """The deferral of mail held by a suspension (RFC 3463 X.4.5 "mail system
    congestion": the provider asked us to stop sending for a while)."""
    when = time.strftime("%H:%M:%SZ", time.gmtime(until))
    return Reply(451, "4.4.5", f"provider {provider} suspended by a reaction until {when}")


class PoolReacting:
    settings: PoolSettings
    loop: asyncio.AbstractEventLoop
    gate: ProviderGate | None
    _queue: JobQueue
    _idle: list[DeliverySession]

    def _retire(self, session: DeliverySession) -> None:
        raise NotImplementedError

    def _react(self, job: Job, result: JobResult) -> JobResult:
        """`result` after the provider's [[reactions]]: a bounce rule makes its
        recipients' 4xx a 5xx; a suspend or halve_rate rule fires (once: the table
        says whether one is in force). Recipients still deferred wait for the end of a
        suspension in force."""
        gate = self.gate
        if gate is None or not gate.rules or gate.book is None:
            return result
        replies = result.replies
        changed: dict[int, Reply] | None = None
        seen: dict[int, Rule | None] = {}  # id(reply) → its rule: one reply, many recipients
        for i, reply in replies.items():
            if reply.code < 400:
                continue
            key = id(reply)
            if key not in seen:
                seen[key] = first_match(gate.rules, reply) if remote(reply) else None
                rule = seen[key]
                if rule is not None and rule.action != "bounce" and gate.rslot is not None:
                    gate.book.fire(gate.name, gate.rslot, rule, reply)
                elif rule is not None and reply.code < 500:
                    gate.book.bounce(gate.name, rule, reply, job.domain)
            rule = seen[key]
            if rule is not None and rule.action == "bounce" and reply.code < 500:
                if changed is None:
                    changed = dict(replies)
                changed[i] = bounced(reply)
        if changed is not None:
            result = msgspec.structs.replace(result, replies=changed)
        until = gate.suspended()
        if until and any(r.code // 100 == 4 for r in result.replies.values()):
            gate.book.note_held(gate.name, job.domain)
            result = msgspec.structs.replace(result, retry_after=max(result.retry_after, until))
        return result

    def _react_setup(self, reply: Reply, kind: str) -> None:
        """A setup dialogue refused (greeting, EHLO, AUTH): suspend and halve_rate
        rules may fire (a bounce has no recipient here)."""
        gate = self.gate
        if gate is None or not gate.rules or gate.book is None or gate.rslot is None:
            return
        if kind not in _SPOKEN or not remote(reply):
            return
        rule = first_match(gate.rules, reply)
        if rule is not None and rule.action != "bounce":
            gate.book.fire(gate.name, gate.rslot, rule, reply)

    def _suspended(self) -> float:
        """The end of the provider's suspension (loop.time()), 0.0 when none."""
        gate = self.gate
        return gate.suspended() if gate is not None else 0.0

    def _hold(self, job: Job, until: float) -> None:
        """Answer a job of a suspended provider: deferred until the suspension ends,
        nothing sent (its recipients stay queued)."""
        gate = self.gate
        assert gate is not None
        if gate.book is not None:
            gate.book.note_held(gate.name, job.domain)
        reply = held_reply(gate.name, time.time() + until - self.loop.time())
        safe_done(job, JobResult({i: reply for i in job.indices}, retry_after=until,
                                 attempt_started=self.loop.time()))

    def _hold_all(self, until: float) -> None:
        """The provider is suspended: every queued job deferred, idle sessions QUIT."""
        while self._queue:
            self._hold(self._queue.pop(), until)
        while self._idle:
            self._retire(self._idle.pop())

    def _max_connections(self) -> int:
        """max_connections, scaled by a halve_rate in force when the provider has
        neither a rate nor a cap for the halving to act on."""
        limit = self.settings.max_connections
        gate = self.gate
        if gate is None or gate.rate or gate.cap or not gate.rules:
            return limit
        factor = gate.factor()
        return limit if factor >= 1.0 else max(1, int(limit * factor))
