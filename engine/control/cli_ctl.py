"""`volley ctl`: the arguments of each control command, mapped onto protocol requests.

Option names are the protocol's field names (`--max-connections` → `max_connections`),
so a request is built generically from the parsed arguments and then checked by the
same `decode_request` the server runs: the client refuses what the server would, with
exit 2 and one line, before connecting. This module is imported by every `volley` run
(the parser is built up front), so engine imports are made lazily in the handlers.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from engine.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    duration,
    is_number,
    positive_duration,
    positive_int,
)

if TYPE_CHECKING:  # imported where used, below: every `volley` run loads this module
    from engine.control import protocol

DEFAULT_TIMEOUT = 30.0
PASSWORD_ENV = "VOLLEY_DRAIN_PASSWORD"  # drain --to --user: kept off the command line
# These may run for minutes on a big queue; the server answers when it is done.
_UNBOUNDED = frozenset({"bounce", "delete", "drain"})
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_STATES = ("queued", "deferred", "suspended")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`volley: ctl throttle: ...`), exit 2, like CliError's."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix(PROG).strip()
        self.exit(EXIT_USAGE, f"{PROG}: {where}: {message} (see --help)\n")


# --- argument types ------------------------------------------------------------------


def rate(text: str) -> float:
    """"10/s", "600/m", "36000/h" or a bare number (per second) → messages per second."""
    amount, _, unit = text.strip().partition("/")
    per = _RATE_UNITS.get(unit.strip().lower() or "s")
    if per is None or not is_number(amount) or float(amount) <= 0:
        raise argparse.ArgumentTypeError(
            f'expected a positive rate such as "10/s", "600/m" or "36000/h", got {text!r}')
    return float(amount) / per


# --- the parser ------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """The connection options; accepted before the command and after it.

    Below the command they default to SUPPRESS so they never overwrite what was given
    before it."""
    unset: str | None = None if top else argparse.SUPPRESS
    p.add_argument("-c", "--config", metavar="FILE", default=unset,
                   help="take control.socket from this file")
    p.add_argument("--socket", metavar="PATH", default=unset,
                   help="control socket (default: control.socket of -c, else var/volley.sock)")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the raw JSON reply")
    p.add_argument("--timeout", metavar="S", type=duration, default=unset, help=(
        f"seconds to wait for the reply, 0 = for ever (default {DEFAULT_TIMEOUT:g}; "
        "for ever for bounce, delete, drain)"))


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", nargs="?", default=None, metavar="ID", help="one message")
    p.add_argument("--domain", help="messages with a pending recipient in this domain")
    p.add_argument("--sender", help='envelope sender ("<>" = the null sender)')
    p.add_argument("--state", choices=_STATES)
    p.add_argument("--all", action="store_true", help="every queued message (no filter)")
    p.add_argument("--dry-run", action="store_true", help="count the matches, change nothing")


def add_ctl(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `volley ctl` and its commands on the top-level subparsers."""
    ctl = sub.add_parser("ctl", help="talk to a running server over its control socket",
                         description="Query and steer a running `volley serve`.")
    # The top-level parser made this one as a plain ArgumentParser; give it the
    # one-line errors of its commands too.
    ctl.error = types.MethodType(_Parser.error, ctl)  # type: ignore[method-assign]
    _common(ctl, top=True)
    ctl.set_defaults(handler=run)
    cmds = ctl.add_subparsers(dest="ctl_cmd", metavar="CMD", required=True, parser_class=_Parser)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=text, description=text)
        _common(p, top=False)
        return p

    add("status", "server, workers, queue totals, rates, holds")
    p = add("queue", "queue shape by domain, sender or age (like qshape)")
    p.add_argument("--by", choices=("domain", "sender", "age"))
    p.add_argument("--limit", type=positive_int, help="rows, biggest first (default 100)")
    p = add("list", "queued messages, a page at a time")
    p.add_argument("--domain")
    p.add_argument("--sender")
    p.add_argument("--state", choices=_STATES)
    p.add_argument("--limit", type=positive_int, help="messages (default 50)")
    p.add_argument("--after", metavar="ID", help="the page after this id")
    add("show", "one message: envelope, recipients, headers").add_argument("id", metavar="ID")
    p = add("flush", "retry deferred messages now: all, one domain, or one message")
    p.add_argument("id", nargs="?", default=None, metavar="ID")
    p.add_argument("--domain")
    p = add("suspend", "hold deliveries to a domain")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--duration", type=positive_duration, help='e.g. "2h" (default: until resumed)')
    p.add_argument("--reason", metavar="TEXT")
    add("resume", "release a suspended domain, or lift a provider's [[reactions]]"
        ).add_argument("domain", metavar="DOMAIN|PROVIDER")
    p = add("bounce", "return messages to their senders (DSN) and drop them")
    _filters(p)
    p.add_argument("--reason", metavar="TEXT", help="text for the DSN")
    _filters(add("delete", "drop messages without notice"))
    p = add("throttle", "limit deliveries to a domain")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--max-connections", type=positive_int, metavar="N")
    p.add_argument("--rate", type=rate, metavar="R", help='"10/s", "600/m", "36000/h"')
    p.add_argument("--clear", action="store_true", help="remove the domain's throttle")
    add("shaping", "the [[shaping]] entry that applies to a domain, why, and its live figures"
        ).add_argument("domain", metavar="DOMAIN")
    add("warmup", "each [[egress]] source's warm-up day, and this hour's allowance, use and "
        "headroom per provider")
    p = add("mx", "show the MX cache, or flush it")
    p.add_argument("domain", nargs="?", default=None, metavar="DOMAIN")
    p.add_argument("--flush", action="store_true")
    add("reload", "re-read the configuration file (as SIGHUP)")
    p = add("drain", "stop receiving and wait for the queue to empty, or hand it to "
            "another Volley (--to)")
    p.add_argument("--timeout-queue", dest="queue_timeout", type=duration, metavar="S",
                   help="how long the server waits for the queue (default 300)")
    p.add_argument("--to", metavar="HOST:PORT", help=(
        "hand every queued message to this Volley over SMTP, with its envelope, DSN "
        "parameters, tags and attempt history; it must trust this node (relay.networks, "
        "or --user)"))
    p.add_argument("--connections", type=positive_int, metavar="N",
                   help="SMTP sessions with the peer (default 8)")
    p.add_argument("--tls", choices=("opportunistic", "required", "none"),
                   help="STARTTLS with the peer (default opportunistic)")
    p.add_argument("--user", metavar="NAME", help=(
        f"AUTH as NAME (under TLS only); the password is read from ${PASSWORD_ENV}"))
    add("shutdown", "stop the server")
    add("metrics", "Prometheus text exposition")
    from engine.control.cli_lists import add_suppress

    add_suppress(add("suppress", "the suppression list: add, remove, list, import, export"),
                 _common, _Parser)
    p = add("top", "a live view: rates, busiest destinations, connections, worker CPU")
    p.add_argument("--interval", type=positive_duration, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=positive_int, default=0, metavar="N",
                   help="stop after N refreshes (default: until q or Ctrl-C)")
    p = add("campaigns", "campaign counters, the most recently active first")
    p.add_argument("--tenant", help="only this tenant's campaigns")
    p.add_argument("--campaign", metavar="ID", help='one campaign (of --tenant, default "")')
    p.add_argument("--limit", type=positive_int, help="campaigns (default 100)")
    p.add_argument("--cluster", action="store_true",
                   help="every node's counters summed (a node in a [cluster])")


# --- running ---------------------------------------------------------------------------


def _usage(cmd: str, text: str) -> CliError:
    return CliError(f"ctl {cmd}: {text}", EXIT_USAGE)


def _check(args: argparse.Namespace) -> None:
    """The mistakes worth naming with the CLI's own option names."""
    cmd = args.ctl_cmd
    if cmd == "flush" and args.id and args.domain:
        raise _usage(cmd, "give --domain or an ID, not both")
    if cmd in ("bounce", "delete"):
        filtered = args.domain or args.sender or args.state
        if args.id and (filtered or args.all):
            raise _usage(cmd, "give an ID or filters (--domain, --sender, --state, --all), not both")
        if not (args.id or filtered or args.all):
            raise _usage(cmd, "give an ID, a filter (--domain, --sender, --state), or --all")
    if cmd == "throttle" and not (args.clear or args.max_connections or args.rate):
        raise _usage(cmd, "give --max-connections and/or --rate, or --clear")


def build_request(args: argparse.Namespace) -> protocol.AnyRequest:
    """The protocol request for the parsed arguments.

    Raises:
        CliError: exit 2, for what the server would refuse as well.
    """
    import msgspec

    from engine.control import protocol

    _check(args)
    cmd: str = args.ctl_cmd
    cls = next(c for c in protocol.AnyRequest.__args__ if c.__struct_config__.tag == cmd)
    fields: dict[str, Any] = {"cmd": cmd}
    for name in cls.__struct_fields__:
        value = getattr(args, "queue_timeout" if name == "timeout" else name, None)
        if value is not None:
            fields[name] = value
    try:
        return protocol.decode_request(msgspec.json.encode(fields))
    except protocol.RequestError as err:
        raise _usage(cmd, str(err)) from None


def _timeout(args: argparse.Namespace) -> float | None:
    if args.timeout is None:
        return None if args.ctl_cmd in _UNBOUNDED else DEFAULT_TIMEOUT
    return args.timeout or None  # 0 = wait for ever


def run(args: argparse.Namespace) -> int:
    """Handler of `volley ctl`: build, send, print; exit 0, or 1 when refused or unreachable."""
    from engine.config import ConfigError
    from engine.control import client

    req = None if args.ctl_cmd in ("suppress", "top") else build_request(args)
    try:
        path = client.socket_path(args.config, args.socket)
    except ConfigError as err:
        raise CliError(str(err), EXIT_USAGE) from None

    def send(req: protocol.Request) -> dict[str, Any]:
        try:
            return client.request(path, req, _timeout(args))
        except client.ControlUnavailable as err:
            raise CliError(f"{err}; is volley serve running?", EXIT_FAILURE) from None
        except client.ControlError as err:
            raise CliError(str(err), EXIT_FAILURE) from None

    if args.ctl_cmd == "top":
        from engine.control.top_screen import run_top

        return run_top(send, args.interval, args.count)
    if req is None:
        from engine.control.cli_lists import run_suppress

        return run_suppress(args, send, lambda cmd, reply: _show(args, cmd, reply))
    if args.ctl_cmd == "drain" and args.to:
        return _drain_to(args, req, send)
    reply = send(req)
    _show(args, args.ctl_cmd, reply)
    if args.ctl_cmd == "drain" and reply.get("drained") is False:
        return EXIT_FAILURE  # timed out with mail still queued: a script must not go on
    return EXIT_OK if reply["ok"] else EXIT_FAILURE


def _drain_to(args: argparse.Namespace, req: protocol.AnyRequest,
              send: Callable[[protocol.Request], dict[str, Any]]) -> int:
    """Start the handover, then ask for its progress every second (a line each time
    it moved) until it ends; the summary last. Exit 0 when nothing is left here."""
    import os

    import msgspec

    from engine.control import render_changes

    req = msgspec.structs.replace(req, password=os.environ.get(PASSWORD_ENV, ""))
    reply = send(req)
    shown = ""
    while reply["ok"] and reply.get("running"):
        if not args.json and (line := render_changes.handover_progress(reply)) != shown:
            sys.stdout.write(line)
            sys.stdout.flush()
            shown = line
        reply = send(msgspec.structs.replace(req, start=False, password=""))
    _show(args, "drain", reply)
    if not reply["ok"]:
        return EXIT_FAILURE
    return EXIT_OK if reply.get("left") == 0 and not reply.get("error") else EXIT_FAILURE


def _show(args: argparse.Namespace, cmd: str, reply: dict[str, Any]) -> None:
    if args.json:
        _print_json(reply)
    elif not reply["ok"]:
        raise CliError(str(reply.get("error") or "refused (no error text)"), EXIT_FAILURE)
    else:
        _print_human(cmd, reply)


def _print_json(reply: dict[str, Any]) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def _print_human(cmd: str, reply: dict[str, Any]) -> None:
    from engine.control import render

    try:
        text = render.render(cmd, reply)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
        # A reply shape this client does not know (a newer server): still show it.
        print(f"{PROG}: cannot render the reply ({type(err).__name__}: {err}); raw reply:",
              file=sys.stderr)
        _print_json(reply)
        return
    sys.stdout.write(text)
    sys.stdout.flush()
