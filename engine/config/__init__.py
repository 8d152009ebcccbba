"""The configuration: one typed, frozen tree read from a TOML file.

`units` parses the value syntaxes (sizes, durations, host:port, the retry schedule),
`tree` declares every section and key with its default, and `loader` reads a file
into a `Config` (errors as one `path: problem` line) and writes it back. Import the
names from here: `from engine.config import Config, load`.
"""

from engine.config.bounces import BouncesConfig
from engine.config.cluster import ClusterConfig
from engine.config.egress import EgressConfig, EgressRuleConfig, WarmupConfig
from engine.config.loader import (
    ConfigError,
    decode_json,
    dump_toml,
    encode_json,
    from_dict,
    load,
    to_builtins,
)
from engine.config.mta_sts import MtaStsConfig
from engine.config.newsletter import (
    CampaignsConfig,
    DkimConfig,
    FeedbackConfig,
    HttpConfig,
    SuppressionConfig,
)
from engine.config.reactions import ReactionConfig
from engine.config.shaping import ShapingConfig, parse_rate
from engine.config.tree import (
    AuthConfig,
    Config,
    ControlConfig,
    DeliveryConfig,
    DnsConfig,
    Frozen,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    QueueConfig,
    RelayConfig,
    RouteConfig,
    ServerConfig,
    TimeoutsConfig,
    TlsConfig,
    TlsPolicy,
)
from engine.config.units import (
    DEFAULT_SCHEDULE,
    Duration,
    RetrySchedule,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_nameserver,
    parse_schedule,
    parse_size,
    split_host_port,
)

__all__ = [
    "AuthConfig", "BouncesConfig", "CampaignsConfig", "ClusterConfig", "Config", "ConfigError", "ControlConfig",
    "DEFAULT_SCHEDULE", "DeliveryConfig", "DkimConfig", "DnsConfig", "Duration",
    "EgressConfig", "EgressRuleConfig", "WarmupConfig",
    "FeedbackConfig", "Frozen", "HttpConfig", "LimitsConfig", "ListenerConfig", "LogConfig",
    "MetricsConfig", "MtaStsConfig", "QueueConfig", "ReactionConfig", "RelayConfig", "RetrySchedule", "RouteConfig",
    "ServerConfig", "ShapingConfig", "Size", "SuppressionConfig", "TimeoutsConfig", "TlsConfig", "TlsPolicy",
    "decode_json", "dump_toml", "encode_json", "format_duration", "format_size", "from_dict",
    "load", "parse_duration", "parse_nameserver", "parse_rate", "parse_schedule", "parse_size",
    "split_host_port", "to_builtins",
]
