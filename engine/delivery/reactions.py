"""[[reactions]]: what a worker does when a provider's host says something that asks for
it, decided by the worker that sees the reply.

Theory of operation
-------------------
Every reply a pool sees from a provider's hosts passes through its gate's rules (the
entries whose `shaping` is the provider's name or "any", in file order; the first that
matches decides): the setup dialogue's refusals (greeting, EHLO, AUTH: pool_connect.py)
and every recipient's reply of a transaction (MAIL, RCPT, end of data: pool_react.py).
Only 4xx and 5xx replies are looked at, and not the ones Volley writes itself for a
connection that failed (refused, timed out, lost): those are not the provider's words.

- suspend: the worker writes the end of the suspension into the provider's slot of the
  shared table (shared_limits.py) under its lock, unless one is in force already, so
  two workers seeing the same refusal fire once. From then on every pool of every
  worker serving the provider opens no connection and starts no transaction: each
  pool checks the slot (one 8-byte load) where it would, and answers its queued jobs
  with a deferral that keeps them in the queue until the suspension ends.
- halve_rate: the provider's rate factor in the slot is halved (ramp.py: it holds for
  `duration`, then ramps back linearly over as long again; a halving in force halves
  again only after a quarter of the duration, at most a minute; never below 1/16).
  Every gate multiplies its rate by it, or its connection cap without a rate, or each
  pool's max_connections without either.
- bounce: the recipient's 4xx becomes a 5xx at once (`bounced`), keeping the text.

A reaction that fired is logged (`reaction_fired`) and told to the supervisor
(`notify`, a FromWorker message), which saves it, shows it in `volley ctl status` and
lifts it on `volley ctl resume NAME` (writing the slot itself, then asking each
worker which domains it deferred: `lift`, so their mail is made due again).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from engine.config.reactions import ANY, ReactionConfig
from engine.delivery.ramp import Halving
from engine.delivery.shared_limits import LimitTable
from engine.mail.bounce_class import bounce_class
from engine.observe import log
from engine.smtp.replies import Reply

HELD_DOMAINS = 10_000  # domains remembered per provider for a lift (the rest wait)
# The replies Volley makes for a failed connection (outcome.TRANSIENT_KINDS "refused",
# "timeout", "lost", "local") with the phrases only Volley writes.
_LOCAL = {(421, "4.4.1"), (451, "4.4.2"), (451, "4.3.0")}
_LOCAL_TEXT = re.compile(r"(?:connection to |not attempted|timeout waiting|cannot )")


class Rule:
    """One compiled [[reactions]] entry."""

    __slots__ = ("action", "code", "duration", "enhanced", "index", "klass", "shaping", "text")

    def __init__(self, index: int, cfg: ReactionConfig) -> None:
        self.index = index
        self.shaping = cfg.shaping
        self.action = cfg.action
        self.duration = float(cfg.duration or 0.0)
        code = str(cfg.code) if cfg.code is not None else None
        self.code = re.compile(code.replace("x", r"\d")) if code else None
        e = cfg.enhanced
        if e:
            pattern = ("[45]" if e[0] == "x" else e[0]) + re.escape(e[1:])
            self.enhanced: re.Pattern[str] | None = re.compile(
                pattern if e.endswith(".") else pattern + r"\Z")
        else:
            self.enhanced = None
        self.text = re.compile(cfg.text, re.IGNORECASE) if cfg.text else None
        self.klass = cfg.klass

    def matches(self, reply: Reply, text: str) -> bool:
        if self.code is not None and not self.code.fullmatch(str(reply.code)):
            return False
        if self.enhanced is not None and not self.enhanced.match(reply.enhanced):
            return False
        if self.text is not None and not self.text.search(text):
            return False
        return self.klass is None or bounce_class(reply.code, reply.enhanced, text) == self.klass

    @property
    def label(self) -> str:
        return f"reactions[{self.index}]"


def remote(reply: Reply) -> bool:
    """Whether `reply` may be the provider's (a 4xx/5xx Volley did not write itself)."""
    if reply.code < 400:
        return False
    return (reply.code, reply.enhanced) not in _LOCAL or not _LOCAL_TEXT.match(reply.lines[0])


def first_match(rules: Sequence[Rule], reply: Reply) -> Rule | None:
    text = " ".join(reply.lines)
    for rule in rules:
        if rule.matches(reply, text):
            return rule
    return None


def bounced(reply: Reply) -> Reply:
    """The 5xx a bounce reaction turns a 4xx into: 550, the enhanced code's class made
    permanent (RFC 3463 §3.1: the subject and detail keep their meaning), the text kept."""
    if reply.code >= 500:
        return reply
    enhanced = "5" + reply.enhanced[1:] if reply.enhanced[:2] == "4." else "5.0.0"
    return Reply(550, enhanced, reply.text)


def reply_line(reply: Reply) -> str:
    """One line: "421 4.7.0 text" (multi-line texts joined by spaces)."""
    return " ".join([str(reply.code)] + ([reply.enhanced] if reply.enhanced else [])
                    + list(reply.lines))


class Fired(NamedTuple):
    """A reaction now in force, as the supervisor is told (times: epoch seconds)."""

    provider: str
    action: str  # "suspend" | "halve_rate"
    rule: int  # the [[reactions]] index
    since: float
    until: float  # the end of the suspension, or of the ramp back to the full rate
    reply: str  # what the provider said
    factor: float  # halve_rate: the factor it fell to (1.0 for a suspension)
    hold_until: float  # halve_rate: when the ramp back begins (epoch)


class ReactionBook:
    """One worker's reactions: the compiled rules and what fired. Loop thread only."""

    def __init__(self, table: LimitTable, loop: asyncio.AbstractEventLoop) -> None:
        self.table = table
        self.loop = loop
        self.rules: tuple[Rule, ...] = ()
        self.notify: Callable[[Fired], None] | None = None  # the supervisor's pipe
        self._by_provider: dict[str, tuple[Rule, ...]] = {}
        # Domains whose mail was deferred because their provider was suspended: made
        # due again when an operator lifts the suspension (`lift`).
        self._held: dict[str, dict[str, None]] = {}

    def configure(self, reactions: Sequence[ReactionConfig]) -> None:
        self.rules = tuple(Rule(i, r) for i, r in enumerate(reactions))
        self._by_provider.clear()

    def rules_for(self, provider: str) -> tuple[Rule, ...]:
        """The entries that watch `provider` (its name, or "any"), in file order."""
        rules = self._by_provider.get(provider)
        if rules is None:
            rules = self._by_provider[provider] = tuple(
                r for r in self.rules if r.shaping in (provider, ANY))
        return rules

    def fire(self, provider: str, slot: int, rule: Rule, reply: Reply) -> bool:
        """Put `rule`'s suspend or halve_rate in force for `provider` (its slot in the
        table); False when it is in force already (nothing is logged or told)."""
        now = self.loop.time()
        wall = time.time()
        if rule.action == "suspend":
            until = now + rule.duration
            if not self.table.suspend(slot, until, now):
                return False
            halving = Halving(1.0, until, until, now)
        else:
            got = self.table.halve(slot, now, rule.duration)
            if got is None:
                return False
            halving = got
        said = reply_line(reply)
        fired = Fired(provider, rule.action, rule.index, wall, wall + halving.ramp_end - now,
                      said, halving.factor, wall + halving.hold_until - now)
        log.warning("reaction_fired", provider=provider, action=rule.action, rule=rule.label,
                    until=round(fired.until, 3), factor=round(halving.factor, 4), reply=said)
        if self.notify is not None:
            try:
                self.notify(fired)
            except Exception as err:  # the pipe is gone: the table holds the reaction anyway
                log.error("reaction_notify_failed", error=repr(err))
        return True

    def bounce(self, provider: str, rule: Rule, reply: Reply, domain: str) -> None:
        log.info("reaction_fired", provider=provider, action="bounce", rule=rule.label,
                 domain=domain, reply=reply_line(reply))

    def note_held(self, provider: str, domain: str) -> None:
        held = self._held.setdefault(provider, {})
        if domain not in held and len(held) < HELD_DOMAINS:
            held[domain] = None

    def lift(self, provider: str) -> list[str]:
        """The domains deferred while `provider` was suspended (forgotten now)."""
        return list(self._held.pop(provider, {}))
