"""What must hold before `volley serve` binds or forks anything (also run by `volley
config check` and on SIGHUP).

Today: the TLS certificate and key, every `[[dkim]]` signing key and the operator's
bounce rules file load exactly as every worker will load them. A file that does not
load stops the server with one line naming the key and the file, instead of every
worker crashing in a loop behind a supervisor that stays up.
"""

from __future__ import annotations

import ssl

from engine import config as config_mod
from engine.config import Config
from engine.http.tokens import check_http
from engine.inbound.tls import make_server_tls_context
from engine.mail.bounce_rules import BounceRulesError, load_rules
from engine.mail.dkim import DkimKeyError, DkimSigner


def check_startup(cfg: Config) -> None:
    """What must hold before anything binds or forks; raises ConfigError("key: problem").

    Today: the TLS certificate and key, the DKIM keys and the HTTP API's bearer tokens
    load, and so does bounces.rules_file (see the module docstring)."""
    _check_tls(cfg)
    _check_dkim(cfg)
    check_http(cfg)
    _check_bounce_rules(cfg)


def _check_bounce_rules(cfg: Config) -> None:
    """bounces.rules_file loads: readable TOML whose every [[rule]] is valid, the
    error naming the file and the rule ("bounces.rules_file: FILE: rule[2].text: ...")."""
    if not cfg.bounces.rules_file:
        return
    try:
        load_rules(cfg.bounces.rules_file)
    except BounceRulesError as err:
        raise config_mod.ConfigError(f"bounces.rules_file: {err}") from None


def _check_dkim(cfg: Config) -> None:
    """Every [[dkim]] key loads as the workers' DkimSigner will load it: a readable,
    unencrypted PEM private key of the entry's algorithm, RSA of 1024 bits or more
    (RFC 8301 §3.2)."""
    try:
        DkimSigner.from_config(cfg.dkim)
    except DkimKeyError as err:
        raise config_mod.ConfigError(str(err)) from None


def _check_tls(cfg: Config) -> None:
    cert, key = cfg.tls.cert_file, cfg.tls.key_file
    if not (cert and key):
        return  # no TLS offered (the config refuses a TLS listener without both)
    texts = {}
    for name, path in (("cert_file", cert), ("key_file", key)):
        try:
            with open(path, "rb") as f:
                texts[name] = f.read().decode("ascii", "ignore")  # PEM is ASCII
        except OSError as err:
            raise _tls_error(name, path, err.strerror or str(err)) from None
    try:
        # Parses every certificate in the file; a key or garbage has none.
        ssl.create_default_context().load_verify_locations(cadata=texts["cert_file"])
    except (ssl.SSLError, ValueError, TypeError):
        raise _tls_error("cert_file", cert, "no PEM certificate in it") from None
    if "ENCRYPTED" in texts["key_file"]:
        # A worker has no terminal to ask a passphrase on.
        raise _tls_error("key_file", key, "the key is encrypted; Volley needs it unencrypted")
    try:
        make_server_tls_context(cfg)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise _tls_error("key_file", key, f"does not match the certificate in {cert}") from None
        raise _tls_error("key_file", key, "no PEM private key in it" if err.reason is None
                         else str(err.reason)) from None
    except OSError as err:
        raise _tls_error("cert_file", cert, err.strerror or str(err)) from None


def _tls_error(name: str, path: str, reason: str) -> config_mod.ConfigError:
    return config_mod.ConfigError(f"tls.{name}: cannot load {path}: {reason}")
