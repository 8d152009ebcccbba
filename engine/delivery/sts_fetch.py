"""Fetching one MTA-STS policy: GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt
(RFC 8461 §3.3) with aiohttp.

- The policy host's name is resolved by the engine's own resolver (the `[dns]`
  nameservers, like every MX lookup), not the system's: one DNS view for delivery.
- The certificate must verify for mta-sts.DOMAIN (the system store plus
  `mta_sts.ca_file`): the HTTPS fetch is what authenticates the policy (§3.3).
- No redirects (§3.3: "senders MUST NOT follow"); only a 200 is a policy.
- The body is read up to 64 KiB (§3.3 lets senders cap it there); larger fails.
- The whole fetch is bounded by `mta_sts.fetch_timeout` (§3.3: at least 60 s).
- No proxy from the environment (aiohttp's trust_env is off).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from engine.delivery.mta_sts import MAX_POLICY_BYTES, Policy, PolicyError, parse_policy
from engine.dns.resolver import Resolver, Status

WELL_KNOWN = "/.well-known/mta-sts.txt"


class FetchError(Exception):
    """The policy could not be fetched or parsed; the message says why."""


class _EngineResolver(AbstractResolver):
    """aiohttp's name resolution through the engine's Resolver."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answer = await self._resolver.addresses(host)
        if answer.status is not Status.OK or not answer.records:
            raise OSError(f"cannot resolve {host}: {answer.status.name}")
        return [ResolveResult(hostname=host, host=str(ip), port=port,
                              family=socket.AF_INET6 if ":" in str(ip) else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)
                for ip in answer.records]

    async def close(self) -> None:
        return None


def policy_url(domain: str, port: int = 443) -> str:
    where = f"mta-sts.{domain}" + ("" if port == 443 else f":{port}")
    return f"https://{where}{WELL_KNOWN}"


async def fetch_policy(domain: str, resolver: Resolver, context: ssl.SSLContext,
                       *, port: int = 443, timeout: float = 60.0) -> Policy:
    """The domain's policy, parsed (its `id` is left for the caller to set).

    Raises FetchError naming the URL and what went wrong.
    """
    url = policy_url(domain, port)
    connector = aiohttp.TCPConnector(resolver=_EngineResolver(resolver), ssl=context,
                                     use_dns_cache=False, force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, trust_env=False,
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.get(url, allow_redirects=False, headers={"Accept": "text/plain"}) as resp,
        ):
            if resp.status != 200:
                raise FetchError(f"{url}: HTTP {resp.status} (a policy needs 200, redirects are not followed)")
            if (resp.content_length or 0) > MAX_POLICY_BYTES:
                raise FetchError(f"{url}: {resp.content_length} bytes, over the 64 KiB limit")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16384):
                body += chunk
                if len(body) > MAX_POLICY_BYTES:
                    raise FetchError(f"{url}: over the 64 KiB limit")
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError(f"{url}: timed out after {timeout:g} s") from None
    except aiohttp.ClientConnectorCertificateError as err:
        raise FetchError(f"{url}: certificate not trusted: {err.certificate_error}") from None
    except (aiohttp.ClientError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as err:
        raise FetchError(f"{url}: {type(err).__name__}: {err}") from None
    try:
        return parse_policy(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise FetchError(f"{url}: the policy is not UTF-8 text") from None
    except PolicyError as err:
        raise FetchError(f"{url}: {err}") from None
