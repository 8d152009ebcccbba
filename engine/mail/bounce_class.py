"""Bounce classes: what kind of failure a reply was, for the delivery log, the metrics,
the campaign counters and suppression.

The classes and the rules that assign them are in bounce_rules.py / bounce_rules.toml
(RFC 3463 §3 enhanced codes, RFC 5321 §4.2 basic codes and what providers really say).
Two classes are Volley's own verdicts, never a rule's guess from the text: "expired"
(the queue lifetime ran out, whatever the last reply said) and "suppressed" (Volley
refused a recipient on its suppression list).

The worker installs its configuration's policy (`configure`, called by the delivery
runtime at start and on reload); `active()` is what the ledger, the delivery log and the
metrics classify with. The feedback intake, which has the configuration at hand, asks
`policy_for(cfg)`.
"""

from __future__ import annotations

from engine.config import Config
from engine.config.bounces import BOUNCE_CLASSES, MAILBOX_CLASSES
from engine.mail.bounce_rules import (
    BounceRulesError,
    Classifier,
    classifier,
    shipped_classifier,
)
from engine.observe import log

CLASSES = BOUNCE_CLASSES
__all__ = ["CLASSES", "MAILBOX_CLASSES", "BouncePolicy", "BounceRulesError", "active",
           "bounce_class", "configure", "policy_for"]


class BouncePolicy:
    """The compiled rules and which classes of permanent failure suppress the address."""

    __slots__ = ("classifier", "suppress_classes")

    def __init__(self, classifier: Classifier, suppress_classes: frozenset[str]) -> None:
        self.classifier = classifier
        self.suppress_classes = suppress_classes

    def classify(self, code: int, enhanced: str, text: str = "") -> str:
        return self.classifier.classify(code, enhanced, text)

    def suppresses(self, cls: str) -> bool:
        return cls in self.suppress_classes


_active: BouncePolicy | None = None
# The last configuration's policy: a reload brings a new Config object (and rereads the
# rules file); the same one is not compiled twice.
_memo: tuple[Config, BouncePolicy] | None = None


def policy_for(cfg: Config) -> BouncePolicy:
    """The policy of `cfg`: its rules file before the shipped rules, and its
    suppress_classes when suppression.auto_bounce is on (else none).

    A rules file that stopped loading since the startup check refused bad ones (edited
    in between) leaves the shipped rules in force, logged, rather than failing a worker
    or a report in the middle of its work.
    """
    global _memo
    memo = _memo
    if memo is not None and memo[0] is cfg:
        return memo[1]
    classes = frozenset(cfg.bounces.suppress_classes if cfg.suppression.auto_bounce else ())
    try:
        rules = classifier(cfg.bounces.rules_file)
    except BounceRulesError as err:
        log.error("bounce_rules_not_loaded", error=str(err))
        rules = shipped_classifier()
    policy = BouncePolicy(rules, classes)
    _memo = (cfg, policy)
    return policy


def configure(cfg: Config) -> BouncePolicy:
    """Make `cfg`'s policy the process's (the delivery runtime, at start and reload)."""
    global _active
    policy = _active = policy_for(cfg)  # one reference: readers see the old or the new
    return policy


def active() -> BouncePolicy:
    """The installed policy; before `configure`, the shipped rules and no suppression."""
    global _active
    policy = _active
    if policy is None:  # two threads racing here build the same thing: harmless
        policy = _active = BouncePolicy(shipped_classifier(), frozenset())
    return policy


def bounce_class(code: int, enhanced: str, text: str = "") -> str:
    """The class of one reply under the installed policy (never "suppressed" or
    "expired": the caller knows when those apply)."""
    return active().classify(code, enhanced, text)
