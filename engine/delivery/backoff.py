"""A site pool's dead-destination backoff (Postfix: "dead destination", kept apart from
the concurrency feedback of pool.py).

When a connection attempt fails on every address while no session is open, or a server
says 421 (RFC 5321 §3.8), the pool backs off: for `backoff` seconds, doubling up to
`backoff_max` while it keeps failing and starting over after a connection that worked,
it opens no connection, and every queued or newly submitted job is answered at once
with the failure reply, `destination_failed=True` and `retry_after` = `until`.
"""

from __future__ import annotations

from engine.smtp.replies import Reply


class Backoff:
    """`until` (loop.time(); 0.0 when never or ended) and the reply that started it."""

    __slots__ = ("delay", "reply", "until")

    def __init__(self, first: float) -> None:
        self.until = 0.0
        self.delay = first  # the length of the next backoff
        self.reply = Reply(421, "4.4.1", "destination backing off")

    def enter(self, reply: Reply, now: float, longest: float) -> bool:
        """Back off from `now` (unless already backing off: one failure round counts
        once); `reply` is what the jobs are told. True when a new backoff began."""
        self.reply = reply
        if now < self.until:
            return False
        self.until = now + self.delay
        self.delay = min(self.delay * 2, longest)
        return True

    def restart(self, first: float, *, end: bool = False) -> None:
        """A connection worked (or an operator flushed, `end`): the next backoff lasts
        `first` seconds again; `end` also lifts the current one."""
        self.delay = first
        if end:
            self.until = 0.0
