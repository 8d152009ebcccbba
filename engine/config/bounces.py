"""The `[bounces]` section: how remote replies are classified (engine/mail/bounce_rules.py)
and which classes put a hard-bounced address on the suppression list.

Kept apart from tree.py, which imports it into `Config`. The class names live here,
beside the key that names them, so `volley config check` refuses an unknown class as
"bounces.suppress_classes[1]: ..."; the rules file itself is loaded and checked by the
startup check (engine/supervisor/startup.py), which names the file and the rule.
"""

from __future__ import annotations

import msgspec

# Every class a rule may name (and so every value of the delivery log's `class` and of
# the metrics' `class` label: a fixed set, so label cardinality stays bounded).
BOUNCE_CLASSES = (
    "bad_mailbox", "inactive_mailbox", "quota", "spam_block", "policy", "reputation",
    "rate_limited", "transient", "dns", "tls", "auth", "protocol", "expired", "suppressed",
    "other",
)
# The mailbox is gone: every tenant's mail to it would bounce the same way.
MAILBOX_CLASSES = ("bad_mailbox", "inactive_mailbox")


class BouncesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # A TOML file of [[rule]] tables tried before the shipped rules ("" = none).
    rules_file: str = ""
    # A permanent failure of one of these classes suppresses the address (with
    # suppression.auto_bounce), as does one whose enhanced code is in suppression.codes.
    suppress_classes: list[str] = msgspec.field(default_factory=lambda: list(MAILBOX_CLASSES))

    def __post_init__(self) -> None:
        for i, name in enumerate(self.suppress_classes):
            if name not in BOUNCE_CLASSES:
                raise ValueError(f'suppress_classes[{i}]: unknown class "{name}" (one of '
                                 f'{", ".join(BOUNCE_CLASSES)})')
