"""Campaign tags on SMTP-injected mail: `X-Volley-Campaign:` and `X-Volley-Tenant:`.

A client we vouch for (relay network or authenticated) may name the campaign and tenant
a message counts toward, so mail injected over SMTP shows up in the same campaign
counters as mail injected over HTTP. The fields are ours, not the recipient's: they are
taken out of the stored message, so they never leave this host. An untrusted client's
X-Volley-* fields mean nothing here and are left as they are.
"""

from __future__ import annotations

import re

from engine.mail.headers import header_end, split_message, unfold
from engine.observe import log

CAMPAIGN_FIELD = "x-volley-campaign"
TENANT_FIELD = "x-volley-tenant"
_NAME = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_MARK = b"x-volley-"


def take_tags(content: bytes, client_ip: str) -> tuple[str, str, bytes]:
    """(campaign, tenant, content without the X-Volley-Campaign/-Tenant fields).

    A value that is not 1-64 characters of [A-Za-z0-9._-] is ignored (and logged); the
    field is removed all the same. Of several fields of one name the last counts.
    """
    end, _ = header_end(content)
    head = content[:end]
    if _MARK not in head.lower():  # the common case: one search, no split
        return "", "", content
    fields, _ = split_message(content)
    kept, found = [], {CAMPAIGN_FIELD: "", TENANT_FIELD: ""}
    for field in fields:
        if field.name not in found:
            kept.append(field.raw)
            continue
        value = unfold(field.value).strip()
        if _NAME.fullmatch(value):
            found[field.name] = value.decode("ascii")
        else:
            log.warning("campaign_tag_ignored", client=client_ip, field=field.name,
                        value=value[:80].decode("ascii", "replace"),
                        reason="expected 1-64 characters of A-Z a-z 0-9 . _ -")
    if len(kept) == len(fields):
        return "", "", content
    # The header section ends at `end` with the CRLF CRLF that follows it; with no
    # field left the message starts at its empty line (RFC 5322 §2.1).
    rest = content[end:] if kept else content[end + 2:]
    return found[CAMPAIGN_FIELD], found[TENANT_FIELD], b"\r\n".join(kept) + rest
