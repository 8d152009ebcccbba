"""Talking to the HTTP injection API in tests: a real aiohttp client over loopback,
and every JSON answer checked against docs/openapi.json."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.openapi_check import check_request, check_response

TOKEN = "Ab3dEf6hIj9kLm2nOp5qRs8t"  # the "tests" token
BARE_TOKEN = "bare-token-0123456789abcdef"


def http_overrides(tmp: Path, **http: Any) -> dict[str, Any]:
    """[http] on 127.0.0.1:0 with a tokens file holding a named and a bare token."""
    tmp.mkdir(parents=True, exist_ok=True)
    tokens = tmp / "tokens"
    tokens.write_text(f"# API clients\ntests:{TOKEN}\n\n{BARE_TOKEN}\n")
    return {"http": {"listen": "127.0.0.1:0", "tokens_file": str(tokens), **http}}


def newsletter(n: int, *, domain: str = "example.test", **extra: Any) -> dict[str, Any]:
    """A templated campaign of `n` recipients r0..r{n-1}@domain."""
    body: dict[str, Any] = {
        "envelope_sender": "news@home.test",
        "content": {
            "from": "Newsletter <news@home.test>",
            "subject": "Hello {{ first }}",
            "text_body": "Dear {{ first }},\nyour code is {{ code }} ({{ season }}).\n",
        },
        "recipients": [{"email": f"r{i}@{domain}", "name": f"Reader {i}",
                        "substitutions": {"first": f"R{i}", "code": 1000 + i}} for i in range(n)],
        "substitutions": {"season": "spring", "first": "nobody"},
        "campaign_id": "spring-2026",
    }
    body.update(extra)
    return body


class Answer:
    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw
        self.body: Any = orjson.loads(raw) if raw else None

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.raw[:300]!r})"


def _operation(path: str) -> str:
    return re.sub(r"^/api/v1/campaigns/[^/?]+", "/api/v1/campaigns/{id}", path.split("?")[0])


def call(port: int, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
         raw: bytes | None = None, headers: dict[str, str] | None = None,
         scheme: str = "http", cafile: str | None = None, timeout: float = 120.0) -> Answer:
    """One request on a fresh connection; the answer's JSON checked against the
    OpenAPI document for that operation and status."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    data = raw
    if body is not None:
        check_request(body)
        data = orjson.dumps(body)
        hdrs.setdefault("Content-Type", "application/json")

    async def go() -> Answer:
        ssl_ctx = ssl.create_default_context(cafile=cafile) if cafile else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.request(method, f"{scheme}://127.0.0.1:{port}{path}", data=data,
                                 headers=hdrs, ssl=ssl_ctx if ssl_ctx else True) as r:
                return Answer(r.status, dict(r.headers), await r.read())

    answer = asyncio.run(go())
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer
    check_response(_operation(path), method, answer.status, answer.body)
    return answer


def inject(port: int, body: Any, **kw: Any) -> Answer:
    return call(port, "POST", "/api/v1/inject", body, **kw)
