"""Volley's own header fields on SMTP-injected mail: `X-Volley-Campaign:`,
`X-Volley-Tenant:` and `Volley-Priority:`.

A client we vouch for (relay network or authenticated) may name the campaign and tenant
a message counts toward, so mail injected over SMTP shows up in the same campaign
counters as mail injected over HTTP, and may give it a priority 0-9 (9 first; the HTTP
API's `priority` field), so a password reset overtakes a newsletter queued for the same
provider. The fields are ours, not the recipient's: they are taken out of the stored
message, so they never leave this host.

An untrusted client's fields mean nothing here. Its X-Volley-* fields are left as they
are (they are just text to us). Its Volley-Priority is removed all the same, and
ignored: the field is documented as never leaving Volley, and a next hop that trusts
this host (another Volley with us in its relay network) would otherwise honour a
priority that an outsider chose.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from engine.mail.headers import header_end, split_message, unfold
from engine.observe import log

CAMPAIGN_FIELD = "x-volley-campaign"
TENANT_FIELD = "x-volley-tenant"
PRIORITY_FIELD = "volley-priority"
_NAME = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_PRIORITY = re.compile(rb"[0-9]")
_MARK = b"volley-"  # in every field name above


class Tags(NamedTuple):
    campaign: str  # "" = none
    tenant: str
    priority: int | None  # None = not set (or not by a trusted client)
    content: bytes  # the message without the fields that were taken out


def take_fields(content: bytes, client_ip: str, *, trusted: bool) -> Tags:
    """The tags of a message and the message without them.

    `trusted`: X-Volley-Campaign, X-Volley-Tenant and Volley-Priority count and are
    removed; otherwise only Volley-Priority is removed, and it does not count. A value
    that is not valid (1-64 characters of [A-Za-z0-9._-]; one digit 0-9 for the
    priority) is ignored and logged; the field is removed all the same. Of several
    fields of one name the last counts.
    """
    end, _ = header_end(content)
    if _MARK not in content[:end].lower():  # the common case: one search, no split
        return Tags("", "", None, content)
    fields, _ = split_message(content)
    ours = {CAMPAIGN_FIELD, TENANT_FIELD, PRIORITY_FIELD} if trusted else {PRIORITY_FIELD}
    kept, found = [], {CAMPAIGN_FIELD: "", TENANT_FIELD: "", PRIORITY_FIELD: ""}
    for field in fields:
        if field.name not in ours:
            kept.append(field.raw)
            continue
        if trusted:
            value = unfold(field.value).strip()
            if (_PRIORITY if field.name == PRIORITY_FIELD else _NAME).fullmatch(value):
                found[field.name] = value.decode("ascii")
            else:
                log.warning("campaign_tag_ignored", client=client_ip, field=field.name,
                            value=value[:80].decode("ascii", "replace"),
                            reason="expected one digit 0-9" if field.name == PRIORITY_FIELD
                            else "expected 1-64 characters of A-Z a-z 0-9 . _ -")
    if len(kept) == len(fields):
        return Tags("", "", None, content)
    # The header section ends at `end` with the CRLF CRLF that follows it; with no
    # field left the message starts at its empty line (RFC 5322 §2.1).
    rest = content[end:] if kept else content[end + 2:]
    priority = int(found[PRIORITY_FIELD]) if found[PRIORITY_FIELD] else None
    return Tags(found[CAMPAIGN_FIELD], found[TENANT_FIELD], priority,
                b"\r\n".join(kept) + rest)


def take_tags(content: bytes, client_ip: str) -> tuple[str, str, bytes]:
    """(campaign, tenant, content without the fields): `take_fields` for a trusted
    client, without the priority."""
    tags = take_fields(content, client_ip, trusted=True)
    return tags.campaign, tags.tenant, tags.content
