"""The one typed configuration tree.

Every key has a default, so an empty file (or no file) is a complete configuration.
Sizes ("10MiB") and durations ("90s", "5m") are decoded into `Size` and `Duration`
at the edge, so the rest of the engine only ever sees ints and floats.
Errors read as `path: problem`, one line, so an operator can fix the file without
reading a traceback.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec
import tomli_w


class ConfigError(Exception):
    """A configuration that must not be started; the message is `path: problem`."""


class Size(int):
    """A byte count; accepts 1048576, "1048576", "512KiB", "10MiB", "1GiB", "10MB"."""


class Duration(float):
    """Seconds; accepts 30, "250ms", "90s", "5m", "4h", "5d"."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: object) -> Size:
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as \"10MiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value}")
        return Size(value)
    if isinstance(value, str):
        m = _QUANTITY.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m and unit in _SIZE_UNITS:
            return Size(int(float(m.group(1)) * _SIZE_UNITS[unit]))
    raise ValueError(f"expected a size such as \"10MiB\", got {value!r}")


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as \"90s\", got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative duration, got {value}")
        return Duration(value)
    if isinstance(value, str):
        m = _QUANTITY.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m and unit in _DURATION_UNITS:
            return Duration(float(m.group(1)) * _DURATION_UNITS[unit])
    raise ValueError(f"expected a duration such as \"90s\" or \"5m\", got {value!r}")


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_duration(s: float) -> str:
    if s == 0:
        return "0s"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= factor and s % factor == 0:
            return f"{int(s // factor)}{unit}"
    return f"{int(round(s * 1000))}ms"


def split_host_port(text: str) -> tuple[str, int]:
    """"127.0.0.1:25" or "[::1]:25" → (host, port); ValueError names the problem."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text)
    if not m:
        raise ValueError(f'expected "host:port", got "{text}"')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


class Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(Frozen):
    hostname: str = ""
    workers: int = 0
    # How long SIGTERM waits for sessions in flight before closing them.
    shutdown_timeout: Duration = Duration(30)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError("workers: must be 0 (one per CPU) or more")


class ListenerConfig(Frozen):
    address: str = "127.0.0.1:2525"
    tls: Literal["none", "starttls", "implicit"] = "none"
    auth: Literal["none", "optional", "required"] = "none"
    allow_plaintext_auth: bool = False

    def __post_init__(self) -> None:
        try:
            split_host_port(self.address)
        except ValueError as err:
            raise ValueError(f"address: {err}") from None


class TlsConfig(Frozen):
    cert_file: str = ""
    key_file: str = ""


class QueueConfig(Frozen):
    path: str = "var/queue"
    max_size: Size = Size(4 * 1024**3)
    # fsync: 250 only after the flush. batch: flush every batch_interval, a crash may
    # lose that window. memory: never flushed, for load-testing runs.
    durability: Literal["fsync", "batch", "memory"] = "fsync"
    batch_interval: Duration = Duration(0.05)


class RelayConfig(Frozen):
    networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        for i, net in enumerate(self.networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"networks[{i}]: not a CIDR network: {net!r}") from None


class LimitsConfig(Frozen):
    max_message_size: Size = Size(25 * 1024**2)
    max_recipients: int = 1000
    # Across all workers; each worker enforces its share (see README).
    max_connections: int = 2000
    max_connections_per_ip: int = 500
    # RFC 5321 4.5.3.2.7: the server should wait at least 5 minutes for a command.
    command_timeout: Duration = Duration(300)
    # RFC 5321 4.5.3.2.6 asks clients to wait 10 minutes for the reply to end of data;
    # we give the whole DATA/BDAT phase the same budget.
    data_timeout: Duration = Duration(600)
    max_auth_failures: int = 3
    max_unknown_commands: int = 20
    # NOOP/RSET/VRFY/HELP per session (Postfix smtpd_junk_command_limit); then 421.
    max_junk_commands: int = 100
    # Received: headers a message may carry (RFC 5321 §6.3; Postfix hopcount_limit).
    max_hops: int = 50
    # Delay before the banner; a client that talks first is refused (pregreet, as
    # postscreen does). 0 disables the check.
    greeting_delay: Duration = Duration(0)


class DnsConfig(Frozen):
    # "ip" or "ip:port" ("[v6]:port"); empty = the system's resolv.conf.
    nameservers: list[str] = msgspec.field(default_factory=list)
    timeout: Duration = Duration(5)
    min_ttl: Duration = Duration(60)
    max_ttl: Duration = Duration(3600)
    negative_ttl_max: Duration = Duration(900)
    # SERVFAIL/timeouts are remembered this long so a burst to a broken domain costs
    # one query; those messages defer anyway.
    failure_ttl: Duration = Duration(5)
    cache_size: int = 100_000

    def __post_init__(self) -> None:
        from engine.dns.resolver import parse_nameserver

        for i, ns in enumerate(self.nameservers):
            try:
                parse_nameserver(ns)
            except ValueError as err:
                raise ValueError(f"nameservers[{i}]: {err}") from None


class TimeoutsConfig(Frozen):
    """RFC 5321 §4.5.3.2 client timeouts, one per phase."""

    connect: Duration = Duration(30)
    greeting: Duration = Duration(300)  # §4.5.3.2.1: 5 minutes
    ehlo: Duration = Duration(300)
    starttls: Duration = Duration(120)
    auth: Duration = Duration(120)
    mail: Duration = Duration(300)  # §4.5.3.2.2
    rcpt: Duration = Duration(300)  # §4.5.3.2.3
    data: Duration = Duration(120)  # §4.5.3.2.4: DATA initiation
    data_block: Duration = Duration(180)  # §4.5.3.2.5
    data_end: Duration = Duration(600)  # §4.5.3.2.6
    quit: Duration = Duration(30)


TlsPolicy = Literal["opportunistic", "required", "none"]


class DeliveryConfig(Frozen):
    enabled: bool = True
    port: int = 25
    helo_name: str = ""  # empty: server.hostname
    source_address: str = ""  # bind outbound connections to this address
    max_connections_per_domain: int = 20  # Postfix's default_destination_concurrency_limit
    # Outbound sessions open or opening at once, across all workers (each worker takes
    # its share, as with limits.max_connections). PowerMTA's total-max-smtp-out;
    # engine/delivery/budget.py says why.
    max_connections: int = 1000
    max_messages_per_connection: int = 1000
    idle_timeout: Duration = Duration(10)
    max_connection_age: Duration = Duration(300)  # Postfix smtp_connection_reuse_time_limit
    retry: str = "1m, 5m, 15m, 30m, 1h, 2h, 4h"
    max_age: Duration = Duration(5 * 86400)
    # A recipient that asked for NOTIFY=DELAY gets one "delayed" DSN once its message
    # has waited this long (RFC 3461 leaves the time to the MTA); 0 turns it off.
    delay_warning: Duration = Duration(4 * 3600)
    # How many (message, domain) units one worker holds in memory at once.
    max_ready: int = 20_000
    poll_interval: Duration = Duration(0.1)
    # After a 421 or refused connection a destination waits this long, doubling up
    # to backoff_max while it keeps failing.
    backoff: Duration = Duration(60)
    backoff_max: Duration = Duration(3600)
    tls: TlsPolicy = "opportunistic"
    tls_verify: bool = False
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        from engine.delivery.retry import parse_schedule

        try:
            parse_schedule(self.retry)
        except ValueError as err:
            raise ValueError(f"retry: {err}") from None
        if not 0 < self.port < 65536:
            raise ValueError(f"port: out of range: {self.port}")
        if self.max_connections_per_domain < 1:
            raise ValueError("max_connections_per_domain: must be at least 1")
        if self.max_connections < 1:
            raise ValueError("max_connections: must be at least 1")


class RouteConfig(Frozen):
    # "example.com" (exact), "*.example.com" (any subdomain), or "*" (everything).
    domain: str
    # "host:port" smarthost; empty = resolve the domain's MX as usual.
    host: str = ""
    auth_user: str = ""
    auth_password_file: str = ""
    tls: TlsPolicy | None = None  # None: delivery.tls
    tls_verify: bool | None = None
    max_connections: int = 0  # 0: delivery.max_connections_per_domain
    max_messages_per_connection: int = 0

    def __post_init__(self) -> None:
        if not self.domain or (self.domain != "*" and "*" in self.domain.lstrip("*.")):
            raise ValueError(f'domain: expected "example.com", "*.example.com" or "*", got "{self.domain}"')
        if self.host:
            try:
                split_host_port(self.host)
            except ValueError as err:
                raise ValueError(f"host: {err}") from None
        if self.auth_user and not self.auth_password_file:
            raise ValueError("auth_password_file: required with auth_user")
        if self.auth_user and (self.tls or "required") != "required":
            # Credentials never travel in the clear (issue: "only over TLS").
            raise ValueError('tls: must be "required" (or unset) when auth_user is set')


class AuthConfig(Frozen):
    users_file: str = ""


class ControlConfig(Frozen):
    socket: str = "var/volley.sock"
    group: str = ""


class MetricsConfig(Frozen):
    # "host:port" to serve GET /metrics (Prometheus text) over HTTP; "" = only over
    # the control socket (`volley ctl metrics`).
    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            try:
                split_host_port(self.listen)
            except ValueError as err:
                raise ValueError(f"listen: {err}") from None


class LogConfig(Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    delivery: str = "var/log/delivery.jsonl"


class Config(Frozen):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    listeners: list[ListenerConfig] = msgspec.field(default_factory=lambda: [ListenerConfig()])
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ValueError("listeners: at least one listener is required")
        needs_tls = [i for i, lst in enumerate(self.listeners) if lst.tls != "none"]
        if needs_tls and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError(
                f"tls.cert_file: listeners[{needs_tls[0]}] uses TLS but no certificate is set"
            )


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Size:
        return parse_size(obj)
    if tp is Duration:
        return parse_duration(obj)
    raise NotImplementedError(f"no decoder for {tp!r}")


def _enc_hook(obj: Any) -> Any:
    raise NotImplementedError(f"cannot encode {type(obj)!r}")


_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.S)


def _error_line(err: msgspec.ValidationError) -> str:
    m = _AT.match(str(err))
    assert m is not None
    problem, path = m.group(1), (m.group(2) or "").lstrip(".")
    # Messages raised by our own __post_init__ may already start with a sub-path.
    sub = re.match(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*): (.*)$", problem, re.S)
    if sub:
        path = f"{path}.{sub.group(1)}" if path else sub.group(1)
        problem = sub.group(2)
    field = re.match(r"Object contains unknown field `(.*)`", problem)
    if field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        problem = "unknown key"
    problem = problem[:1].lower() + problem[1:]
    return f"{path or '(top level)'}: {problem}"


def from_dict(data: dict[str, Any]) -> Config:
    """Decode a parsed TOML document; raises ConfigError('path: problem')."""
    try:
        cfg = msgspec.convert(data, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as err:
        raise ConfigError(_error_line(err)) from None
    if not cfg.server.hostname:
        # Resolved once, at load, in the supervisor: never on the event loop.
        cfg = msgspec.structs.replace(
            cfg, server=msgspec.structs.replace(cfg.server, hostname=socket.gethostname())
        )
    return cfg


def load(path: str | Path | None) -> Config:
    """Read a TOML file (None → built-in defaults); raises ConfigError."""
    if path is None:
        return from_dict({})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return from_dict(data)


def to_builtins(cfg: Config) -> dict[str, Any]:
    """Plain data with sizes and durations in their readable form."""

    def enc(obj: Any) -> Any:
        if isinstance(obj, Size):
            return format_size(int(obj))
        if isinstance(obj, Duration):
            return format_duration(float(obj))
        raise NotImplementedError

    def walk(value: Any) -> Any:
        if isinstance(value, msgspec.Struct):
            # TOML has no null: an unset optional key is simply left out.
            return {
                f: walk(getattr(value, f))
                for f in value.__struct_fields__
                if getattr(value, f) is not None
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, (Size, Duration)):
            return enc(value)
        return value

    result: dict[str, Any] = walk(cfg)
    return result


def dump_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_builtins(cfg))


def encode_json(cfg: Config) -> bytes:
    """Wire form for handing a config to a worker process."""
    return msgspec.json.encode(to_builtins(cfg))


def decode_json(data: bytes) -> Config:
    return from_dict(msgspec.json.decode(data))
