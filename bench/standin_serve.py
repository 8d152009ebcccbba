"""A stand-in for `volley serve -c FILE` in the receive benchmark (bench/e2e.py).

    .venv/bin/python bench/e2e.py --server-cmd "$PWD/.venv/bin/python bench/standin_serve.py"

One process running the lab sink on the first `[[listeners]] address` of FILE: it
answers 250 to everything and stores nothing, and prints the same JSON "ready" line on
stderr as the real server. Useful to check the benchmark harness itself and to see the
load generator's own cost.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tomllib
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import split_host_port  # noqa: E402  (the repo is put on the path above)
from engine.lab.sink.protocol import start_sink  # noqa: E402


def main(argv: list[str]) -> int:
    """Stand-in for `volley serve -c FILE`: one process, stores nothing, logs JSON to stderr."""
    if len(argv) != 2 or argv[0] != "-c":
        print("usage: python bench/standin_serve.py -c FILE", file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        config = tomllib.load(f)
    address = config.get("listeners", [{}])[0].get("address", "127.0.0.1:2525")
    host, port = split_host_port(address)

    async def serve() -> None:
        sink = await start_sink(host, port, keep_segments=False, record=False)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps({"event": "ready", "listeners": [f"{host}:{sink.port}"]}),
              file=sys.stderr, flush=True)
        await stop.wait()
        await sink.close()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
