"""TXT lookups (for the `_mta-sts` record, RFC 8461 §3.1), with the resolver's
fact-or-failure answers (resolver.py): NXDOMAIN and NODATA are facts, SERVFAIL and a
timeout are not. No caching here; the caller keeps what it needs.
"""

from __future__ import annotations

import dns.rdatatype

from engine.dns.mx import Answer, Status
from engine.dns.resolver import Resolver


async def txt(resolver: Resolver, name: str) -> Answer:
    """The TXT records of `name` (CNAMEs followed): one text per record, its
    character-strings concatenated (RFC 7208 §3.3 and RFC 8461 §3.1 read them so),
    bytes that are not UTF-8 replaced."""
    status, rrset, ttl = await resolver._query(name, dns.rdatatype.TXT)
    if rrset is None:
        return Answer(status, (), ttl)
    texts = tuple(b"".join(rd.strings).decode("utf-8", "replace") for rd in rrset)
    return Answer(Status.OK, texts, ttl)
