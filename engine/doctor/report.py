"""The doctor's report: every finding in one line, as text for people or JSON for tools."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from engine.doctor.model import ADVICE, FAIL, OK, Finding, Source


@dataclass(frozen=True, slots=True)
class Report:
    domain: str
    sources: tuple[Source, ...]
    ehlo: str
    findings: tuple[Finding, ...]

    @property
    def ready(self) -> bool:
        """No FAIL: advice does not stop a domain from sending."""
        return not any(f.level == FAIL for f in self.findings)

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_text(report: Report) -> str:
    """One line per finding ("LEVEL  check  subject: message"), each record to publish
    on an indented "publish:" line under it, and a verdict last."""
    sources = ", ".join(f"{s.ip} ({s.origin})" for s in report.sources) or "none known"
    lines = [f"volley doctor {report.domain}: sending from {sources}; EHLO {report.ehlo or '(none)'}"]
    width = max((len(f.check) for f in report.findings), default=0)
    for f in report.findings:
        lines.append(f"{f.level:<6}  {f.check:<{width}}  {f.subject}: {f.message}")
        for record in f.publish:
            lines.append(f"{'':<6}  {'':<{width}}  publish: {record.zone_line()}")
    fails, advice = report.count(FAIL), report.count(ADVICE)
    if report.ready:
        verdict = f"{report.domain} is ready to send" + (f" ({_plural(advice, 'piece')} of advice)" if advice else "")
    else:
        verdict = (f"{report.domain} is NOT ready: {_plural(fails, 'problem')}"
                   + (f", {_plural(advice, 'piece')} of advice" if advice else ""))
    lines.append(verdict)
    return "\n".join(lines) + "\n"


def as_json(report: Report) -> dict[str, object]:
    return {
        "domain": report.domain,
        "ready": report.ready,
        "ehlo": report.ehlo,
        "sources": [{"ip": s.ip, "ehlo": s.ehlo, "origin": s.origin} for s in report.sources],
        "counts": {level: report.count(level) for level in (OK, FAIL, ADVICE)},
        "findings": [_finding(f) for f in report.findings],
    }


def _finding(f: Finding) -> dict[str, object]:
    return {"check": f.check, "level": f.level, "subject": f.subject, "message": f.message,
            "publish": [{"name": r.name, "type": r.type, "value": r.value, "zone": r.zone_line()}
                        for r in f.publish]}


def render_json(report: Report) -> str:
    return json.dumps(as_json(report), indent=2) + "\n"


def problems(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == FAIL]
