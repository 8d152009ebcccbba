"""The scripted SMTP sink for tests, now `engine.lab.sink.protocol` (re-exported here).

    sink = await start_sink(script=lambda verb, arg: "550 5.1.1 no" if "bad" in arg else None)
    await sink.wait_for(10, timeout=5)
    assert sink.messages[0].rcpt_tos == ["a@b.example"]
    await sink.close()

See engine/sink_protocol.py for scripts, `NO_REPLY`, faults and AUTH.

Run as `python -m tests.peers.smtp_sink sink --listen 127.0.0.2:0 [...]` it is `volley sink
--json --no-starttls` (what bench/relay_peers.py starts as its counting destination: ready
line, counter lines, `--targets-from-stdin`; see engine/sink.py). Run as `python -m
tests.peers.smtp_sink serve -c FILE` it is a stand-in for `volley serve` (reads
[[listeners]] address from the TOML, prints the JSON "ready" line on stderr, stores
nothing), so bench/e2e.py can be exercised without the real server.
"""

from __future__ import annotations

import asyncio

from engine.lab.sink.protocol import (
    NO_REPLY,
    Faults,
    Script,
    Sink,
    SinkMessage,
    SinkProtocol,
    start_sink,
    start_sinks,
)

__all__ = ["NO_REPLY", "Faults", "Script", "Sink", "SinkMessage", "SinkProtocol", "start_sink",
           "start_sinks"]


def _serve_main(argv: list[str]) -> int:
    """Stand-in for `volley serve -c FILE`: one process, stores nothing, logs JSON to stderr."""
    import json
    import signal
    import sys
    import tomllib

    if len(argv) < 3 or argv[0] != "serve" or argv[1] != "-c":
        print("usage: python -m tests.peers.smtp_sink serve -c FILE", file=sys.stderr)
        return 2
    with open(argv[2], "rb") as f:
        config = tomllib.load(f)
    address = config.get("listeners", [{}])[0].get("address", "127.0.0.1:2525")
    host, _, port = address.rpartition(":")

    async def serve() -> None:
        sink = await start_sink(host, int(port), keep_segments=False, record=False)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps({"event": "ready", "listeners": [f"{host}:{sink.port}"]}),
              file=sys.stderr, flush=True)
        await stop.wait()
        await sink.close()

    import uvloop

    uvloop.run(serve())
    return 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        from engine.lab.sink.cli import main

        # The counting destination of the relay benchmarks: plaintext, as it always was.
        return main(["--json", "--no-starttls", *argv[1:]])
    return _serve_main(argv)


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
