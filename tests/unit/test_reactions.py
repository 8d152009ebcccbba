"""[[reactions]]: the config checks, matching a reply (and not Volley's own failure
replies), the bounce reply, the halve_rate ramp on a virtual clock, and the table's
reaction fields shared by two real processes (one suspension fires once; a lift is
seen by the other process; caps per source address, reactions per provider)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import ConfigError, from_dict
from engine.delivery.job import PoolSettings
from engine.delivery.outcome import transient_failure
from engine.delivery.provider_gate import ProviderGates, gate_key
from engine.delivery.ramp import FLOOR, NONE, Halving, factor_at, halve, in_force, step_interval
from engine.delivery.reactions import Fired, ReactionBook, Rule, bounced, first_match, remote
from engine.delivery.shared_limits import LimitTable
from engine.smtp.replies import Reply

REPO = Path(__file__).resolve().parents[2]
TSS04 = Reply(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred")


def rules(*entries: dict[str, object]) -> list[Rule]:
    cfg = from_dict({"shaping": [{"name": "yahoo", "domain": "yahoo.test"}],
                     "reactions": list(entries)})
    return [Rule(i, r) for i, r in enumerate(cfg.reactions)]


@pytest.mark.parametrize(("entry", "error"), [
    ({"shaping": "gmail", "text": "x", "action": "bounce"},
     'reactions[0].shaping: no [[shaping]] entry is named "gmail"'),
    ({"shaping": "any", "action": "bounce"}, "reactions[0].code: give at least one of"),
    ({"shaping": "any", "code": "42", "action": "bounce"}, "reactions[0].code: expected a reply code"),
    ({"shaping": "any", "enhanced": "4.7", "action": "bounce"}, "reactions[0].enhanced: expected"),
    ({"shaping": "any", "text": "[", "action": "bounce"}, "reactions[0].text: bad regular expression"),
    ({"shaping": "any", "class": "angry", "action": "bounce"}, 'reactions[0].class: unknown class "angry"'),
    ({"shaping": "any", "code": 421, "action": "suspend"}, "reactions[0].duration: suspend needs"),
    ({"shaping": "any", "code": 421, "action": "bounce", "duration": "1m"},
     "reactions[0].duration: a bounce takes no duration"),
    ({"shaping": "any", "code": 421, "action": "pause", "duration": "1m"}, "reactions[0].action:"),
    ({"shaping": "any", "code": 421, "action": "bounce", "colour": "red"}, "reactions[0].colour: unknown key"),
])
def test_config_errors_name_the_entry_and_key(entry: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"shaping": [{"name": "yahoo", "domain": "yahoo.test"}], "reactions": [entry]})
    assert str(err.value).startswith(error), str(err.value)


def test_matching_code_enhanced_text_and_class() -> None:
    by_text, by_code, by_class, both = rules(
        {"shaping": "yahoo", "text": r"\[TSS0\d\]", "action": "suspend", "duration": "30m"},
        {"shaping": "any", "code": "4xx", "enhanced": "x.7.", "action": "halve_rate", "duration": "5m"},
        {"shaping": "any", "class": "rate_limited", "action": "halve_rate", "duration": "5m"},
        {"shaping": "any", "code": 550, "text": "spam", "action": "bounce"},
    )
    text = " ".join(TSS04.lines)
    assert by_text.matches(TSS04, text) and by_code.matches(TSS04, text)
    assert not by_text.matches(Reply(421, "4.7.0", "[tss1] busy"), "[tss1] busy")
    assert by_text.matches(Reply(421, "4.7.0", "[tss05] lower"), "[tss05] lower")  # any case
    assert not by_code.matches(Reply(451, "4.3.0", "x"), "x")
    limited = Reply(421, "4.7.0", "Try again later, closing connection. (rate limited)")
    assert by_class.matches(limited, " ".join(limited.lines))
    assert both.matches(Reply(550, "5.7.1", "looks like SPAM"), "looks like SPAM")
    assert not both.matches(Reply(554, "5.7.1", "spam"), "spam")
    assert first_match([by_text, by_code], TSS04) is by_text  # file order decides


def test_volleys_own_failure_replies_never_react() -> None:
    assert remote(TSS04)
    assert remote(Reply(421, "4.4.1", "mx.example said: too busy"))  # the provider's words
    assert remote(Reply(550, "5.1.1", "no such user"))
    assert not remote(Reply(250, "2.0.0", "ok"))
    for kind, text in (("refused", "connection to mx[192.0.2.1]:25 refused"),
                       ("timeout", "timeout waiting for the reply to RCPT from mx"),
                       ("lost", "not attempted: the previous transaction on mx failed"),
                       ("local", "cannot connect: OSError()")):
        assert not remote(transient_failure(kind, text)), kind


def test_bounce_keeps_the_remote_text() -> None:
    assert bounced(TSS04) == Reply(550, "5.7.0", TSS04.text)
    assert bounced(Reply(451, "", ("busy", "later"))) == Reply(550, "5.0.0", ("busy", "later"))
    five = Reply(554, "5.7.1", "no")
    assert bounced(five) is five


def test_the_ramp_holds_then_climbs_back_in_a_line() -> None:
    h = halve(NONE, 100.0, 60.0)
    assert h == Halving(0.5, 160.0, 220.0, 100.0)
    assert factor_at(h, 100.0) == factor_at(h, 159.9) == 0.5
    assert factor_at(h, 190.0) == pytest.approx(0.75)
    assert factor_at(h, 220.0) == factor_at(NONE, 0.0) == 1.0
    assert in_force(h, 219.0) and not in_force(h, 220.0)
    # Too soon after the last halving: not fired again; later: halves what is in force.
    assert halve(h, 100.0 + step_interval(60.0) - 0.1, 60.0) is None
    again = halve(h, 190.0, 60.0)
    assert again is not None and again.factor == pytest.approx(0.375) and again.hold_until == 250.0
    assert step_interval(3600.0) == 60.0  # a minute at most
    h, now = NONE, 0.0
    for _ in range(10):
        h = halve(h, now, 60.0) or h
        now += 60.0 / 4
    assert h.factor == FLOOR


def test_a_suspension_fires_once_and_the_book_remembers_held_domains(tmp_path: Path) -> None:
    import asyncio

    async def run() -> None:
        loop = asyncio.get_running_loop()
        table = LimitTable.open(str(tmp_path / "t.shm"), 0, 1)
        book = ReactionBook(table, loop)
        cfg = from_dict({"shaping": [{"name": "yahoo", "domain": "yahoo.test"}],
                         "reactions": [{"shaping": "yahoo", "text": "TSS04", "action": "suspend",
                                        "duration": "30m"}]})
        book.configure(cfg.reactions)
        told: list[Fired] = []
        book.notify = told.append
        slot = table.slot_of("yahoo")
        assert slot is not None and book.rules_for("yahoo") and not book.rules_for("gmail")
        rule = book.rules_for("yahoo")[0]
        assert book.fire("yahoo", slot, rule, TSS04)
        assert not book.fire("yahoo", slot, rule, TSS04)  # in force: not again
        assert len(told) == 1
        fired = told[0]
        assert fired.reply == "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred"
        assert fired.until == pytest.approx(time.time() + 1800, abs=5)
        assert table.suspended_until(slot) > loop.time() + 1700
        book.note_held("yahoo", "a.test")
        book.note_held("yahoo", "a.test")
        assert book.lift("yahoo") == ["a.test"] and book.lift("yahoo") == []
        table.close()

    asyncio.run(run())


_OTHER = """
import sys, time
from engine.delivery.shared_limits import LimitTable
table = LimitTable.open(sys.argv[1], 1, 2)
slot = table.slot_of("yahoo")
print("ready", flush=True)
sys.stdin.readline()
now = time.monotonic()
print("fired" if table.suspend(slot, now + 60, now) else "in-force", flush=True)
sys.stdin.readline()
print(table.suspended_until(slot) > time.monotonic(), flush=True)
"""


def test_two_processes_share_one_suspension_and_its_lift(tmp_path: Path) -> None:
    path = str(tmp_path / "t.shm")
    table = LimitTable.open(path, 0, 2)
    slot = table.slot_of("yahoo")
    assert slot is not None
    other = subprocess.Popen([sys.executable, "-c", _OTHER, path], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert other.stdin is not None and other.stdout is not None
        assert other.stdout.readline().strip() == "ready"
        now = time.monotonic()
        assert table.suspend(slot, now + 60, now)  # we fire first...
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "in-force"  # ...so the other does not
        # The supervisor's read-write handle lifts it; the other process sees that.
        sup = LimitTable.open_shared(path)
        sup_slot = sup.slot_of("yahoo", create=False)
        assert sup_slot == slot
        sup.set_reaction(slot, suspended_until=0.0, halving=NONE)
        out, _ = other.communicate("look\n", timeout=60)
        assert out.strip() == "False" and other.returncode == 0
        # A halving is visible across handles too, and cleared with the rest.
        assert sup.halve(slot, time.monotonic(), 60.0) is not None
        assert table.halving(slot).factor == 0.5
        sup.clear_reactions()
        assert table.halving(slot) == NONE and table.suspended_until(slot) == 0.0
        sup.close()
    finally:
        if other.poll() is None:
            other.kill()
        table.close()


def test_caps_per_source_address_reactions_per_provider(tmp_path: Path) -> None:
    import asyncio

    async def run() -> None:
        loop = asyncio.get_running_loop()
        table = LimitTable.open(str(tmp_path / "t.shm"), 0, 1)
        gates = ProviderGates(table, 0, loop)
        base = PoolSettings(provider="yahoo", provider_connections=2)
        a = PoolSettings(provider="yahoo", provider_connections=2, source_address="127.0.0.2")
        b = PoolSettings(provider="yahoo", provider_connections=2, source_address="127.0.0.3")
        assert gate_key(base) == "yahoo" and gate_key(a) == "yahoo|127.0.0.2"
        ga, gb, g0 = gates.gate_for(a), gates.gate_for(b), gates.gate_for(base)
        assert ga is not None and gb is not None and g0 is not None
        assert len({ga.slot, gb.slot, g0.slot}) == 3  # caps per address
        assert ga.rslot == gb.rslot == g0.slot  # reactions per provider
        user = _User()
        assert ga.try_connect(user) and ga.try_connect(user) and not ga.try_connect(user)
        assert gb.try_connect(user)  # the other address has its own cap
        now = loop.time()
        assert g0.rslot is not None and table.suspend(g0.rslot, now + 60, now)
        assert ga.suspended() and gb.suspended() and g0.suspended()
        # A halving without a rate halves the cap (at least 1).
        table.set_reaction(g0.rslot, suspended_until=0.0, halving=Halving(0.5, now + 60, now + 120, now))
        assert gb.factor() == 0.5 and not gb.try_connect(user)  # 1 of a halved cap of 1
        table.close()

    asyncio.run(run())


class _User:
    def on_gate_open(self) -> None:
        pass

    def retire_coldest_idle(self) -> bool:
        return False
