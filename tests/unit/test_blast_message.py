"""What `volley blast` sends, built before the run: size specs, the size schedule,
message files in wire form, templates, and recipient templates."""

from __future__ import annotations

import collections

import pytest

from engine.lab.blast.message import (
    UNIFORM_STEPS,
    bodies,
    check_rcpt_template,
    command_blocks,
    make_message,
    parse_size_spec,
    size_schedule,
    template_body,
    wire_form,
)


@pytest.mark.parametrize(("spec", "pairs"), [
    ("1024", [(1024, 1)]),
    ("10k", [(10_000, 1)]),
    ("1MiB", [(1_048_576, 1)]),
    ("1k:70,10k:25,100k:5", [(1000, 70), (10_000, 25), (100_000, 5)]),
    (" 1KiB , 2KiB ", [(1024, 1), (2048, 1)]),
    ("500-500", [(500, 1)]),
])
def test_size_specs(spec: str, pairs: list[tuple[int, int]]) -> None:
    assert parse_size_spec(spec) == pairs


def test_uniform_range_is_evenly_spaced_with_both_bounds() -> None:
    pairs = parse_size_spec("1k-100k")
    sizes = [s for s, _ in pairs]
    assert len(sizes) == UNIFORM_STEPS and {w for _, w in pairs} == {1}
    assert sizes[0] == 1000 and sizes[-1] == 100_000 and sizes == sorted(set(sizes))
    assert [s for s, _ in parse_size_spec("1000-1002")] == [1000, 1001, 1002]  # fewer steps


@pytest.mark.parametrize(("spec", "words"), [
    ("", "empty"), ("big", "not a size"), ("1k:0", "positive"), ("1k:x", "positive"),
    ("10k-1k", "backwards"), ("1k:1,2k:-1", "positive"),
])
def test_bad_size_specs_name_the_problem(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_size_spec(spec)


def test_schedule_has_exact_proportions_mixed_and_the_same_every_time() -> None:
    pairs = [(1000, 70), (10_000, 25), (100_000, 5)]
    schedule = size_schedule(pairs)
    assert collections.Counter(schedule) == {0: 14, 1: 5, 2: 1}  # reduced by the gcd
    assert schedule == size_schedule(pairs)
    assert schedule != sorted(schedule)  # shuffled: large ones not all bunched at the end


def test_schedule_refuses_weights_too_fine() -> None:
    with pytest.raises(ValueError, match="fine-grained"):
        size_schedule([(1000, 99_999), (2000, 2)])


def test_size_distribution_bodies_follow_the_schedule() -> None:
    fixed, body_for = bodies(size=0, sizes="300:1,600:1", sender="a@b.test", message=None,
                             template=False, run_id="r")
    assert fixed is None
    got = [len(body_for(t)) - 3 for t in range(4)]  # (minus the ".\r\n" end of data)
    assert sorted(got) == [300, 300, 600, 600] and all(body_for(t).endswith(b"\r\n.\r\n")
                                                       for t in range(4))
    assert body_for(0) is body_for(2)  # built once, reused: no per-message copy


def test_one_size_is_one_buffer() -> None:
    fixed, body_for = bodies(size=700, sizes="", sender="s@x.test", message=None,
                             template=False, run_id="r")
    assert fixed is not None and fixed == make_message(700, "s@x.test") + b".\r\n"
    assert body_for(5) is fixed


@pytest.mark.parametrize(("raw", "wire"), [
    (b"a\nb", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b".x\n..y\nz.\n", b"..x\r\n...y\r\nz.\r\n"),
    (b"", b""),
])
def test_wire_form_normalises_line_ends_and_stuffs_dots(raw: bytes, wire: bytes) -> None:
    assert wire_form(raw) == wire


def test_template_substitutes_every_placeholder_and_leaves_other_braces() -> None:
    body_for = template_body(b"{id} n={n} {x} {n}\r\n", "abc")
    assert body_for(7) == b"abc.7 n=7 {x} 7\r\n.\r\n"
    assert body_for(12) == b"abc.12 n=12 {x} 12\r\n.\r\n"


def test_message_without_template_is_sent_verbatim() -> None:
    fixed, body_for = bodies(size=0, sizes="", sender="s", message=b"Subject: {n}\n\nhi\n",
                             template=False, run_id="r")
    assert fixed == b"Subject: {n}\r\n\r\nhi\r\n.\r\n" and body_for(3) is fixed


def test_recipient_template_blocks() -> None:
    blocks = command_blocks(2, 3, "s@x.test", "user{n}@d{d}.example")
    assert blocks[1] == [b"MAIL FROM:<s@x.test>\r\n", b"RCPT TO:<user2@d2.example>\r\n",
                         b"RCPT TO:<user3@d0.example>\r\n", b"DATA\r\n"]


@pytest.mark.parametrize(("template", "words"), [
    ("u{x}@d.example", "only {n} and {d}"), ("nobody", "does not make an address"),
    ("u {n}@d.example", "does not make an address"), ("u{0}@d", "only {n} and {d}"),
])
def test_bad_recipient_templates(template: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_rcpt_template(template)
