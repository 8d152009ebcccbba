"""Bearer tokens of the injection API (RFC 6750), read from `http.tokens_file`.

One token per line, "name:token" or a bare token; blank lines and `#` comments are
skipped. A request's token is compared with EVERY configured token by
`hmac.compare_digest`, never with `==` and never stopping at the first match, so
neither the comparison nor which line matched shows in the answer's timing.
"""

from __future__ import annotations

import hmac

from engine import config as config_mod
from engine.config import Config

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
MIN_TOKEN_LENGTH = 16  # a short token is a guessable one


class Tokens:
    """The tokens of one tokens file: (name, token bytes) pairs."""

    def __init__(self, entries: list[tuple[str, bytes]]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, presented: str) -> str | None:
        """The name of the token `presented` equals ("" for a bare one), or None.

        Every entry is compared, whatever matched before: constant time in which
        token matched. compare_digest is constant time only for equal lengths; a
        length differing from every token is all it can tell an attacker."""
        given = presented.encode("utf-8", "replace")
        found: str | None = None
        for name, token in self._entries:
            if hmac.compare_digest(given, token) and found is None:
                found = name
        return found


def parse_tokens(text: str, path: str) -> Tokens:
    """Raises ConfigError("http.tokens_file: PATH line N: problem")."""
    entries: list[tuple[str, bytes]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.rpartition(":")
        if not sep:
            name, token = "", line
        where = f"http.tokens_file: {path} line {n}"
        if not token or not set(token) <= _B64TOKEN:
            raise config_mod.ConfigError(
                f"{where}: a token is letters, digits and -._~+/= only (RFC 6750 §2.1)")
        if len(token) < MIN_TOKEN_LENGTH:
            raise config_mod.ConfigError(
                f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
        entries.append((name.strip(), token.encode()))
    if not entries:
        raise config_mod.ConfigError(f"http.tokens_file: {path}: no token in it")
    return Tokens(entries)


def load_tokens(path: str) -> Tokens:
    """Read and parse the tokens file; ConfigError naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise config_mod.ConfigError(
            f"http.tokens_file: cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise config_mod.ConfigError(f"http.tokens_file: {path}: not UTF-8 text") from None
    return parse_tokens(text, path)


def check_http(cfg: Config) -> None:
    """The startup check of the [http] section (volley serve, config check, reload):
    the tokens file loads. (The config itself refuses http.tls without a certificate.)
    Raises ConfigError."""
    if cfg.http.listen:
        load_tokens(cfg.http.tokens_file)
