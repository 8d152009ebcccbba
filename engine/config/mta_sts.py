"""The `[mta_sts]` section: outbound MTA-STS (RFC 8461).

Kept apart from tree.py, which imports it into `Config`; the same rules hold here:
every key has a default, and `__post_init__` raises ValueError("key: problem") for what
a key's type cannot say.
"""

from __future__ import annotations

import ssl

import msgspec

from engine.config.units import Duration


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class MtaStsConfig(_Frozen, frozen=True):
    # Look up `_mta-sts.DOMAIN` for MX-routed destinations and apply the policies found
    # (enforce: only the policy's MX hosts, STARTTLS with a verified certificate).
    enabled: bool = True
    # An extra CA bundle (PEM) trusted, besides the system store, for the policy fetch
    # (https://mta-sts.DOMAIN/) and the MX certificates of enforced policies. "" = the
    # system store alone.
    ca_file: str = ""
    # The HTTPS port of the policy host. RFC 8461 §3.3 says 443; another port is for
    # tests and labs only (a loopback policy server that cannot bind 443).
    port: int = 443
    # RFC 8461 §3.3: a fetch SHOULD time out after at least 60 s.
    fetch_timeout: Duration = Duration(60)
    # Domains whose policy (or its absence) one worker remembers; least recently used
    # beyond this are forgotten (and looked up again when mail for them comes).
    max_policies: int = 100_000

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: out of range: {self.port}")
        if self.fetch_timeout <= 0:
            raise ValueError("fetch_timeout: must be positive")
        if self.max_policies < 1:
            raise ValueError("max_policies: must be at least 1")
        if self.ca_file:
            try:
                ssl.create_default_context().load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(f"ca_file: cannot load {self.ca_file}: {err}") from None
