"""A 1,000,000-line suppression import against a running server, and what it costs the mail
going through at the same time.

    .venv/bin/python bench/suppress_live.py                       # 1,000,000 lines, 20 s phases
    .venv/bin/python bench/suppress_live.py --lines 200000 --json

`python -m engine serve` (2 workers, fsync) relaying d0.example to a counting sink process
(the same setup as bench/control_live.py, with an empty queue). engine.lab.blast runs for
--duration seconds as a baseline, then again while `volley ctl suppress import` reads a
--lines file (chunks of 10,000, one write transaction each). Reported: delivered msgs/s in
each phase, the import's time and rate, and the server's answer to one RCPT lookup
afterwards. All traffic stays on 127.0.0.0/8. See bench/README.md, "Suppression import".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from control_live import LIVE_DOMAIN, LiveSink, ctl, write_config  # noqa: E402
from control_live import blast as run_blast  # noqa: E402
from e2e import REPO, Server, probe_ms  # noqa: E402
from relay_peers import LIFETIME  # noqa: E402

sys.path.insert(0, str(REPO))
from engine.control import protocol  # noqa: E402
from engine.lab.dns import DnsServerThread  # noqa: E402

ZONE = {LIVE_DOMAIN: {"MX": [(10, f"mx.{LIVE_DOMAIN}")]}, f"mx.{LIVE_DOMAIN}": {"A": ["127.0.0.3"]}}


def write_list(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            f.write(f"user{i}@list{i % 997}.example\n")


def phase(address: str, args: argparse.Namespace, sink: LiveSink) -> dict[str, Any]:
    before = sink.count()
    report, _ = run_blast(address, args, args.duration + 120)
    delivered = sink.count() - before
    sink.wait_count(before + report["accepted"], 120)  # drained before the next phase
    return {"accepted": report["accepted"], "elapsed": report["elapsed"],
            "delivered_in_window": delivered,
            "delivered_msgs_per_s": round(delivered / report["elapsed"], 1)}


def import_list(config: Path, path: Path, out: dict[str, Any]) -> None:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "engine", "ctl", "-c", str(config), "suppress", "import",
                          str(path), "--json"], capture_output=True, text=True, timeout=1800, cwd=REPO)
    out["seconds"] = round(time.monotonic() - t0, 2)
    out["rc"] = res.returncode
    out["reply"] = json.loads(res.stdout) if res.stdout.strip() else {"stderr": res.stderr[-2000:]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"lines": args.lines, "probe_ms": round(probe_ms(), 1)}
    with tempfile.TemporaryDirectory(prefix="volley-suppress-live-") as tmpdir:
        tmp = Path(tmpdir)
        listing = tmp / "list.txt"
        write_list(listing, args.lines)
        sink = LiveSink()
        try:
            with DnsServerThread(ZONE, origin=".") as dns:
                config = write_config(tmp, dns.port, sink.port)
                server = Server(["timeout", "-k", "10", str(LIFETIME), sys.executable, "-m", "engine", "serve"],
                                config, tmp)
                try:
                    address = server.wait_ready(args.ready_timeout)
                    report["baseline"] = phase(address, args, sink)
                    done: dict[str, Any] = {}
                    importer = threading.Thread(target=import_list, args=(config, listing, done), daemon=True)
                    importer.start()
                    time.sleep(0.5)  # the first chunks are in when mail starts coming in
                    report["during_import"] = phase(address, args, sink)
                    importer.join(1800)
                    report["import"] = done
                    if done.get("seconds"):
                        report["import"]["lines_per_s"] = round(args.lines / done["seconds"])
                    report["entries_after"] = ctl(str(tmp / "volley.sock"),
                                                  protocol.SuppressList(limit=1))[1].get("total")
                finally:
                    report["server_exit"] = server.stop()
        finally:
            sink.stop()
    base = report["baseline"]["delivered_msgs_per_s"]
    during = report["during_import"]["delivered_msgs_per_s"]
    report["delivery_during_import_vs_baseline"] = round(during / base, 3) if base else None
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of blast per phase")
    p.add_argument("--concurrency", type=int, default=20, help="blast sessions")
    p.add_argument("--size", type=int, default=1024, help="message bytes")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        b, d, imp = report["baseline"], report["during_import"], report.get("import", {})
        print(f"baseline        delivered {b['delivered_msgs_per_s']:>8,.0f} msgs/s")
        print(f"during import   delivered {d['delivered_msgs_per_s']:>8,.0f} msgs/s"
              f"  ({report['delivery_during_import_vs_baseline']:.0%} of baseline)")
        print(f"import of {args.lines:,} lines: {imp.get('seconds')} s"
              f" ({imp.get('lines_per_s', 0):,}/s), entries after: {report['entries_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
