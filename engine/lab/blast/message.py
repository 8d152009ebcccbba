"""What a blast run sends, built before the first connection: message bodies and
recipient addresses.

Every body is produced once and reused, so the hot path only picks bytes: a single
generated size is one buffer; a size distribution is one buffer per size plus a fixed,
shuffled schedule (message i gets size `schedule[i % len(schedule)]`); a message file
is one buffer, and only a template (`{n}`, `{id}`) costs a join per message.

Size specs (the `--size` syntax):
    "1024", "10k", "1MiB"            one size (k = 1000, KiB = 1024, as in the config)
    "1k:70,10k:25,100k:5"            weighted: 70% 1 kB, 25% 10 kB, 5% 100 kB
    "1k,10k"                         the same without weights: equal shares
    "1k-100k"                        uniform between the bounds, in 64 evenly spaced sizes
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

SENDER = "blast@volley.test"
HELO_NAME = "blast.volley.test"
RCPT_TEMPLATE = "u{n}@d{d}.example"
_LINE = 76  # filler characters per body line (RFC 5322 recommends <= 78 with CRLF)
_FILLER = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3)[:_LINE]
UNIFORM_STEPS = 64  # distinct sizes a "lo-hi" range is drawn from
_MAX_SCHEDULE = 100_000  # entries in a weighted schedule (sum of the reduced weights)
_PLACEHOLDER = re.compile(rb"\{(n|id)\}")

BodyFor = Callable[[int], bytes]  # ticket -> body bytes, end of data included


@functools.lru_cache(maxsize=256)
def make_message(size: int, sender: str = SENDER) -> bytes:
    """A message of exactly `size` bytes (headers included) ending in CRLF; min ~200 bytes
    (a smaller size gets just the headers).

    No line starts with "." so the bytes need no dot-stuffing and can be written as is;
    the sink (and the server) see exactly these bytes after unstuffing.
    """
    import email.utils  # (here: `volley --help` imports this module, and should be quick)

    date = email.utils.formatdate(usegmt=True)
    head = (
        f"From: <{sender}>\r\n"
        f"To: <u0@d0.example>\r\n"
        f"Subject: volley blast {size}\r\n"
        f"Message-ID: <blast-{size}@volley.test>\r\n"
        f"Date: {date}\r\n"
        "\r\n"
    ).encode()
    room = size - len(head)
    if room <= 0:
        return head
    if room < 3:  # too little for a filler line ("x\r\n"): pad the subject instead
        return head.replace(b"\r\nMessage-ID", b"x" * room + b"\r\nMessage-ID", 1)
    lines: list[bytes] = []
    while room > 0:
        n = min(_LINE + 2, room)
        if 0 < room - n < 3:  # keep the last line at least "x\r\n"
            n = room - 3
        lines.append(_FILLER[: n - 2] + b"\r\n")
        room -= n
    return head + b"".join(lines)


def _one_size(text: str) -> int:
    from engine.config import parse_size

    try:
        return int(parse_size(text.strip()))
    except ValueError:
        raise ValueError(f"not a size: {text.strip()!r} (use 1024, 10k, 1MiB)") from None


def parse_size_spec(spec: str) -> list[tuple[int, int]]:
    """A size spec (see the module doc) -> [(bytes, weight)]; ValueError names the problem."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty size")
    if "-" in spec and "," not in spec and ":" not in spec:
        lo_text, _, hi_text = spec.partition("-")
        lo, hi = _one_size(lo_text), _one_size(hi_text)
        if lo > hi:
            raise ValueError(f"size range {spec!r} runs backwards")
        steps = min(UNIFORM_STEPS, hi - lo + 1)
        if steps == 1:
            return [(lo, 1)]
        return [(lo + round(i * (hi - lo) / (steps - 1)), 1) for i in range(steps)]
    pairs: list[tuple[int, int]] = []
    for item in spec.split(","):
        size_text, colon, weight_text = item.partition(":")
        weight = 1
        if colon:
            if not weight_text.strip().isdigit() or int(weight_text) <= 0:
                raise ValueError(f"weight in {item.strip()!r} must be a positive integer")
            weight = int(weight_text)
        pairs.append((_one_size(size_text), weight))
    return pairs


def size_schedule(pairs: list[tuple[int, int]], seed: int = 0) -> list[int]:
    """Indices into `pairs`, each as often as its (reduced) weight, shuffled with a fixed
    seed: message i gets pairs[schedule[i % len]], so every run mixes sizes the same way
    and any window of len(schedule) messages has the exact proportions."""
    import random

    g = 0
    for _, w in pairs:
        g = math.gcd(g, w)
    counts = [w // g for _, w in pairs]
    if sum(counts) > _MAX_SCHEDULE:
        raise ValueError(f"size weights too fine-grained (reduced sum > {_MAX_SCHEDULE})")
    schedule = [i for i, c in enumerate(counts) for _ in range(c)]
    random.Random(seed).shuffle(schedule)
    return schedule


def wire_form(message: bytes) -> bytes:
    """A message file as sent after DATA: CRLF line ends, dot-stuffed, ending in CRLF."""
    from engine.smtp.client import dot_stuff

    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return dot_stuff(data)


def template_body(data: bytes, run_id: str) -> BodyFor:
    """Per-message bodies from a template with `{n}` (the message number, from 0) and
    `{id}` (`run_id.n`, unique across runs); the values are digits and hex, so they
    cannot start a line with "." and the stuffing done on the template stays valid."""
    parts = _PLACEHOLDER.split(data + b".\r\n")  # literal, name, literal, name, ...
    slots = range(1, len(parts), 2)
    names = [parts[i] for i in slots]

    def body_for(ticket: int) -> bytes:
        out = parts.copy()
        n = str(ticket)
        for i, name in zip(slots, names):
            out[i] = (n if name == b"n" else f"{run_id}.{n}").encode()
        return b"".join(out)

    return body_for


def bodies(
    *, size: int, sizes: str, sender: str, message: bytes | None, template: bool, run_id: str
) -> tuple[bytes | None, BodyFor]:
    """(the one body when every message is the same, else None; ticket -> body).

    Bodies include the end of data (".\\r\\n") so each goes out in one write.
    """
    if message is not None:
        fixed = wire_form(message) + b".\r\n"
        if template and _PLACEHOLDER.search(fixed):
            return None, template_body(wire_form(message), run_id)
        return fixed, lambda _: fixed
    pairs = parse_size_spec(sizes) if sizes else [(size, 1)]
    table = [make_message(s, sender) + b".\r\n" for s, _ in pairs]
    if len(table) == 1:
        only = table[0]
        return only, lambda _: only
    schedule = [table[i] for i in size_schedule(pairs)]
    span = len(schedule)
    return None, lambda ticket: schedule[ticket % span]


def command_blocks(
    recipients: int, domains: int, sender: str = SENDER, rcpt_template: str = RCPT_TEMPLATE
) -> list[list[bytes]]:
    """Per message i, its commands are blocks[i % domains]: MAIL, RCPT..., DATA lines.

    Recipient j of the whole run is `rcpt_template` with n = j % (D*R) and d = j % D
    (u{n}@d{d}.example by default), so consecutive recipients walk the domains and the
    pattern repeats every `domains` messages: precomputing D blocks removes all
    per-message formatting.
    """
    r, d = max(1, recipients), max(1, domains)
    span = r * d
    mail = f"MAIL FROM:<{sender}>\r\n".encode()
    blocks = []
    for m in range(d):
        rcpts = [
            f"RCPT TO:<{rcpt_template.format(n=j, d=j % d)}>\r\n".encode()
            for j in ((m * r + k) % span for k in range(r))
        ]
        blocks.append([mail, *rcpts, b"DATA\r\n"])
    return blocks


def check_rcpt_template(template: str) -> None:
    """ValueError unless `template` formats into something like an address."""
    try:
        sample = template.format(n=0, d=0)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"recipient template {template!r}: only {{n}} and {{d}} may be used ({err})") from None
    if "@" not in sample or any(c in sample for c in "<> \r\n"):
        raise ValueError(f"recipient template {template!r} does not make an address: {sample!r}")
