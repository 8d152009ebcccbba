"""The one typed configuration tree: every section, key and default.

Every key has a default, so an empty file (or no file) is a complete configuration.
Values arrive already decoded (`units.py`: sizes, durations, the retry schedule);
the `__post_init__` checks here raise ValueError("key: problem") for what one key's
type cannot say, and the loader turns that into the `section.key: problem` line.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

import msgspec

from engine.config.bounces import BouncesConfig
from engine.config.cluster import ClusterConfig
from engine.config.egress import EgressConfig, EgressRuleConfig, WarmupConfig, check_egress
from engine.config.mta_sts import MtaStsConfig
from engine.config.newsletter import (
    CampaignsConfig,
    DkimConfig,
    FeedbackConfig,
    HttpConfig,
    SuppressionConfig,
)
from engine.config.reactions import ReactionConfig, check_reactions
from engine.config.shaping import ShapingConfig, check_shaping
from engine.config.units import (
    DEFAULT_SCHEDULE,
    Duration,
    RetrySchedule,
    Size,
    format_size,
    parse_nameserver,
    parse_size,
    split_host_port,
)

# The least of max_size kept free whatever high_water says, so a small queue (tests,
# drills) still has room for one batch of deletions: 128 KiB was measured too little
# for a 1 MiB queue of small messages (a batch of deletions hit MDB_MAP_FULL).
MIN_HEADROOM = 256 * 1024
# The least queue.max_size: the headroom above plus room for mail beside LMDB's own
# pages (its named databases and their roots); 1 MiB is the smallest queue the tests
# fill to the high-water mark and drain (test_queue_full). Below it the headroom
# takes the whole map and every message would be refused.
MIN_QUEUE_SIZE = 1024 * 1024


class Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# RFC 5321 §4.1.2 Mailbox in its plain form: a dot-atom local part and a domain of
# letters, digits and hyphens (quoted local parts and address literals are refused:
# this is an address the operator types, not one a client sends).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MAILBOX = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*")


class ServerConfig(Frozen, frozen=True):
    hostname: str = ""
    workers: int = 0
    # How long SIGTERM waits for sessions in flight before closing them.
    shutdown_timeout: Duration = Duration(30)
    # Where RCPT TO:<postmaster> (RFC 5321 §4.5.1, no domain) goes: an address with a
    # domain. "" = unset: then that RCPT gets 550 5.1.1 and nothing is queued.
    postmaster: str = ""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError("workers: must be 0 (one per CPU) or more")
        if self.postmaster and not _MAILBOX.fullmatch(self.postmaster):
            raise ValueError(
                f'postmaster: expected an address with a domain, like "postmaster@example.com",'
                f' got "{self.postmaster}"'
            )


class ListenerConfig(Frozen, frozen=True):
    address: str = "127.0.0.1:2525"
    tls: Literal["none", "starttls", "implicit"] = "none"
    auth: Literal["none", "optional", "required"] = "none"
    allow_plaintext_auth: bool = False

    def __post_init__(self) -> None:
        try:
            split_host_port(self.address)
        except ValueError as err:
            raise ValueError(f"address: {err}") from None


class TlsConfig(Frozen, frozen=True):
    cert_file: str = ""
    key_file: str = ""


class QueueConfig(Frozen, frozen=True):
    path: str = "var/queue"
    max_size: Size = Size(4 * 1024**3)
    # fsync: 250 only after the flush. batch: flush every batch_interval, a crash may
    # lose that window. memory: never flushed, for load-testing runs.
    durability: Literal["fsync", "batch", "memory"] = "fsync"
    batch_interval: Duration = Duration(0.05)
    # New mail is refused (452 4.3.1) once the queue holds this much: "90%" of
    # max_size, a fraction such as 0.9, or a size ("3GiB"). The rest of the map stays
    # free for what must commit when the queue is full: outcomes, deletions (LMDB
    # copies every page it changes and reuses the freed ones only after the commit)
    # and the DSNs of bounces. A 512-op batch of deletions needs a few MiB at worst;
    # 10% of the default 4 GiB is about 400 MiB, and of a 1 GiB queue still 100 MiB.
    high_water: str | float = "90%"

    def __post_init__(self) -> None:
        if self.max_size < MIN_QUEUE_SIZE:
            raise ValueError(f"max_size: {format_size(self.max_size)} is too small for a queue:"
                             f" at least {format_size(MIN_QUEUE_SIZE)} (the {MIN_HEADROOM // 1024}KiB"
                             " kept free for deletions and bounces, and room for mail)")
        self.headroom()  # raises ValueError("high_water: ...")

    def headroom(self) -> int:
        """Bytes of `max_size` kept free of new mail: max_size minus the high-water mark,
        but never less than MIN_HEADROOM (nor more than max_size).

        Raises:
            ValueError: "high_water: problem" for a mark that is not a percentage in
                (0, 100], a fraction in (0, 1] or a size below max_size.
        """
        total = int(self.max_size)
        mark = self.high_water
        if isinstance(mark, str) and mark.strip().endswith("%"):
            try:
                fraction = float(mark.strip()[:-1]) / 100
            except ValueError:
                fraction = -1.0
            if not 0 < fraction <= 1:
                raise ValueError(f'high_water: expected a percentage such as "90%", got "{mark}"')
            return _clamp(total - int(total * fraction), total)
        if isinstance(mark, float) and (mark <= 1 or not mark.is_integer()):
            if not 0 < mark <= 1:
                raise ValueError(f"high_water: a fraction must be in (0, 1], got {mark}")
            return _clamp(total - int(total * mark), total)
        try:
            size = int(parse_size(int(mark) if isinstance(mark, float) else mark))
        except ValueError as err:
            raise ValueError(f"high_water: {err}") from None
        if not 0 < size <= total:
            raise ValueError(f"high_water: {size} bytes is not within max_size ({total})")
        return _clamp(total - size, total)


def _clamp(headroom: int, total: int) -> int:
    return min(total, max(headroom, MIN_HEADROOM))


class RelayConfig(Frozen, frozen=True):
    networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        for i, net in enumerate(self.networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"networks[{i}]: not a CIDR network: {net!r}") from None


class LimitsConfig(Frozen, frozen=True):
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
    # Across sessions, per client address and worker (engine/inbound/auth_failures.py):
    # this many failed AUTHs within the window and that address gets 421 on AUTH until
    # the window ends; 0 turns it off. Each failed AUTH is answered after the delay.
    max_auth_failures_per_ip: int = 10
    auth_failure_window: Duration = Duration(600)
    auth_failure_delay: Duration = Duration(1)
    max_unknown_commands: int = 20
    # NOOP/RSET/VRFY/HELP per session (Postfix smtpd_junk_command_limit); then 421.
    max_junk_commands: int = 100
    # Received: headers a message may carry (RFC 5321 §6.3; Postfix hopcount_limit).
    max_hops: int = 50
    # Delay before the banner; a client that talks first is refused (pregreet, as
    # postscreen does). 0 disables the check.
    greeting_delay: Duration = Duration(0)


class DnsConfig(Frozen, frozen=True):
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
        for i, ns in enumerate(self.nameservers):
            try:
                parse_nameserver(ns)
            except ValueError as err:
                raise ValueError(f"nameservers[{i}]: {err}") from None


class TimeoutsConfig(Frozen, frozen=True):
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


class DeliveryConfig(Frozen, frozen=True):
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
    # The wait after the 1st, 2nd, ... failed attempt; the last one repeats for ever.
    retry: RetrySchedule = RetrySchedule(DEFAULT_SCHEDULE)
    max_age: Duration = Duration(5 * 86400)
    # A recipient that asked for NOTIFY=DELAY gets one "delayed" DSN once its message
    # has waited this long (RFC 3461 leaves the time to the MTA); 0 turns it off.
    delay_warning: Duration = Duration(4 * 3600)
    # How many (message, domain) units one worker holds in memory at once.
    max_ready: int = 20_000
    # Of those, how many one destination domain may hold (0: a tenth of max_ready), so
    # a slow or throttled destination cannot fill the set and starve the others.
    max_ready_per_destination: int = 0
    poll_interval: Duration = Duration(0.1)
    # After a 421 or refused connection a destination waits this long, doubling up
    # to backoff_max while it keeps failing.
    backoff: Duration = Duration(60)
    backoff_max: Duration = Duration(3600)
    tls: TlsPolicy = "opportunistic"
    tls_verify: bool = False
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: out of range: {self.port}")
        if self.max_connections_per_domain < 1:
            raise ValueError("max_connections_per_domain: must be at least 1")
        if self.max_connections < 1:
            raise ValueError("max_connections: must be at least 1")
        if self.max_ready_per_destination < 0:
            raise ValueError("max_ready_per_destination: must be 0 (a tenth of max_ready) or more")


class RouteConfig(Frozen, frozen=True):
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
    # The [[egress]] pool its mail leaves from ("" = "default", unless the message's
    # tenant or campaign names one: engine/delivery/egress.py).
    egress_pool: str = ""

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


class AuthConfig(Frozen, frozen=True):
    users_file: str = ""


class ControlConfig(Frozen, frozen=True):
    socket: str = "var/volley.sock"
    group: str = ""


class MetricsConfig(Frozen, frozen=True):
    # "host:port" to serve GET /metrics (Prometheus text) over HTTP; "" = only over
    # the control socket (`volley ctl metrics`).
    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            try:
                split_host_port(self.listen)
            except ValueError as err:
                raise ValueError(f"listen: {err}") from None


class LogConfig(Frozen, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    delivery: str = "var/log/delivery.jsonl"


class Config(Frozen, frozen=True):
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
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    dkim: list[DkimConfig] = msgspec.field(default_factory=list)
    suppression: SuppressionConfig = msgspec.field(default_factory=SuppressionConfig)
    feedback: FeedbackConfig = msgspec.field(default_factory=FeedbackConfig)
    campaigns: CampaignsConfig = msgspec.field(default_factory=CampaignsConfig)
    shaping: list[ShapingConfig] = msgspec.field(default_factory=list)
    bounces: BouncesConfig = msgspec.field(default_factory=BouncesConfig)
    mta_sts: MtaStsConfig = msgspec.field(default_factory=MtaStsConfig)
    egress: list[EgressConfig] = msgspec.field(default_factory=list)
    egress_rules: list[EgressRuleConfig] = msgspec.field(default_factory=list)
    warmup: list[WarmupConfig] = msgspec.field(default_factory=list)
    reactions: list[ReactionConfig] = msgspec.field(default_factory=list)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        check_shaping(self.shaping)
        check_reactions(self.reactions, {s.label for s in self.shaping})
        check_egress(self.egress, self.egress_rules, self.warmup,
                     [r.egress_pool for r in self.routes], [s.label for s in self.shaping])
        if self.http.tls and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError("tls.cert_file: http.tls is on but no certificate is set")
        if not self.listeners:
            raise ValueError("listeners: at least one listener is required")
        needs_tls = [i for i, lst in enumerate(self.listeners) if lst.tls != "none"]
        if needs_tls and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError(
                f"tls.cert_file: listeners[{needs_tls[0]}] uses TLS but no certificate is set"
            )
