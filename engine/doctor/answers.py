"""DNS answers as plain data, the only input of the doctor's checks.

The checks are pure functions over an `Answers` table, so a unit test hands them a dict
and the command hands them what the fetcher (fetch.py) found. A check that needs a
record the table does not hold yet raises `Missing`; the fetcher looks it up and runs
the check again, until every check runs to its end. A check may also `hint` names it
is about to need (every include: of an SPF record), so they are fetched in one round
instead of one round each.

Records are text, as a zone file shows them: TXT as the record's strings joined
(RFC 7208 §3.3, RFC 6376 §3.6.2.2), A/AAAA as addresses, MX as "PREF host", PTR and
CNAME as names; names lower-case without the final dot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine.dns.mx import Status

__all__ = ["Answer", "Answers", "Missing", "Status", "reverse_name"]

TYPES = ("A", "AAAA", "MX", "TXT", "PTR")


@dataclass(frozen=True, slots=True)
class Answer:
    """One lookup's outcome; `records` is empty unless `status` is OK."""

    status: Status
    records: tuple[str, ...] = ()

    @property
    def is_void(self) -> bool:
        """NXDOMAIN or NODATA: a "void lookup" of RFC 7208 §4.6.4."""
        return self.status in (Status.NXDOMAIN, Status.NODATA) or (
            self.status is Status.OK and not self.records)


Key = tuple[str, str]  # (name, type)


class Missing(Exception):
    """A check needs (name, type) and the table does not hold it yet."""

    def __init__(self, name: str, rdtype: str) -> None:
        super().__init__(f"{name} {rdtype}")
        self.key: Key = (name, rdtype)


def norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


class Answers:
    """The answers fetched so far, keyed by (name, type)."""

    def __init__(self, data: Mapping[Key, Answer] | None = None) -> None:
        self._data: dict[Key, Answer] = {}
        self.hints: set[Key] = set()
        for (name, rdtype), answer in (data or {}).items():
            self._data[(norm(name), rdtype.upper())] = answer

    @classmethod
    def of(cls, zone: Mapping[str, Mapping[str, Iterable[str]]]) -> Answers:
        """A complete table from a small zone: {name: {type: [records]}}; every other
        (name, type) is NODATA when the name has data, else NXDOMAIN. For tests."""
        table = _Complete()
        for name, types in zone.items():
            for rdtype, records in types.items():
                table._data[(norm(name), rdtype.upper())] = Answer(Status.OK, tuple(records))
            table.names.add(norm(name))
        return table

    def get(self, name: str, rdtype: str) -> Answer:
        key = (norm(name), rdtype.upper())
        found = self._data.get(key)
        if found is None:
            raise Missing(*key)
        return found

    def put(self, name: str, rdtype: str, answer: Answer) -> None:
        self._data[(norm(name), rdtype.upper())] = answer

    def has(self, name: str, rdtype: str) -> bool:
        return (norm(name), rdtype.upper()) in self._data

    def hint(self, name: str, rdtype: str) -> None:
        """Note a lookup the caller is likely to need next (fetched ahead, harmless)."""
        key = (norm(name), rdtype.upper())
        if key not in self._data:
            self.hints.add(key)


class _Complete(Answers):
    """A table that answers everything: what it lacks does not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, name: str, rdtype: str) -> Answer:
        try:
            return super().get(name, rdtype)
        except Missing:
            n = norm(name)
            exists = any(k == n or k.endswith("." + n) for k in self.names)
            return Answer(Status.NODATA if exists else Status.NXDOMAIN)


def reverse_name(ip: str) -> str:
    """The PTR name of an address (RFC 1035 §3.5 in-addr.arpa, RFC 3596 §2.5 ip6.arpa)."""
    return ipaddress.ip_address(ip).reverse_pointer


def txt_with_prefix(records: Iterable[str], prefix: str) -> list[str]:
    """The records that start with `prefix` as a whole word, case-insensitively:
    "v=spf1" matches "v=spf1 -all" and "v=spf1" but not "v=spf10" (RFC 7208 §4.5)."""
    found = []
    p = prefix.lower()
    for text in records:
        head = text.lstrip()[: len(p) + 1].lower()
        if head == p or (head.startswith(p) and head[len(p)] in " ;\t"):
            found.append(text.strip())
    return found
