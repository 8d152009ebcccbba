"""Coverage-guided fuzzing of the SMTP parsers with atheris (libFuzzer), for `make fuzz`.

    .venv/bin/python tools/fuzz_atheris.py commands|replies|server [RUNS]

Beside the hypothesis round (tests/fuzz/), this lets libFuzzer's coverage feedback find
inputs no strategy thought of. The seeds are tests/fuzz/corpus/; any input that raises
anything but the parser's own error is a crash: libFuzzer prints it, writes it to
crash-*, and the exit status is non-zero. Add such an input to the corpus file once
mended, so every `make test` replays it.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

with atheris.instrument_imports():
    from engine.smtp.client_replies import ClientProtocolError, ReplyParser
    from engine.smtp.commands import SmtpSyntaxError, parse_command
    from engine.smtp.replies import R250_OK, Reply
    from engine.smtp.server import NEED_DATA, PAUSED, AutoReply, ConnectionClosed, ServerSession

from tests.fuzz.conftest import corpus  # noqa: E402  (the same seeds the tests replay)


def commands(data: bytes) -> None:
    for utf8 in (False, True):
        try:
            parse_command(data, utf8_rcpt=utf8)
        except SmtpSyntaxError:
            pass


def replies(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    try:
        while parser.next_reply() is not None:
            pass
    except ClientProtocolError:
        pass


def server(data: bytes) -> None:
    session = ServerSession(max_message_size=500)
    session.send(Reply(220, "", "fuzz ESMTP"))
    for chunk in (data, b""):
        session.receive_data(chunk)
        while True:
            event = session.next_event()
            if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionClosed):
                break
            session.send(event.reply if isinstance(event, AutoReply) else R250_OK)


TARGETS: dict[str, tuple[Callable[[bytes], None], str]] = {
    "commands": (commands, "commands.txt"),
    "replies": (replies, "replies.txt"),
    "server": (server, "commands.txt"),
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: fuzz_atheris.py {'|'.join(TARGETS)} [RUNS]", file=sys.stderr)
        return 2
    target, seeds = TARGETS[sys.argv[1]]
    runs = sys.argv[2] if len(sys.argv) > 2 else "200000"
    with tempfile.TemporaryDirectory(prefix="volley-fuzz-") as tmp:
        for i, case in enumerate(corpus(seeds)):
            (Path(tmp) / f"seed{i}").write_bytes(case + b"\r\n" if sys.argv[1] == "server" else case)
        atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", tmp], target)
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
