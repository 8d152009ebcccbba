"""IP warm-up: a new source address sends a provider at most the hourly volume its
schedule allows for the address's day (engine/config/egress.py parses the schedules).

- **The day.** Day 1 is the [[warmup]] entry's `start` date (UTC) or, without one, the
  day the address first sends. That day is kept in the queue's control table (key
  `warmup-start:ADDRESS`), written by whichever worker sends first (first write wins),
  so a restart or a reload goes on counting from it; `volley ctl warmup` reads it.
- **The hour.** The allowance is per UTC clock hour, counted for the whole server in
  a table shared by the workers (warmup_table.py), per (address, provider): the
  provider is the [[shaping]] entry's name, "*" for mail no entry matches. An entry's
  `providers` limit the schedule to those; the others are not held.
- **Counted** when a job is given to the address (egress.py), so a deferral counts
  too: the receiver saw the attempt.

`Warmup.take` is the whole question egress.py asks: may one more message go from this
address to this provider now?
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import Config
from engine.config.egress import OTHER_PROVIDERS, Step, allowance
from engine.delivery.warmup_table import WarmupTable
from engine.observe import log
from engine.queue.writetxn import WriteTxn

START_PREFIX = b"warmup-start:"
Persist = Callable[[Callable[[WriteTxn], object]], None]  # runs an op in a write txn
ReadControl = Callable[[bytes], bytes | None]


def start_key(address: str) -> bytes:
    return START_PREFIX + address.encode()


def utc_day(wall: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).date()


def day_number(start: datetime.date, today: datetime.date) -> int:
    """1 on the start day; 0 or less before it."""
    return (today - start).days + 1


def provider_of(provider: str) -> str:
    """The provider a message counts toward: the [[shaping]] entry's name, or "*"."""
    return provider or OTHER_PROVIDERS


@dataclass(frozen=True, slots=True)
class Plan:
    """One scheduled address."""

    name: str  # the [[egress]] entry's name
    address: str
    steps: tuple[Step, ...]
    start: datetime.date | None  # configured; None = the first send
    providers: frozenset[str]  # empty = every provider


def plans_of(cfg: Config) -> dict[str, Plan]:
    """Every scheduled address of `cfg`, by address."""
    by_name = {e.name: e for e in cfg.egress}
    plans: dict[str, Plan] = {}
    for entry in cfg.warmup:
        steps, start = entry.steps, entry.start_date
        for name in entry.sources:
            egress = by_name.get(name)
            if egress is not None:
                plans[egress.source_address] = Plan(name, egress.source_address, steps, start,
                                                    frozenset(entry.providers))
    return plans


def put_start_op(key: bytes, value: bytes) -> Callable[[WriteTxn], object]:
    """The op that keeps the first send's day, unless a day is kept already."""

    def op(w: WriteTxn) -> object:
        if w.get_control(key) is None:
            w.txn.put(key, value, db=w._store._ctl)
        return None

    return op


class Warmup:
    """One worker's side. Loop thread only."""

    def __init__(self, table: WarmupTable, read: ReadControl, persist: Persist,
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self._read = read
        self._persist = persist
        self.clock = clock
        self.plans: dict[str, Plan] = {}
        self._starts: dict[str, datetime.date] = {}  # address → day 1 (configured or kept)

    def configure(self, cfg: Config) -> None:
        """The schedules of `cfg`; the kept first-send days are read again."""
        self.plans = plans_of(cfg)
        self._starts = {}
        for address, plan in self.plans.items():
            if plan.start is not None:
                self._starts[address] = plan.start
                continue
            try:
                kept = self._read(start_key(address))
            except Exception as err:  # a read error must not stop delivery
                log.error("warmup_start_read_failed", address=address, error=repr(err))
                kept = None
            if kept:
                try:
                    self._starts[address] = datetime.date.fromisoformat(kept.decode())
                except ValueError:
                    log.error("warmup_start_bad", address=address, value=kept.decode("ascii", "replace"))

    def limited(self, address: str) -> bool:
        """Whether `address` has a schedule at all."""
        return address in self.plans

    def day(self, address: str, wall: float) -> int:
        """The address's day (1 = its first); 1 before its first send."""
        start = self._starts.get(address)
        today = utc_day(wall)
        return 1 if start is None else day_number(start, today)

    def take(self, address: str, provider: str, wall: float | None = None) -> bool:
        """Count one message from `address` to `provider` if its allowance this hour has
        room (always True without a schedule for the pair)."""
        plan = self.plans.get(address)
        if plan is None:
            return True
        provider = provider_of(provider)
        if plan.providers and provider not in plan.providers:
            return True
        wall = self.clock() if wall is None else wall
        limit = allowance(plan.steps, self.day(address, wall))
        if limit is None:
            return True
        if limit == 0:
            return False  # its start is still to come
        if not self.table.closed and not self.table.take(address, provider, int(wall // 3600), limit):
            return False
        if address not in self._starts:
            self._first_send(address, wall)
        return True

    def _first_send(self, address: str, wall: float) -> None:
        today = utc_day(wall)
        self._starts[address] = today
        log.info("warmup_started", address=address, day1=today.isoformat())
        try:
            self._persist(put_start_op(start_key(address), today.isoformat().encode()))
        except Exception as err:  # the worker keeps its own count of the day meanwhile
            log.error("warmup_start_write_failed", address=address, error=repr(err))
