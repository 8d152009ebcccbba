"""Reading and writing the configuration: TOML in, `Config` out, and back.

Errors read as `path: problem`, one line, so an operator can fix the file without
reading a traceback. `to_builtins` writes every value in the form a file would use
("10MiB", "90s", the retry schedule as written), so `volley config check` prints a
file that loads back to the same `Config`, and a worker receives exactly what the
supervisor read (`encode_json` / `decode_json`).
"""

from __future__ import annotations

import re
import socket
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec
import tomli_w

from engine.config.tree import Config
from engine.config.units import (
    Duration,
    RetrySchedule,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


class ConfigError(Exception):
    """A configuration that must not be started; the message is `path: problem`."""


def _retry_schedule(obj: object) -> RetrySchedule:
    if not isinstance(obj, str):
        try:
            msgspec.convert(obj, str)
        except msgspec.ValidationError as err:
            # Said as msgspec says it for any other string key ("expected `str`, got `int`").
            raise ValueError(str(err)) from None
    return RetrySchedule(str(obj))


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Size:
        return parse_size(obj)
    if tp is Duration:
        return parse_duration(obj)
    if tp is RetrySchedule:
        return _retry_schedule(obj)
    raise NotImplementedError(f"no decoder for {tp!r}")


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
    if problem.startswith("Invalid enum value"):
        problem += _expected_values(path)
    field = re.match(r"Object contains unknown field `(.*)`", problem)
    if field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        problem = "unknown key"
    problem = problem[:1].lower() + problem[1:]
    return f"{path or '(top level)'}: {problem}"


_STEP = re.compile(r"([a-z_]+)|\[(?:\d+|\.\.\.)\]")


def _expected_values(path: str) -> str:
    """', expected one of "a", "b"' for the key at `path` ("listeners[0].tls"), in the
    order Config declares them, so the message lists exactly what the decoder accepts;
    "" when the path leads to no Literal."""
    node: msgspec.inspect.Type = msgspec.inspect.type_info(Config)
    owner: type | None = None
    name = ""
    for m in _STEP.finditer(path):
        while isinstance(node, msgspec.inspect.UnionType):  # (Optional: the non-None part)
            node = next((t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)),
                        node.types[0])
        if m.group(1) and isinstance(node, msgspec.inspect.StructType):
            field = next((f for f in node.fields if f.encode_name == m.group(1)), None)
            if field is None:
                return ""
            owner, name, node = node.cls, field.name, field.type
        elif not m.group(1) and isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
        elif not m.group(1) and isinstance(node, msgspec.inspect.DictType):
            node = node.value_type
        else:
            return ""
    if owner is None:
        return ""
    declared = typing.get_type_hints(owner).get(name)
    values = [v for arg in (typing.get_args(declared) if typing.get_origin(declared) is not
                            typing.Literal else (declared,))
              for v in (typing.get_args(arg) if typing.get_origin(arg) is typing.Literal else ())]
    if not values:
        return ""
    return ", expected one of " + ", ".join(f'"{v}"' if isinstance(v, str) else str(v)
                                             for v in values)


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


def _plain(value: object) -> object:
    """`value` as TOML/JSON data, with sizes, durations and the schedule as text."""
    if isinstance(value, msgspec.Struct):
        # TOML has no null: an unset optional key is simply left out. Keys by their
        # names in the file (a field may be renamed: `class` is a Python keyword).
        fields = ((k, getattr(value, f)) for f, k in
                  zip(value.__struct_fields__, value.__struct_encode_fields__, strict=True))
        return {f: _plain(v) for f, v in fields if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Size):
        return format_size(int(value))
    if isinstance(value, Duration):
        return format_duration(float(value))
    if isinstance(value, RetrySchedule):
        return value.text
    return value


def to_builtins(cfg: Config) -> dict[str, Any]:
    """Plain data with sizes, durations and the retry schedule in their readable form."""
    result = _plain(cfg)
    assert isinstance(result, dict)
    return result


def dump_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_builtins(cfg))


def encode_json(cfg: Config) -> bytes:
    """Wire form for handing a config to a worker process."""
    return msgspec.json.encode(to_builtins(cfg))


def decode_json(data: bytes) -> Config:
    return from_dict(msgspec.json.decode(data))
