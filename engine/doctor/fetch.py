"""The doctor's only I/O: look up what the checks ask for, in rounds, concurrently.

`settle(runs, lookup)` calls each `run(answers)` until it completes without raising
`Missing`; after each round it looks up every (name, type) the checks missed or hinted
at, all at once, and adds the answers to the table. A check that keeps asking for
new names stops after MAX_ROUNDS (it cannot: SPF is bounded by its lookup limits, the
rest by the addresses checked), and the round count bounds a hostile zone too.

The lookups go through engine.dns's Resolver (dns.nameservers of the config, else the
system's resolv.conf), which already turns every DNS outcome into a Status: SERVFAIL
and timeouts are failures, never "no record" (a doctor that said "publish an SPF
record" because its resolver timed out would send the operator on a wrong errand).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import dns.name
import dns.rdatatype
import dns.rrset

from engine.dns.resolver import Resolver, Status
from engine.doctor.answers import Answer, Answers, Missing

T = TypeVar("T")
MAX_ROUNDS = 40
MAX_PER_ROUND = 200
Lookup = Callable[[str, str], Awaitable[Answer]]


class DoctorResolver(Resolver):
    """Lookups of any type the checks use, answered as record text."""

    async def lookup(self, name: str, rdtype: str) -> Answer:
        status, rrset, _ttl = await self._query(name, dns.rdatatype.from_text(rdtype))
        if rrset is None:
            return Answer(status)
        return Answer(Status.OK, tuple(_text(rd, rdtype) for rd in rrset))


def _text(rd: object, rdtype: str) -> str:
    if rdtype == "TXT":
        # RFC 7208 §3.3, RFC 6376 §3.6.2.2: a record's strings are joined without spaces.
        strings: tuple[bytes, ...] = rd.strings  # type: ignore[attr-defined]
        return b"".join(strings).decode("utf-8", "replace")
    if rdtype == "MX":
        exchange: dns.name.Name = rd.exchange  # type: ignore[attr-defined]
        host = "." if exchange == dns.name.root else exchange.to_text(omit_final_dot=True).lower()
        return f"{rd.preference} {host}"  # type: ignore[attr-defined]
    if rdtype in ("PTR", "CNAME"):
        target: dns.name.Name = rd.target  # type: ignore[attr-defined]
        return target.to_text(omit_final_dot=True).lower()
    return str(rd)


async def settle(runs: Sequence[Callable[[Answers], T]], lookup: Lookup,
                 answers: Answers | None = None) -> list[T]:
    """Each `run(answers)`'s result, once every answer it asks for has been fetched.

    Every unfinished run is tried in each round, so independent checks (SPF, DMARC,
    the PTR of each address) fetch their records side by side.
    """
    table = answers if answers is not None else Answers()
    done: dict[int, T] = {}
    for _ in range(MAX_ROUNDS):
        table.hints.clear()
        wanted: set[tuple[str, str]] = set()
        for i, run in enumerate(runs):
            if i in done:
                continue
            try:
                done[i] = run(table)
            except Missing as miss:
                wanted.add(miss.key)
        if len(done) == len(runs):
            return [done[i] for i in range(len(runs))]
        await fetch_into(table, wanted | table.hints, lookup)
    raise RuntimeError(f"the checks still asked for more DNS answers after {MAX_ROUNDS} rounds")


async def fetch_into(table: Answers, wanted: set[tuple[str, str]], lookup: Lookup) -> None:
    keys = sorted(k for k in wanted if not table.has(*k))[:MAX_PER_ROUND]
    results = await asyncio.gather(*(lookup(name, rdtype) for name, rdtype in keys))
    for (name, rdtype), answer in zip(keys, results):
        table.put(name, rdtype, answer)
