"""The `[[reactions]]` entries: what Volley does when a provider says something
(engine/delivery/reactions.py matches and fires them, engine/delivery/shared_limits.py
holds their effect across workers).

Kept apart from tree.py, which imports them into `Config`. Each entry names the
[[shaping]] entry it watches (`shaping`, its name, or "any"), what a reply must look
like (any of `code`, `enhanced`, `text`, `class`; all that are given must match) and
what to do: "suspend" the provider, "halve_rate" its rate, or "bounce" the recipient
at once. The matcher syntax is the bounce rules' (engine/mail/bounce_rules.py):
`code` "421" or "4xx", `enhanced` "4.7.0", a prefix "4.7." or "x.7.0", `text` a
regular expression searched case-insensitively in the reply text. The loader turns a
ValueError("key: problem") into "reactions[2].key: problem".
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from engine.config.bounces import BOUNCE_CLASSES
from engine.config.units import Duration

ACTIONS = ("suspend", "halve_rate", "bounce")
ANY = "any"
_CODE = re.compile(r"[2-5x][0-9x]{2}")
_ENHANCED = re.compile(r"[245x]\.(?:\d{1,3}\.(?:\d{1,3})?)?")


class ReactionConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    shaping: str  # a [[shaping]] entry's name (its label), or "any"
    action: Literal["suspend", "halve_rate", "bounce"]
    code: str | int | None = None  # "421", "4xx", 421
    enhanced: str | None = None  # "4.7.0", "4.7.", "x.7.0"
    text: str | None = None  # a regular expression, searched case-insensitively
    klass: str | None = msgspec.field(default=None, name="class")  # a bounce class
    # How long a suspension or a halving lasts (a halved rate then ramps back over as
    # long again); bounce takes none.
    duration: Duration | None = None

    def __post_init__(self) -> None:
        if not self.shaping:
            raise ValueError('shaping: name a [[shaping]] entry, or "any"')
        if all(v is None for v in (self.code, self.enhanced, self.text, self.klass)):
            raise ValueError("code: give at least one of code, enhanced, text, class")
        if self.code is not None and not (
                isinstance(self.code, str | int) and not isinstance(self.code, bool)
                and _CODE.fullmatch(str(self.code))):
            raise ValueError(f'code: expected a reply code such as "421" or "4xx", got {self.code!r}')
        if self.enhanced is not None and not _ENHANCED.fullmatch(self.enhanced):
            raise ValueError(f'enhanced: expected an enhanced code such as "4.7.0", a prefix '
                             f'such as "4.7." or "x.7.0", got {self.enhanced!r}')
        if self.text is not None:
            if not self.text:
                raise ValueError("text: expected a regular expression, got an empty string")
            try:
                re.compile(self.text, re.IGNORECASE)
            except re.error as err:
                raise ValueError(f"text: bad regular expression: {err}") from None
        if self.klass is not None and self.klass not in BOUNCE_CLASSES:
            raise ValueError(f'class: unknown class "{self.klass}" (one of '
                             f'{", ".join(BOUNCE_CLASSES)})')
        if self.action == "bounce":
            if self.duration is not None:
                raise ValueError("duration: a bounce takes no duration")
        elif self.duration is None or self.duration <= 0:
            raise ValueError(f'duration: {self.action} needs a duration such as "30m"')


def check_reactions(reactions: list[ReactionConfig], shaping_names: set[str]) -> None:
    """Across sections: each entry's `shaping` names an entry (or is "any").

    Raises ValueError("reactions[i].shaping: problem").
    """
    for i, r in enumerate(reactions):
        if r.shaping != ANY and r.shaping not in shaping_names:
            known = ", ".join(sorted(shaping_names)) or "none configured"
            raise ValueError(f'reactions[{i}].shaping: no [[shaping]] entry is named '
                             f'"{r.shaping}" (names: {known}; or "any")')
