"""The shaping row of bench/run.py: one newsletter of 50,000 messages to five providers
with different [[shaping]] caps, against sinks that count each provider's sessions and
arrivals; then a priority-9 message to the slowest provider.

    .venv/bin/python bench/shaping.py              # 50,000 messages, 1 run (~2-3 min on 2 cores)
    .venv/bin/python bench/shaping.py --quick      # 10,000 messages (~25 s)
    .venv/bin/python bench/run.py --only shaping   # the same, as a row group of `make bench`

This module is bench/run.py's `--only shaping` with its own results file
(bench/results/shaping.json); run.py calls `cell` for the row and shaping_report's
`targets` and `print_table`. One run:

* a fresh `volley serve` (fsync, 2 workers, `[http]` on 127.0.0.1), the loopback DNS
  server as its only nameserver, a `[[shaping]]` entry per provider matched by
  `mx_suffix`; each provider's recipient domains (4-8, owned by both workers) have MX
  hosts under the provider's suffix, resolving to the provider's own 127.0.0.x
  addresses (two sites for `medium` and `large`);
* the sinks (bench/shaping_sink.py): one process, one counting sink per provider;
* ONE `POST /api/v1/inject` of N recipients (default 50,000, priority 5), the providers
  interleaved in proportion to their shares; once it is answered (all N queued) and the
  slowest provider has received --warm of them, one more request with one recipient
  at that provider and `"priority": 9`; then until every message is delivered.

The shares are chosen so that every rate-capped provider needs the same time (its
share ÷ its rate, 100 s at 50,000), so all four are under load together for the
whole run. Figures per provider (bench/shaping_report.py): peak concurrent sessions
against the cap, the achieved rate against the allowed rate, the most messages in any
1 s window against rate + burst, and the priority message's delivery time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import newsletter  # noqa: E402
import shaping_report  # noqa: E402
from e2e import REPO  # noqa: E402  (bench/ is not a package)
from peers.procs import sample  # noqa: E402
from relay_peers import LIFETIME, Peer  # noqa: E402

from engine.queue.layout import stable_shard  # noqa: E402

RESULTS = REPO / "bench" / "results" / "shaping.json"
MESSAGES = 50_000
WATCH = "reset@"  # the priority message's recipient: reset@<a domain of the slowest provider>


@dataclass(frozen=True)
class Provider:
    name: str
    cap: int | None  # max_connections; None: no server-wide cap (20 per pool, the default)
    rate: str | None  # the entry's rate; None: no rate
    share: int  # messages of MESSAGES
    sites: tuple[str, ...]  # the sink addresses its MX hosts resolve to
    domains: tuple[str, ...]  # recipient domains (each owned by one of 2 workers)
    per_domain_mx: bool = False  # each domain its own MX name (as Outlook's), else 2 shared names

    @property
    def suffix(self) -> str:
        return f".mx.{self.name}.test"

    @property
    def per_second(self) -> float:
        from engine.config.shaping import parse_rate

        return parse_rate(self.rate) if self.rate else 0.0

    def site(self, k: int) -> str:
        """Domain k's sink address: pairs of domains per site, so that each site has
        domains of both workers (ownership alternates with k here; check_layout)."""
        return self.sites[k // 2 % len(self.sites)]

    def mx(self, k: int) -> str:
        if self.per_domain_mx:
            return f"{self.domains[k].replace('.', '-')}{self.suffix}"  # small0-example.mx.small.test
        if len(self.sites) > 1:
            return f"mx{k // 2 % len(self.sites)}{self.suffix}"  # one name per site
        return f"mx{k % 2}{self.suffix}"  # two names, one address


def _domains(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{k}.example" for k in range(n))


PROVIDERS = (
    Provider("tiny", 2, "600/min", 1_000, ("127.0.0.21",), _domains("tiny", 4)),
    Provider("small", 4, "3000/min", 5_000, ("127.0.0.22",), _domains("small", 5), per_domain_mx=True),
    Provider("medium", 8, "100/s", 10_000, ("127.0.0.23", "127.0.0.33"), _domains("medium", 6)),
    Provider("large", 16, "300/s", 30_000, ("127.0.0.24", "127.0.0.34"), _domains("large", 8)),
    Provider("open", None, None, 4_000, ("127.0.0.25",), _domains("open", 6)),
)
SLOWEST = PROVIDERS[0]
PRIORITY_RCPT = f"{WATCH}{SLOWEST.domains[1]}"


def check_layout(workers: int = 2) -> None:
    """Every site of every provider has domains owned by each worker (the caps must hold
    across workers and across a provider's pools)."""
    for p in PROVIDERS:
        for site in p.sites:
            owners = {stable_shard(d, workers) for k, d in enumerate(p.domains) if p.site(k) == site}
            if len(owners) != workers:
                raise RuntimeError(f"shaping bench: {p.name}'s domains at {site} are owned by workers {owners} only")


def zone() -> dict[str, Any]:
    """The loopback DNS zone: domain MX → provider MX hosts → the provider's sink addresses."""
    z: dict[str, Any] = {}
    for p in PROVIDERS:
        for k, domain in enumerate(p.domains):
            host = p.mx(k)
            z[domain] = {"MX": [[10, host]]}
            z[host] = {"A": [p.site(k)]}
    return z


def shaping_entries() -> list[dict[str, Any]]:
    out = []
    for p in PROVIDERS:
        entry: dict[str, Any] = {"name": p.name, "mx_suffix": p.suffix}
        if p.cap is not None:
            entry["max_connections"] = p.cap
        if p.rate is not None:
            entry["rate"] = p.rate
        out.append(entry)
    return out


def shares(n: int) -> dict[str, int]:
    """Each provider's messages when the newsletter has n (the shares scaled, the sum n)."""
    total = sum(p.share for p in PROVIDERS)
    out = {p.name: p.share * n // total for p in PROVIDERS}
    out[PROVIDERS[-1].name] += n - sum(out.values())
    return out


def recipients(n: int) -> list[str]:
    """n addresses, the providers interleaved evenly (as a real list mixes them), each
    provider's spread round robin over its domains."""
    keyed = []
    for p in PROVIDERS:
        m = shares(n)[p.name]
        keyed += [((j + 0.5) / m, p.name, f"u{j}@{p.domains[j % len(p.domains)]}") for j in range(m)]
    keyed.sort()
    return [address for _, _, address in keyed]


def request_body(addresses: list[str], campaign: str, priority: int = 5) -> dict[str, Any]:
    body = newsletter.campaign(1, campaign)
    template = body["recipients"][0]
    body["recipients"] = [{**template, "email": a, "name": f"Reader {i}"} for i, a in enumerate(addresses)]
    if priority != 5:
        body["priority"] = priority
    return body


class ShapedVolley(newsletter.NewsletterVolley):
    """`volley serve` (fsync, [http]) relaying to the providers' sinks, one [[shaping]]
    entry per provider."""

    def __init__(self, workers: int, cmd: list[str], relay: tuple[int, int], ready_timeout: float,
                 max_recipients: int) -> None:
        super().__init__(newsletter.Mode("volley-shaping", "", True, False), workers, cmd, relay, ready_timeout)
        self.max_recipients = max_recipients

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["shaping"] = shaping_entries()
        config["http"]["max_recipients"] = self.max_recipients
        return config

    def shaping(self, domain: str) -> dict[str, Any]:
        """`volley ctl shaping DOMAIN` (the rule and why); {"error": ...} if it fails."""
        from engine.control.client import request
        from engine.control.protocol import Shaping

        try:
            return request(str(self.tmp / "volley.sock"), Shaping(domain=domain), 10.0)
        except Exception as err:  # noqa: BLE001  (a figure beside the row, never its failure)
            return {"error": repr(err)}


class Sinks(Peer):
    """bench/shaping_sink.py: one counting sink per provider."""

    def __init__(self) -> None:
        argv = [str(REPO / "bench" / "shaping_sink.py"), "--watch", WATCH, "--lifetime", str(LIFETIME - 60)]
        for p in PROVIDERS:
            argv += ["--provider", f"{p.name}={','.join(p.sites)}"]
        super().__init__("shaping sinks", argv, stdin=True)
        self.port = int(self.wait_event("ready", 30)["port"])

    def count(self, provider: str = "") -> int:
        with self.cond:
            return int(self.last.get("by", {}).get(provider, 0) if provider else self.last.get("messages", 0))

    def wait_count(self, target: int, provider: str, stall: float, cap: float) -> None:
        """Until the sinks (or one provider's) have `target` messages; raises on a stall."""
        deadline = time.monotonic() + cap
        seen, since = -1, time.monotonic()
        while (got := self.count(provider)) < target:
            now = time.monotonic()
            if got != seen:
                seen, since = got, now
            if self.proc.poll() is not None:
                raise RuntimeError(f"shaping sinks exited {self.proc.returncode}")
            if now - since > stall or now > deadline:
                why = f"no progress for {stall:.0f}s" if now <= deadline else f"{cap:.0f}s cap"
                raise RuntimeError(f"sinks{' of ' + provider if provider else ''} have {got}/{target}"
                                   f" messages ({why}); by provider {self.last.get('by')}")
            time.sleep(0.05)

    def dump(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"dump\n")
        self.proc.stdin.flush()
        return dict(self.wait_event("dump", timeout)["providers"])


def post(address: str, body: dict[str, Any], n: int, tmp: Path, cap: float) -> tuple[float, float]:
    """One inject request of n recipients; (t0, t1) monotonic: sent, answered."""
    path = tmp / f"request-{n}.json"
    path.write_text(json.dumps(body))
    res = newsletter.post(address, newsletter.TOKEN, path, n, cap)
    if res.error:
        raise RuntimeError(res.error)
    return res.t0, res.t0 + res.elapsed_s


def one_run(bench: Any, dns_port: int, n: int) -> dict[str, Any]:
    """A fresh server and sinks, the newsletter, the priority message, all delivered."""
    a = bench.args
    slow = max(shares(n)[p.name] / p.per_second for p in PROVIDERS if p.rate)  # seconds at the rates
    cap = 120 + 3 * slow
    sinks = Sinks()
    server = ShapedVolley(a.workers, bench.volley_cmd, (dns_port, sinks.port), a.ready_timeout, n + 10)
    r: dict[str, Any] = {"messages": n, "shares": shares(n)}
    try:
        with tempfile.TemporaryDirectory(prefix="volley-shaping-") as tmp:
            http = server.start()
            before = sample(server.root_pid)
            t0, queued = post(http, request_body(recipients(n), "shaping"), n, Path(tmp), 120 + n / 500)
            r.update(accepted=n, queue_s=queued - t0)
            r["rules"] = {p.name: server.shaping(p.domains[0]) for p in PROVIDERS}
            sinks.wait_count(a.shaping_warm, SLOWEST.name, a.stall, 60)
            r["slowest_before_priority"] = sinks.count(SLOWEST.name)
            p0, p1 = post(http, request_body([PRIORITY_RCPT], "reset", priority=9), 1, Path(tmp), 60)
            r["priority"] = priority_figures(sinks, p0, p1, a.shaping_patience)
            sinks.wait_count(n + 1, "", a.stall, cap)
            r["delivered_log"] = len(server.drain(n + 1, a.stall, 60))
            after = sample(server.root_pid)
            r["server_cpu_us_per_msg"] = 1e6 * (after.cpu_s - before.cpu_s) / (n + 1)
            data = sinks.dump()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        r["error"] = f"{err}\n{server.diagnostics()}"
        return r
    finally:
        server.stop()
        sinks.stop()
    r.update(exit=server.details.get("exit"), queue_left=server.details.get("queue_left"))
    r["providers"] = {p.name: shaping_report.analyse(p, data[p.name], t0) for p in PROVIDERS}
    # The slowest provider's raw timeline (about 2,000 numbers), for a closer look at its rate.
    raw = data[SLOWEST.name]
    r["providers"][SLOWEST.name]["raw"] = {"arrivals": [round(t - t0, 4) for t in raw["arrivals"]],
                                            "sessions": [[round(t - t0, 4), n] for t, n in raw["sessions"]]}
    r["elapsed_s"] = max(v["last_s"] for v in r["providers"].values())
    r["msgs_per_s"] = (n + 1) / r["elapsed_s"]
    r["complete"] = r["queue_left"] == 0 and r["exit"] == 0 and \
        sum(v["messages"] for v in r["providers"].values()) == n + 1
    return r


def priority_figures(sinks: Sinks, sent: float, accepted: float, patience: float) -> dict[str, Any]:
    """When the priority message arrived: seconds after its request was sent (and
    answered), and how many of its provider's newsletter messages arrived in between."""
    at_answer = sinks.count(SLOWEST.name)
    try:
        seen = sinks.wait_event("watched", patience)
    except RuntimeError:
        return {"delivered": False, "waited_s": patience, "recipient": PRIORITY_RCPT}
    # `seconds` counts from the request (an upper bound: the client's answer can be read
    # after the message has already left); `after_answer` from when the client read it.
    return {"delivered": True, "recipient": PRIORITY_RCPT, "seconds": float(seen["t"]) - sent,
            "after_answer_s": float(seen["t"]) - accepted, "request_s": accepted - sent,
            "newsletter_between": max(0, int(seen["before"]) - at_answer)}


def cell(bench: Any, row: Any, system: Any) -> dict[str, Any]:
    """The row's one cell: --shaping-runs runs, each with a fresh server and sinks."""
    a = bench.args
    check_layout(a.workers)
    with tempfile.TemporaryDirectory(prefix="volley-shaping-dns-") as tmp:
        path = Path(tmp) / "zone.json"
        path.write_text(json.dumps(zone(), indent=1))
        dns = Peer("dns", ["-m", "engine.lab.dns", "--zone", str(path), "--origin", ".",
                           "--lifetime", str(LIFETIME - 60)])
        runs: list[dict[str, Any]] = []
        try:
            port = int(dns.wait_event("ready", 60)["port"])
            for i in range(a.shaping_runs):
                r = one_run(bench, port, a.shaping_messages)
                runs.append(r)
                if "error" in r:
                    break
                print(f"  shaping        run {i + 1}/{a.shaping_runs}: {shaping_report.one_line(r)}",
                      file=sys.stderr, flush=True)
        finally:
            dns.stop()
    return shaping_report.summarise(row, system, runs)


def unavailable() -> dict[str, str]:
    """Why the row cannot run in this checkout ({} when it can)."""
    missing = [f for f in ("engine/http/__init__.py", "engine/delivery/provider_gate.py", "engine/config/shaping.py")
               if not (REPO / f).exists()]
    return {"shaping": f"shaping row: {', '.join(missing)} not in this checkout"} if missing else {}


def main(argv: list[str] | None = None) -> int:
    """bench/run.py with only the shaping row and its own results file; any run.py
    option may follow (a later --output or --only wins)."""
    import run  # late: run.py imports this module

    rest = list(sys.argv[1:] if argv is None else argv)
    return int(run.main(["--only", "shaping", "--output", str(RESULTS), *rest]))


if __name__ == "__main__":
    raise SystemExit(main())
