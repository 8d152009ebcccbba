"""The `volley` command (also `python -m engine`).

Each subcommand is registered by one small `_add_<name>` function that builds its
parser and binds its handler, so later subcommands (ctl, blast, sink, demo) are one
more function in `_SUBCOMMANDS`. Handlers return an exit code or raise `CliError`;
`main` turns that into one `volley: message` line on stderr. Exit 2 means usage or
configuration problems (argparse uses 2 as well), 1 an environmental failure.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, PROG, CliError
from engine.version import __version__

if TYPE_CHECKING:
    from engine.config import Config

DEFAULT_USERS_FILE = "var/users"

Handler = Callable[[argparse.Namespace], int]


# --- shared helpers ----------------------------------------------------------------


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None,
        help="TOML configuration file (default: built-in defaults)",
    )


def _load_config(path: str | None) -> Config:
    """Load and validate the configuration.

    Raises:
        CliError: exit 2 with the `path: problem` line from engine.config.
    """
    # Imported here so `volley --version` does not pay for msgspec/tomli_w.
    from engine.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None


# --- serve ---------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the relay (supervisor and workers)")
    _add_config_option(p)
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    # Lazy: the supervisor pulls in the whole engine, which no other command needs.
    from engine import supervisor

    code: int = supervisor.serve(cfg, args.config)
    return code


# --- config --------------------------------------------------------------------------


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="inspect the configuration")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate, then print the effective configuration as TOML"
    )
    _add_config_option(check)
    check.set_defaults(handler=_cmd_config_check)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from engine.config import ConfigError, dump_toml
    from engine.supervisor.startup import check_startup

    cfg = _load_config(args.config)
    try:
        # What `volley serve` checks before it binds: a file that will not load is
        # found here, not by a worker at start.
        check_startup(cfg)
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    sys.stdout.write(dump_toml(cfg))
    sys.stdout.flush()
    return EXIT_OK


# --- passwd --------------------------------------------------------------------------


def _add_passwd(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "passwd",
        help="add a user to the AUTH users file or change a password",
        description=(
            "Reads the password from the terminal (twice), or one line from stdin "
            "when stdin is not a terminal."
        ),
    )
    p.add_argument("user", metavar="USER")
    p.add_argument(
        "-f",
        "--file",
        metavar="FILE",
        default=None,
        help=f"users file (default: auth.users_file from -c, else {DEFAULT_USERS_FILE})",
    )
    _add_config_option(p)
    p.set_defaults(handler=_cmd_passwd)


def _read_password() -> str:
    """The new password: from the terminal twice, else one line of UTF-8 stdin.

    Raises:
        CliError: the two entries differ, stdin is not UTF-8, or it is empty.
    """
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Repeat password: ")
        if first != second:
            raise CliError("passwords do not match")
        password = first
    else:
        # Bytes, decoded as UTF-8 explicitly: SASL carries UTF-8 (RFC 4616 §2), and
        # the locale's encoding must not change what a scripted password hashes to.
        raw = sys.stdin.buffer.readline()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CliError("password on stdin is not valid UTF-8") from None
        password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise CliError("empty password refused")
    return password


def _cmd_passwd(args: argparse.Namespace) -> int:
    from engine.inbound.users import check_username, set_user

    user: str = args.user
    try:
        check_username(user)
    except ValueError as err:
        raise CliError(str(err)) from None
    path: str | None = args.file
    if path is None:
        cfg_file = _load_config(args.config).auth.users_file if args.config else ""
        path = cfg_file or DEFAULT_USERS_FILE
    # Ask for the password only once the name and file are known to be usable.
    password = _read_password()
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        set_user(path, user, password)
    except ValueError as err:
        # A malformed existing file: "path:lineno: problem".
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"{err.filename or path}: {err.strerror}", EXIT_FAILURE) from None
    print(f"{PROG}: user {user} saved in {path}")
    return EXIT_OK


# --- ctl -------------------------------------------------------------------------------


def _add_ctl(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.control.cli_ctl import add_ctl

    add_ctl(sub)


# --- blast ---------------------------------------------------------------------------


def _add_blast(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.lab.blast.cli import add_blast

    add_blast(sub)


# --- sink ------------------------------------------------------------------------------


def _add_sink(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.lab.sink.cli import add_parser  # light: the protocol is imported when it runs

    add_parser(sub)


# --- demo ------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.lab.demo.cli import add_parser  # light: the lab is imported when it runs

    add_parser(sub)


# --- doctor ----------------------------------------------------------------------------


def _add_doctor(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.doctor.cli import add_parser  # light: the checks are imported when it runs

    add_parser(sub)


# --- the parser ----------------------------------------------------------------------

# Order here is the order in `volley --help`.
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...]
_SUBCOMMANDS = (
    _add_serve,
    _add_config,
    _add_passwd,
    _add_ctl,
    _add_blast,
    _add_sink,
    _add_demo,
    _add_doctor,
)


def build_parser() -> argparse.ArgumentParser:
    """The full `volley` argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="Volley bulk SMTP relay")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _exit_code(code: object) -> int:
    """SystemExit.code → int, as the interpreter would map it."""
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --version, --help and usage errors: argparse has printed its message.
        return _exit_code(exc.code)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CliError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `volley config check | head`: the reader left; not our failure. Point
        # stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
