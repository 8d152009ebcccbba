"""The injection API's HTTP server: aiohttp inside the worker's own event loop.

aiohttp serves on the socket the supervisor bound for this worker (`http.listen`,
SO_REUSEPORT, one per worker like the SMTP listeners), so requests spread over the
workers and each one injects through its worker's queue writer, in the same loop as
its SMTP sessions. Every answer is JSON, errors included: `{"error", "field"?}`.

Order of checks on a request: route (404/405) → bearer token (401, RFC 6750 §3) →
content type (415) → size (413, from Content-Length before any byte of the body is
read, else while reading) → JSON and types (400 naming the field) → the request's
own limits (413 for too many recipients) → content, recipients, commit.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from engine.config import Config
from engine.http.inject import Backend, Client, Timings, inject
from engine.http.schema import CampaignBody, ErrorBody, RequestError, decode_request
from engine.http.tokens import Tokens, load_tokens
from engine.observe import log

_API: web.AppKey[HttpApi] = web.AppKey("volley_http_api")
_TOKEN_NAME: web.RequestKey[str] = web.RequestKey("volley_token_name", str)
_encoder = msgspec.json.Encoder()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(status: int, body: msgspec.Struct, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(body),
                        content_type="application/json", headers=headers)


class HttpApi:
    """The API of one worker: its aiohttp runner, site and tokens."""

    def __init__(self, cfg: Config, backend: Backend, tokens: Tokens, tls: bool) -> None:
        self.cfg = cfg
        self.backend = backend
        self.tokens = tokens
        self.tls = tls
        self.last = Timings()
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._sock: socket.socket | None = None
        self._stopping: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, cfg: Config, sock: socket.socket, backend: Backend, *,
                    ssl_context: ssl.SSLContext | None = None) -> HttpApi:
        """Serve `sock` (already listening). Raises ConfigError for the tokens file."""
        api = cls(cfg, backend, load_tokens(cfg.http.tokens_file), ssl_context is not None)
        app = web.Application(middlewares=[api._guard],
                              client_max_size=int(cfg.http.max_body_size))
        app[_API] = api
        app.router.add_post("/api/v1/inject", api._inject)
        app.router.add_get("/api/v1/campaigns/{id}", api._campaign)
        api._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=float(cfg.server.shutdown_timeout))
        await api._runner.setup()
        api._site = web.SockSite(api._runner, sock, ssl_context=ssl_context)
        await api._site.start()
        api._sock = sock
        return api

    def apply_config(self, cfg: Config) -> None:
        """A reload: limits, and the tokens file read again (the supervisor's startup
        check loaded it first); `listen` and `tls` stay as started."""
        self.cfg = cfg
        if cfg.http.tokens_file:
            try:
                self.tokens = load_tokens(cfg.http.tokens_file)
            except Exception as err:  # keep the old tokens rather than lock everyone out
                log.error("http_tokens_reload_failed", error=str(err))

    def stop_accepting(self) -> None:
        """Stop taking connections (a drain); requests in flight go on."""
        if self._site is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._site.stop())
        if self._sock is not None:
            # The loop serves a duplicate; while ours is open the kernel would keep
            # completing handshakes nobody answers.
            self._sock.close()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (server.shutdown_timeout)."""
        self.stop_accepting()
        if self._stopping is not None:
            await self._stopping
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the handlers ------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authentication, and every error as JSON."""
        try:
            request[_TOKEN_NAME] = self._authorize(request)
            return await handler(request)
        except RequestError as err:
            response = json_response(err.status, err.body(), err.headers)
            if err.status == 413:
                response.force_close()  # the rest of the body is never read
            return response
        except web.HTTPException as err:  # aiohttp's own: 404, 405
            allow = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
            return json_response(err.status, ErrorBody(
                f"{request.method} {request.path}: {err.reason}"), allow)
        except Exception as err:  # a bug: bland text out, the details to the log
            log.error("http_request_failed", path=request.path, error=repr(err))
            return json_response(500, ErrorBody("internal error"))

    def _authorize(self, request: web.Request) -> str:
        """The matching token's name; 401 with a Bearer challenge (RFC 6750 §3) otherwise."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            # §3.1: a request with no credentials gets the challenge without an error code.
            raise RequestError(401, "a bearer token is required (Authorization: Bearer TOKEN)",
                               headers={"WWW-Authenticate": 'Bearer realm="volley"'})
        name = self.tokens.match(presented)
        if name is None:
            raise RequestError(401, "the bearer token is not valid", headers={
                "WWW-Authenticate": 'Bearer realm="volley", error="invalid_token"'})
        return name

    async def _inject(self, request: web.Request) -> web.StreamResponse:
        data = await self._read_body(request)
        req = decode_request(data)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = Client(ip=str(peer[0]) if peer else "", tls=self.tls,
                        token_name=request[_TOKEN_NAME])
        self.requests += 1
        timings = Timings()
        answer = await inject(req, self.cfg, self.backend, client, timings)
        self.last = timings
        log.info("http_injected", client=client.ip, token=client.token_name,
                 campaign=req.campaign_id, tenant=req.tenant, accepted=answer.success_count,
                 failed=answer.fail_count, screen_s=round(timings.screen, 4),
                 render_s=round(timings.render, 4),
                 commit_s=round(timings.commit, 4))
        return json_response(200, answer)

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refused with 415 (not JSON) or 413 (over http.max_body_size: from
        Content-Length before reading, else as soon as the bytes read pass it)."""
        if request.content_type != "application/json" or (
                request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
            raise RequestError(415, f"Content-Type must be application/json (UTF-8), got "
                               f"{request.headers.get('Content-Type', 'none')!r}")
        limit = int(self.cfg.http.max_body_size)
        too_big = RequestError(413, f"the request body is larger than http.max_body_size"
                               f" ({limit} bytes)")
        if request.content_length is not None and request.content_length > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > limit:
                raise too_big
        return bytes(data)

    async def _campaign(self, request: web.Request) -> web.StreamResponse:
        campaign = request.match_info["id"]
        tenant = request.query.get("tenant", "")
        try:
            counts = self.backend.store.campaign(tenant, campaign)
        except ValueError as err:
            name, _, text = str(err).partition(": ")
            raise RequestError(400, text, "id" if name == "campaign" else name) from None
        if counts is None:
            raise RequestError(404, f"no campaign {campaign!r} for tenant {tenant!r}")
        return json_response(200, msgspec.convert(counts, CampaignBody, from_attributes=True))
