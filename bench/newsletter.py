"""The newsletter rows of bench/run.py: one HTTP request of a templated campaign beside
the same mail sent as SMTP messages, with DKIM signing on and off.

    .venv/bin/python bench/newsletter.py            # 10,000 recipients, 3 runs per cell (~3 min)
    .venv/bin/python bench/newsletter.py --quick    # 2,000 recipients, 1 run
    .venv/bin/python bench/run.py --only newsletter # the same, as a row group of `make bench`

This module is bench/run.py's `--only newsletter` with its own results file
(bench/results/newsletter.json); run.py calls `server`, `generate`, `add_ratios`,
`targets`, `sign_rates` and `print_table` for the row. Cells (Volley fsync, 2 workers,
relaying to the shared sink through the loopback DNS, `[http]` on 127.0.0.1 with a
tokens file in every cell):

* `volley-smtp` / `volley-smtp-dkim`: N 1 KB messages over SMTP by `engine.lab.blast`
  (pipelined, 50 sessions) to u{n}@d{n % 50}.example, From: blast@volley.test, without
  and with a `[[dkim]]` RSA-2048 key for volley.test (the relay network's mail is
  signed as it leaves).
* `volley-http` / `volley-http-dkim`: ONE `POST /api/v1/inject` carrying N recipients
  over the same 50 domains, three substitutions each, subject, text and HTML templates
  and list_unsubscribe (~1 KB rendered), From: news@volley.test, sent by a client
  process (aiohttp) like blast is. "accepted/s" = N ÷ (POST → response), "delivered/s"
  = N ÷ (POST → the sink has counted the N-th message).

Signing speed: `sign_rates` times `engine.mail.dkim.DkimSigner.sign` in this process
on a 1 KB message, RSA-2048 and Ed25519, per CPU second (= per core).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import REPO, run_child  # noqa: E402  (bench/ is not a package)
from peers import load, report, systems  # noqa: E402
from peers.procs import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "newsletter.json"
DOMAIN = "volley.test"  # the From: domain of both kinds of mail, and the [[dkim]] domain
SELECTOR = "bench"
SENDER = f"news@{DOMAIN}"
DOMAINS = 50
MESSAGES = 10_000
TARGET = 0.9  # the campaign is delivered at >= 90% of the SMTP relay rate, DKIM on
CAMPAIGN = "bench"
TOKEN = secrets.token_urlsafe(24)  # every server of this invocation accepts it
_bodies: tempfile.TemporaryDirectory[str] | None = None  # the request bodies, built once per size


@dataclass(frozen=True)
class Mode:
    id: str
    label: str
    http: bool
    dkim: bool


MODES = (Mode("volley-smtp", "SMTP (blast), no DKIM", False, False),
         Mode("volley-smtp-dkim", "SMTP (blast), DKIM RSA-2048", False, True),
         Mode("volley-http", "HTTP campaign, no DKIM", True, False),
         Mode("volley-http-dkim", "HTTP campaign, DKIM RSA-2048", True, True))
BY_ID = {m.id: m for m in MODES}


# --- keys -------------------------------------------------------------------------------

def write_key(path: Path, algorithm: str = "rsa-sha256") -> Path:
    """A fresh private key in PEM (PKCS#8): RSA-2048 or Ed25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = (ed25519.Ed25519PrivateKey.generate() if algorithm == "ed25519-sha256"
           else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


# --- the server -------------------------------------------------------------------------

class NewsletterVolley(systems.Volley):
    """`volley serve` (fsync) relaying to the sink, with `[http]` and optionally `[[dkim]]`.
    `start()` answers the address the mode's load goes to: the HTTP one for a campaign."""

    def __init__(self, mode: Mode, workers: int, cmd: list[str], relay: tuple[int, int],
                 ready_timeout: float) -> None:
        super().__init__("fsync", workers, cmd, relay, ready_timeout)
        self.mode = mode
        self.http_address = f"127.0.0.1:{free_port('127.0.0.1')}"

    def config(self) -> dict[str, Any]:
        config = super().config()
        tokens = self.tmp / "tokens"
        tokens.write_text(f"bench:{TOKEN}\n")
        tokens.chmod(0o600)
        config["http"] = {"listen": self.http_address, "tokens_file": str(tokens)}
        if self.mode.dkim:
            key = write_key(self.tmp / "dkim-rsa.pem")
            config["dkim"] = [{"domain": DOMAIN, "selector": SELECTOR, "key_file": str(key)}]
        return config

    def start(self) -> str:
        smtp = super().start()
        self.details["dkim"] = "rsa-2048" if self.mode.dkim else "off"
        if not self.mode.http:
            return smtp
        wait_http(self.http_address, TOKEN, self.ready_timeout)
        return self.http_address


def wait_http(address: str, token: str, timeout: float) -> None:
    """Until the API answers anything over HTTP (the workers serve it after `ready`)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"http://{address}/api/v1/campaigns/bench-probe",
                                     headers={"Authorization": f"Bearer {token}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # 404 for an unknown campaign: the API is up
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP API on {address} not answering after {timeout:.0f}s: {err}") from None
        time.sleep(0.1)


def unavailable() -> dict[str, str]:
    """Cells that cannot run in this checkout, with why (run.py skips them with a note)."""
    if (REPO / "engine" / "http" / "__init__.py").exists():
        return {}
    return {m.id: "engine/http (the injection API) is not in this checkout" for m in MODES if m.http}


def server(bench: Any, system: Any, sink: Any) -> NewsletterVolley:
    a = bench.args
    relay = (bench.dns_for_volley(a.zone_domains), sink.port)
    return NewsletterVolley(BY_ID[system.id], a.workers, bench.volley_cmd, relay, a.ready_timeout)


# --- the campaign request -----------------------------------------------------------------

FIRST = ("Ana", "Bo", "Chidi", "Dana", "Emil", "Farah", "Goran", "Hiro", "Ines", "Jun")
CITIES = ("Lisbon", "Oslo", "Lagos", "Quito", "Hanoi", "Perth", "Tunis", "Lyon", "Kobe", "Graz")
SUBJECT = "{{ first }}, your {{ city }} digest #{{ issue }}"
TEXT = """Hello {{ first }},

This week in {{ city }}: new routes, a longer market.

Read it all: https://news.volley.test/{{ issue }}?m={{ code }}
"""
HTML = """<p>Hello {{ first }},</p>
<p>This week in {{ city }}: new routes, a longer market.
<a href="https://news.volley.test/{{ issue }}?m={{ code }}">Read it all</a></p>
"""


def campaign(n: int, campaign_id: str) -> dict[str, Any]:
    """The request body: n recipients over DOMAINS domains, three substitutions each."""
    recipients = [{"email": f"u{i}@d{i % DOMAINS}.example", "name": f"Reader {i}",
                   "substitutions": {"first": FIRST[i % 10], "city": CITIES[i // 10 % 10], "code": f"{i:08x}"}}
                  for i in range(n)]
    return {
        "envelope_sender": SENDER,
        "campaign_id": campaign_id,
        "content": {"from": f"Volley News <{SENDER}>", "subject": SUBJECT, "text_body": TEXT,
                    "html_body": HTML},
        "substitutions": {"issue": "42"},
        "list_unsubscribe": {"url": "https://news.volley.test/unsubscribe", "mailto": f"mailto:unsubscribe@{DOMAIN}"},
        "recipients": recipients,
    }


# Runs in a child process (like blast, so its CPU is its own): POST the file's body,
# then print one JSON line. T0 on stderr is time.monotonic() just before the request.
POST_CHILD = """
import asyncio, json, sys, time
import aiohttp

async def main(url, token, path, timeout):
    body = open(path, "rb").read()
    headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        sys.stderr.write(f"T0 {time.monotonic()!r}\\n"); sys.stderr.flush()
        t0 = time.monotonic()
        async with session.post(url, data=body, headers=headers) as resp:
            text = await resp.text()
            t1 = time.monotonic()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = text[:2000]
    print(json.dumps({"status": resp.status, "t0": t0, "t1": t1, "answer": answer,
                      "cpu_s": time.process_time(), "bytes": len(body)}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


def post(address: str, token: str, body: Path, n: int, cap: float) -> load.LoadResult:
    """One inject request in a client process; the answer's success_count is `accepted`."""
    cmd = [sys.executable, "-c", POST_CHILD, f"http://{address}/api/v1/inject", token, str(body), str(cap - 5)]
    try:
        rc, out, err, t_launch, _, cpu = run_child(cmd, cap, "inject client")
    except (RuntimeError, subprocess.SubprocessError) as error:
        return load.LoadResult(n, 0, time.monotonic(), 0.0, 0.0, error=str(error))
    if rc != 0 or not out.strip():
        return load.LoadResult(n, 0, t_launch, 0.0, cpu,
                               error=f"inject client exit {rc}: {err.decode('utf-8', 'replace')[-800:]}")
    done = json.loads(out)
    answer = done["answer"]
    accepted = int(answer.get("success_count", 0)) if isinstance(answer, dict) else 0
    result = load.LoadResult(n, accepted, float(done["t0"]), float(done["t1"]) - float(done["t0"]), cpu)
    if done["status"] != 200 or accepted != n:
        result.error = f"inject: HTTP {done['status']}, accepted {accepted}/{n}: {json.dumps(answer)[:800]}"
    return result


def generate(bench: Any, system: Any, address: str, n: int) -> load.LoadResult:
    """The mode's load for n messages: blast over SMTP, or one campaign request."""
    cap = 120 + n / 20
    if not BY_ID[system.id].http:
        return load.blast(address, n, bench.args.sessions, 1024, DOMAINS, True, cap)
    global _bodies
    if _bodies is None:
        _bodies = tempfile.TemporaryDirectory(prefix="volley-newsletter-")
    body = Path(_bodies.name) / f"campaign-{n}.json"
    if not body.exists():
        body.write_text(json.dumps(campaign(n, CAMPAIGN)))
    return post(address, TOKEN, body, n, cap)


# --- signing speed, the rendered size ---------------------------------------------------

def sign_rates(seconds: float = 1.0) -> dict[str, dict[str, Any]]:
    """DKIM signatures of a 1 KB message per CPU second of one thread (= per core),
    RSA-2048 and Ed25519, timed here with the engine's own signer."""
    from engine.config import DkimConfig
    from engine.lab.blast.message import make_message
    from engine.mail.dkim import DkimSigner

    message = make_message(1024, SENDER)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="volley-dkim-") as tmp:
        for name, algorithm in (("rsa-2048", "rsa-sha256"), ("ed25519", "ed25519-sha256")):
            key = write_key(Path(tmp) / f"{name}.pem", algorithm)
            try:
                entry = DkimConfig(domain=DOMAIN, selector=SELECTOR, key_file=str(key), algorithm=algorithm)
                signer = DkimSigner.from_config([entry])
                if not signer.sign(message):
                    raise ValueError("DkimSigner.sign returned no signature")
            except ValueError as err:
                out[name] = {"error": str(err)}
                continue
            count, start = 0, time.thread_time()
            while (cpu := time.thread_time() - start) < seconds:
                for _ in range(10):
                    signer.sign(message)
                count += 10
            out[name] = {"signatures": count, "cpu_s": round(cpu, 3), "per_core_per_s": count / cpu,
                         "us_per_signature": 1e6 * cpu / count}
    return out


def rendered_bytes() -> int | None:
    """The size of one recipient's message as the engine renders the campaign (no
    DKIM-Signature yet); None when engine.mail.compose is not there."""
    try:
        from engine.mail.compose import ContentSpec, ListUnsubscribe, compile_content
    except ImportError:
        return None
    body = campaign(1, CAMPAIGN)
    content = body["content"]
    spec = ContentSpec(from_=content["from"], subject=content["subject"], text_body=content["text_body"],
                       html_body=content["html_body"])
    rcpt = body["recipients"][0]
    bindings = {**body["substitutions"], **rcpt["substitutions"], "email": rcpt["email"], "name": rcpt["name"]}
    try:
        compiled = compile_content(spec, list_unsubscribe=ListUnsubscribe(**body["list_unsubscribe"]))
        from engine.mail import verp

        # The Message-ID the API gives: the recipient's VERP token and a random part.
        token = verp.encode_token(rcpt["email"], CAMPAIGN)
        return len(compiled.render(bindings, message_id=verp.message_id(token, "relay.volley.test")))
    except ValueError as err:  # TemplateError, RenderError: the request would fail the same way
        print(f"newsletter: the campaign does not render: {err}", file=sys.stderr)
        return None


def facts() -> dict[str, Any]:
    """What the newsletter table shows beside the cells; for latest.json too."""
    return {"dkim_sign_1k": sign_rates(), "campaign_rendered_bytes": rendered_bytes(),
            "recipient_domains": DOMAINS, "dkim_domain": DOMAIN}


# --- ratios, targets, the table -----------------------------------------------------------

def _cells(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["system"]: c for c in cells if c.get("kind") == "newsletter"}


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """A campaign ÷ the SMTP relay with the same signing ("smtp"); signed SMTP ÷
    unsigned ("unsigned"): delivered msgs/s medians."""
    mine = _cells(cells)
    for system, c in mine.items():
        mode = BY_ID[system]
        key, base = (("smtp", mine.get("volley-smtp-dkim" if mode.dkim else "volley-smtp")) if mode.http
                     else ("unsigned", mine.get("volley-smtp") if mode.dkim else None))
        if base is not None and report.median(base) and report.median(c):
            c.setdefault("ratios", {})[key] = report.median(c) / report.median(base)  # type: ignore[operator]


def targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mine = _cells(cells)
    ratio = mine.get("volley-http-dkim", {}).get("ratios", {}).get("smtp")
    signed = mine.get("volley-smtp-dkim", {}).get("ratios", {}).get("unsigned")
    return [{"target": "campaign delivered >= 90% of SMTP relay, DKIM on", "value": ratio,
             "goal": TARGET, "met": None if ratio is None else ratio >= TARGET},
            {"target": "(SMTP relay, DKIM RSA-2048 ÷ unsigned)", "value": signed,
             "goal": None, "met": None}]


def _rate(c: dict[str, Any], key: str) -> str:
    m = c.get(key)
    if not m:
        return "n/a"
    return f"{m['median']:,.0f}" if m["min"] == m["max"] else f"{m['median']:,.0f} ({m['min']:,.0f}..{m['max']:,.0f})"


def _split(c: dict[str, Any]) -> str:
    runs = c.get("runs") or []
    split = runs[len(runs) // 2].get("worker_cpu_split_pct") if runs else None
    return "/".join(f"{x:.0f}" for x in split) if split else "n/a"


def print_table(cells: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    mine = _cells(cells)
    if not mine and not extra:
        return
    n = next((c["runs"][0]["messages"] for c in mine.values() if c.get("runs")), 0)
    size = extra.get("campaign_rendered_bytes")
    print(f"\nnewsletter: {n:,} recipients over {DOMAINS} domains, volley fsync, 2 workers, to the sink;"
          f" SMTP by engine.lab.blast (pipelined, --sessions, 1,024 B), the campaign as one request"
          f" ({size if size else '?'} B per recipient rendered)")
    head = (f"{'cell':<28} {'accepted/s':>24} {'delivered/s e2e':>24} {'server us/msg':>13}"
            f" {'worker split %':>14} {'ratio':>16}  note")
    print(head)
    print("-" * len(head))
    for mode in MODES:
        c = mine.get(mode.id)
        if c is None:
            continue
        cpu = report.median(c, "cpu_s_per_1k")
        r = c.get("ratios", {})
        ratio = (f"{r['smtp']:.2f} x SMTP" if "smtp" in r else f"{r['unsigned']:.2f} x unsig" if "unsigned" in r
                 else "")
        print(f"{mode.label:<28} {_rate(c, 'intake_msgs_per_s'):>24} {_rate(c, 'msgs_per_s'):>24}"
              f" {'n/a' if cpu is None else f'{1000 * cpu:.0f}':>13} {_split(c):>14} {ratio:>16}"
              f"  {'' if c['complete'] else 'INCOMPLETE'}")
    sign = extra.get("dkim_sign_1k") or {}
    shown = [f"{name} {v['per_core_per_s']:,.0f}/s ({v['us_per_signature']:.0f} us)" if "per_core_per_s" in v
             else f"{name}: {v.get('error')}" for name, v in sign.items()]
    if shown:
        print(f"DKIM signatures of a 1 KB message per core (engine.mail.dkim, in-process): {'; '.join(shown)}")


def main(argv: list[str] | None = None) -> int:
    """bench/run.py with only the newsletter row and its own results file; any run.py
    option may follow (a later --output or --only wins)."""
    import run  # late: run.py imports this module

    rest = list(sys.argv[1:] if argv is None else argv)
    return int(run.main(["--only", "newsletter", "--output", str(RESULTS), *rest]))


if __name__ == "__main__":
    raise SystemExit(main())
