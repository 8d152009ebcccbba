"""`volley ctl suppress add|remove|list|import|export`: the suppression list from the
command line.

`import` reads the file here, in the client, and sends it in chunks of
protocol.MAX_VALUES values: each chunk is one request and one short write transaction
on the server, so deliveries commit between chunks. File format (also what `export`
writes): one address ("has an @") or domain per line; blank lines and lines whose
first non-blank character is "#" are skipped (an address never starts with "#" in
practice, though RFC 5322 atext allows it). A bad line is reported with its line
number and skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError

# Bytes of values in one import request, under protocol.MAX_LINE with room for JSON quoting.
CHUNK_BYTES = 2 * 1024 * 1024
PAGE = 10_000  # entries per `export` request
# engine/queue/suppression.py REASONS (not imported: every `volley` run builds this parser).
_REASON_HELP = "bounce, complaint, unsubscribe, manual or import"


def add_suppress(p: argparse.ArgumentParser, common: Any, parser_class: type) -> None:
    """The `suppress` commands under `p` (`common` adds the connection options)."""
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = p.add_subparsers(
        dest="suppress_cmd", metavar="CMD", required=True, parser_class=parser_class)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        common(q, top=False)
        return q

    tenant_help = 'the tenant whose list (default "": the list every tenant shares)'
    q = add("add", "suppress an address, or a domain (a value without @)")
    q.add_argument("value", metavar="ADDRESS|DOMAIN")
    q.add_argument("--reason", metavar="R", default="manual", help=_REASON_HELP + " (default manual)")
    q.add_argument("--tenant", default="", help=tenant_help)
    q = add("remove", "take an address or domain off the list")
    q.add_argument("value", metavar="ADDRESS|DOMAIN")
    q.add_argument("--tenant", default="", help=tenant_help)
    q = add("list", "entries, a page at a time (every tenant unless --tenant)")
    q.add_argument("--tenant", default=None, help="only this tenant's entries")
    q.add_argument("--limit", type=_limit, default=100, help="entries (default 100)")
    q.add_argument("--after", metavar="VALUE", default="", help="the page after this value")
    q.add_argument("--after-tenant", metavar="TENANT", default="",
                   help="with --after and no --tenant: the tenant of that value")
    q = add("import", "add every address or domain of a file (one a line, # comments)")
    q.add_argument("file", metavar="FILE", help='"-" reads standard input')
    q.add_argument("--reason", metavar="R", default="import", help=_REASON_HELP + " (default import)")
    q.add_argument("--tenant", default="", help=tenant_help)
    q = add("export", "print one tenant's entries, one a line, as import reads them")
    q.add_argument("--tenant", default="", help=tenant_help)


def _limit(text: str) -> int:
    from engine.control.protocol import MAX_LIMIT

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_LIMIT}, got {text!r}")
    return n


def run_suppress(args: argparse.Namespace, send: Any, show: Any) -> int:
    """`send(request) -> reply dict` talks to the server; `show(cmd, reply)` prints a
    reply (as JSON with --json)."""
    from engine.control import protocol
    from engine.queue.suppression import REASONS, check_tenant, normalize

    cmd = args.suppress_cmd
    if getattr(args, "reason", REASONS[0]) not in REASONS:
        raise CliError(f"ctl suppress {cmd}: --reason: expected one of {', '.join(REASONS)}, "
                       f"got {args.reason!r}", EXIT_USAGE)
    try:
        if getattr(args, "tenant", None) is not None:
            check_tenant(args.tenant)
        if cmd in ("add", "remove"):
            normalize(args.value)
        if cmd == "list" and args.after:
            normalize(args.after)
    except ValueError as err:
        raise CliError(f"ctl suppress {cmd}: {err}", EXIT_USAGE) from None
    if cmd == "import":
        return _import(args, send)
    if cmd == "export":
        return _export(args, send)
    req: protocol.Request
    if cmd == "add":
        req = protocol.SuppressAdd(values=[args.value], reason=args.reason, tenant=args.tenant,
                                   source="ctl")
    elif cmd == "remove":
        req = protocol.SuppressRemove(value=args.value, tenant=args.tenant)
    else:
        req = protocol.SuppressList(tenant=args.tenant, limit=args.limit, after=args.after,
                                    after_tenant=args.after_tenant)
    reply = send(req)
    show(f"suppress_{cmd}", reply)
    return EXIT_OK if reply["ok"] else EXIT_FAILURE


def read_values(lines: Iterator[bytes]) -> Iterator[tuple[int, str | None, str]]:
    """(line number, value, "") of each line that is not blank or a comment, and
    (line number, None, problem) of a line that cannot be a value (not UTF-8)."""
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            yield number, None, f"not UTF-8 (byte {err.start + 1})"
            continue
        if text and not text.startswith("#"):
            yield number, text, ""


def chunks(values: Iterator[tuple[int, str]], most: int) -> Iterator[list[tuple[int, str]]]:
    """Lists of at most `most` (line number, value) and about CHUNK_BYTES."""
    out: list[tuple[int, str]] = []
    size = 0
    for item in values:
        out.append(item)
        size += len(item[1]) + 8
        if len(out) >= most or size >= CHUNK_BYTES:
            yield out
            out, size = [], 0
    if out:
        yield out


def _import(args: argparse.Namespace, send: Any) -> int:
    from engine.control import protocol

    name = "stdin" if args.file == "-" else args.file
    try:
        handle = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as err:
        raise CliError(f"ctl suppress import: {args.file}: {err.strerror}", EXIT_USAGE) from None
    added = present = 0
    bad: list[dict[str, Any]] = []
    started = time.monotonic()
    def good() -> Iterator[tuple[int, str]]:
        for line, value, problem in read_values(iter(handle)):
            if value is None:
                bad.append({"line": line, "value": "", "error": problem})
            else:
                yield line, value

    with handle:
        for part in chunks(good(), protocol.MAX_VALUES):
            req = protocol.SuppressAdd(values=[v for _, v in part], reason=args.reason,
                                       tenant=args.tenant, source=Path(name).name)
            reply = send(req)
            if not reply["ok"]:
                raise CliError(
                    f"ctl suppress import: lines {part[0][0]}-{part[-1][0]} of {name} refused: "
                    f"{reply.get('error')}; {added} added before them", EXIT_FAILURE)
            added += reply["added"]
            present += reply["present"]
            for b in reply["bad"]:
                line, value = part[b["index"]]
                bad.append({"line": line, "value": value, "error": b["error"]})
    bad.sort(key=lambda b: b["line"])
    summary = {"ok": True, "added": added, "present": present, "bad": bad,
               "seconds": round(time.monotonic() - started, 3)}
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for b in bad:
            print(f"{name}:{b['line']}: skipped: {b['error']}", file=sys.stderr)
        print(f"added {added}, already present {present}, bad {len(bad)}")
    return EXIT_OK


def _export(args: argparse.Namespace, send: Any) -> int:
    from engine.control import protocol

    after = ""
    out = sys.stdout
    entries: list[Any] = []
    if not args.json:
        out.write(f"# volley suppression list, tenant {args.tenant!r}, exported "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    while True:
        reply = send(protocol.SuppressList(tenant=args.tenant, limit=PAGE, after=after))
        if not reply["ok"]:
            raise CliError(f"ctl suppress export: {reply.get('error')}", EXIT_FAILURE)
        page = reply["entries"]
        if args.json:
            entries += page
        else:
            out.write("".join(e["value"] + "\n" for e in page))
        after = reply["next"]
        if not after:
            break
    if args.json:
        import orjson

        out.write(orjson.dumps({"ok": True, "entries": entries},
                               option=orjson.OPT_INDENT_2).decode() + "\n")
    out.flush()
    return EXIT_OK
