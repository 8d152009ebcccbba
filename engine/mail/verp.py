"""VERP tokens: who a message went to, carried in its return path and its Message-ID.

A token is the UTF-8 of "recipient NUL campaign NUL tenant" in base32 (RFC 4648 §6)
without padding, lower-cased: only [a-z2-7], so it survives a receiver that lower-cases
local parts (RFC 5321 §2.4 lets it) and needs no quoting in a dot-atom or a msg-id.

The return path is `local+TOKEN@domain` (the feedback address with the token as a
sub-address), so a late bounce (RFC 3464 DSN) sent to the return path names the
recipient even when the report itself does not. The Message-ID is
`<TOKEN.RANDOM@hostname>`, so a complaint (RFC 5965 ARF) quoting the original's headers
names it too.

Length: a token is 8/5 of its input, so `fbl+TOKEN` passes RFC 5321 §4.5.3.1.1's 64
octets for all but the shortest recipients. That limit is a floor a server must accept,
not a ceiling (§4.5.3.1 asks for no limits where possible); the large receivers accept
longer local parts, and Volley's own inbound server accepts them for the feedback
address. A VERP path that would exceed the 256-octet path limit (§4.5.3.1.3) is not
made: the bare feedback address is used, and the Message-ID still carries the token.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

_TOKEN = re.compile(r"[a-z2-7]+")
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the angle brackets.
MAX_ADDRESS = 254


def encode_token(recipient: str, campaign: str = "", tenant: str = "") -> str:
    """The token of one recipient of one campaign: lower-case base32, [a-z2-7] only."""
    raw = f"{recipient}\0{campaign}\0{tenant}".encode()
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def decode_token(token: str) -> tuple[str, str, str] | None:
    """(recipient, campaign, tenant) of a token, or None if it is not one of ours: not
    base32, not UTF-8, not three NUL-separated fields, or no '@' in the recipient."""
    token = token.lower()
    if not _TOKEN.fullmatch(token) or len(token) % 8 in (1, 3, 6):
        return None  # base32 never leaves 1, 3 or 6 characters in the last group
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    fields = text.split("\0")
    if len(fields) != 3 or "@" not in fields[0]:
        return None
    return fields[0], fields[1], fields[2]


def verp_address(feedback_address: str, token: str) -> str:
    """`local+TOKEN@domain`; the bare feedback address when that would be longer than
    a path may be (RFC 5321 §4.5.3.1.3)."""
    local, _, domain = feedback_address.rpartition("@")
    address = f"{local}+{token}@{domain}"
    return address if len(address.encode()) <= MAX_ADDRESS else feedback_address


def is_feedback_address(feedback_address: str, address: str) -> bool:
    """Whether `address` is the feedback address itself or its VERP form (any case)."""
    if not feedback_address:
        return False
    if address.lower() == feedback_address.lower():
        return True
    return token_of_address(feedback_address, address) is not None


def token_of_address(feedback_address: str, address: str) -> str | None:
    """The TOKEN of `local+TOKEN@domain` (lower-cased), compared without regard to case;
    None for any other address, the bare feedback address included."""
    if not feedback_address:
        return None
    local, _, domain = feedback_address.rpartition("@")
    a_local, _, a_domain = address.rpartition("@")
    if a_domain.lower() != domain.lower():
        return None
    prefix = local.lower() + "+"
    a_local = a_local.lower()
    if not a_local.startswith(prefix):
        return None
    token = a_local[len(prefix):]
    return token if _TOKEN.fullmatch(token) else None


def message_id(token: str, hostname: str) -> str:
    """`<TOKEN.RANDOM@hostname>` (RFC 5322 §3.6.4): unique by the random part."""
    return f"<{token}.{secrets.token_hex(8)}@{hostname}>"


def token_of_message_id(message_id: str) -> str | None:
    """The token of a Message-ID made by `message_id`, or None when the id is not ours
    (its first dot-separated part does not decode as a token)."""
    value = message_id.strip().strip("<>")
    left, at, _ = value.rpartition("@")
    if not at:
        return None
    token = left.partition(".")[0].lower()
    return token if decode_token(token) is not None else None
