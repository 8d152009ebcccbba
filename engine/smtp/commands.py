"""One SMTP command line → one typed `Command`.

`parse_command` never returns junk: a line either becomes a Command Struct or raises
`SmtpSyntaxError` carrying the Reply to send (500/501/553/555). Addresses are kept as
data (P9): the parser only checks their shape, it never interprets them.
"""

from __future__ import annotations

import msgspec

from engine.smtp import grammar
from engine.smtp.replies import (
    R500_BAD_BYTES,
    R500_UNKNOWN_COMMAND,
    R501_SYNTAX,
    R502_NOT_IMPLEMENTED,
    R553_BAD_ADDRESS,
    R553_NON_ASCII_ADDRESS,
    R555_UNKNOWN_PARAM,
    Reply,
)


class SmtpSyntaxError(Exception):
    """The peer sent a line we refuse; `reply` says why on the wire."""

    def __init__(self, reply: Reply, detail: str | None = None) -> None:
        super().__init__(detail or reply.lines[0])
        self.reply = reply if detail is None else reply.with_text(detail)


class Command(msgspec.Struct, frozen=True, tag=True):
    pass


class Ehlo(Command, frozen=True):
    domain: str


class Helo(Command, frozen=True):
    domain: str


class Mail(Command, frozen=True):
    address: str  # "" for the null reverse-path
    size: int | None = None
    body: str | None = None  # "7BIT" | "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 §4.3: "FULL" | "HDRS"
    envid: str | None = None  # xtext-decoded
    auth: str | None = None  # RFC 4954 §5 AUTH=<mailbox>, xtext-decoded, kept for the log


class Rcpt(Command, frozen=True):
    address: str
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # "rfc822;user@example.com", xtext-decoded


class Data(Command, frozen=True):
    pass


class Bdat(Command, frozen=True):
    size: int
    last: bool


class Rset(Command, frozen=True):
    pass


class Noop(Command, frozen=True):
    pass


class Quit(Command, frozen=True):
    pass


class Help(Command, frozen=True):
    pass


class Vrfy(Command, frozen=True):
    argument: str


class StartTls(Command, frozen=True):
    pass


class Auth(Command, frozen=True):
    mechanism: str
    initial: str | None = None  # base64 initial response; "=" means empty (RFC 4954 §4)


# RFC 5321 §4.5.3.1.4: command line ≤ 512 octets including CRLF.
MAX_COMMAND_LINE = 512
# RFC 3461 §4.4: ENVID ≤ 100 characters; §4.2: ORCPT ≤ 500.
MAX_ENVID = 100
MAX_ORCPT = 500


_MAX_LOCAL, _MAX_DOMAIN, _MAX_PATH = grammar.MAX_LOCAL_PART, grammar.MAX_DOMAIN, grammar.MAX_PATH


def _split_verb(line: str) -> tuple[str, str]:
    verb, _, rest = line.partition(" ")
    # Only an ASCII verb is upper-cased: "maıl".upper() == "MAIL" must stay unknown.
    return (verb.upper() if verb.isascii() else verb), rest


def _path(text: str, *, utf8: bool, allow_null: bool, max_local: int = _MAX_LOCAL) -> tuple[str, str]:
    """Match a Path at the start of `text`; return (address, remaining text)."""
    if allow_null and text.startswith(grammar.NULL_PATH):
        return "", text[2:]
    m = (grammar.PATH_UTF8 if utf8 else grammar.PATH).match(text)
    if m is None:
        if not text.startswith("<"):
            raise SmtpSyntaxError(R501_SYNTAX, "Syntax: address must be in <angle brackets>")
        raise SmtpSyntaxError(R553_BAD_ADDRESS)
    local, domain = m.group("local", "domain")
    if domain[:1] == "[" and not grammar.valid_address_literal(domain):
        raise SmtpSyntaxError(R553_BAD_ADDRESS, "Bad address literal")
    end = m.end()
    # Octet limits; the ASCII pattern matches only ASCII, where len() is the octet count.
    if utf8:
        too_long = len(local.encode()) > max_local or len(domain.encode()) > _MAX_DOMAIN
    else:
        too_long = len(local) > max_local or len(domain) > _MAX_DOMAIN
    if too_long or end > _MAX_PATH:
        raise SmtpSyntaxError(R553_BAD_ADDRESS, "Address too long")
    return f"{local}@{domain}", text[end:]


def _params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split():
        m = grammar.ESMTP_PARAM.fullmatch(token)
        if m is None:
            raise SmtpSyntaxError(R501_SYNTAX, f"Bad parameter syntax: {token[:40]}")
        key = m.group("key").upper()
        if key in params:
            raise SmtpSyntaxError(R501_SYNTAX, f"Duplicate parameter {key}")
        params[key] = m.group("value")
    return params


def _xtext(key: str, value: str | None, limit: int) -> str:
    if value is None or len(value) > limit:
        raise SmtpSyntaxError(R501_SYNTAX, f"Bad {key} value")
    try:
        return grammar.xtext_decode(value)
    except ValueError:
        raise SmtpSyntaxError(R501_SYNTAX, f"{key} value is not xtext") from None


def _mail(rest: str) -> Mail:
    if rest[:5].upper() != "FROM:":
        raise SmtpSyntaxError(R501_SYNTAX, "Syntax: MAIL FROM:<address>")
    # RFC 5321 has no space after the colon, but common clients send one; be liberal.
    arg = rest[5:].lstrip(" ")
    # A non-ASCII path is only legal with SMTPUTF8; parse_command checks that after.
    address, tail = _path(arg, utf8=not arg.isascii(), allow_null=True)
    if not tail:
        return Mail(address)  # no parameters: the common case
    if not tail.startswith(" "):
        raise SmtpSyntaxError(R501_SYNTAX, "Syntax: MAIL FROM:<address> [parameters]")
    params = _params(tail)
    utf8 = "SMTPUTF8" in params
    size = body = ret = envid = auth = None
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870
            if value is None or not value.isdigit() or len(value) > 20:
                raise SmtpSyntaxError(R501_SYNTAX, "Bad SIZE value")
            size = int(value)
        elif key == "BODY":  # RFC 6152; BINARYMIME is not offered
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise SmtpSyntaxError(R501_SYNTAX, "Bad BODY value")
            body = value.upper()
        elif key == "SMTPUTF8":  # RFC 6531 §3.4: no value
            if value is not None:
                raise SmtpSyntaxError(R501_SYNTAX, "SMTPUTF8 takes no value")
        elif key == "RET":  # RFC 3461 §4.3
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise SmtpSyntaxError(R501_SYNTAX, "Bad RET value")
            ret = value.upper()
        elif key == "ENVID":  # RFC 3461 §4.4
            envid = _xtext(key, value, MAX_ENVID)
        elif key == "AUTH":  # RFC 4954 §5
            auth = _xtext(key, value, 500)
        else:
            raise SmtpSyntaxError(R555_UNKNOWN_PARAM, f"MAIL FROM parameter {key[:40]} not recognized")
    return Mail(address, size=size, body=body, smtputf8=utf8, ret=ret, envid=envid, auth=auth)


def _notify(value: str | None) -> tuple[str, ...]:
    # RFC 3461 §4.1: "NEVER" alone, or a comma list of SUCCESS / FAILURE / DELAY.
    if value is None:
        raise SmtpSyntaxError(R501_SYNTAX, "Bad NOTIFY value")
    items = tuple(v.upper() for v in value.split(","))
    if items == ("NEVER",):
        return items
    if not items or len(set(items)) != len(items) or not set(items) <= grammar.NOTIFY_ELEMENTS:
        raise SmtpSyntaxError(R501_SYNTAX, "Bad NOTIFY value")
    return items


def _rcpt(rest: str, utf8: bool) -> Rcpt:
    if rest[:3].upper() != "TO:":
        raise SmtpSyntaxError(R501_SYNTAX, "Syntax: RCPT TO:<address>")
    arg = rest[3:].lstrip(" ")
    if arg[:12].lower() == "<postmaster>":
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain MUST be accepted; it
        # means this host's postmaster (the relay policy treats it as local).
        address, tail = "postmaster", arg[12:]
    else:
        # RFC 5321 §4.5.3.1: 64 octets is the local part a server must at least take,
        # and "implementation techniques that impose no limits ... should be used". A
        # recipient's local part is held to the path limit only, so a VERP return path
        # (local+TOKEN@domain, engine/mail/verp.py) longer than 64 comes back to us.
        address, tail = _path(arg, utf8=utf8, allow_null=False, max_local=_MAX_PATH)
    if not tail:
        return Rcpt(address)  # no parameters: the common case
    if not tail.startswith(" "):
        raise SmtpSyntaxError(R501_SYNTAX, "Syntax: RCPT TO:<address> [parameters]")
    notify = orcpt = None
    for key, value in _params(tail).items():
        if key == "NOTIFY":
            notify = _notify(value)
        elif key == "ORCPT":
            # RFC 3461 §4.2: ORCPT=addr-type ";" xtext
            decoded = _xtext(key, value, MAX_ORCPT)
            if ";" not in decoded:
                raise SmtpSyntaxError(R501_SYNTAX, "Bad ORCPT value")
            orcpt = decoded
        else:
            raise SmtpSyntaxError(R555_UNKNOWN_PARAM, f"RCPT TO parameter {key[:40]} not recognized")
    return Rcpt(address, notify=notify, orcpt=orcpt)


def _bdat(rest: str) -> Bdat:
    # RFC 3030 §2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF
    parts = rest.split(" ")
    if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 15:
        raise SmtpSyntaxError(R501_SYNTAX, "Syntax: BDAT <size> [LAST]")
    if len(parts) == 2 and parts[1].upper() != "LAST":
        raise SmtpSyntaxError(R501_SYNTAX, "Syntax: BDAT <size> [LAST]")
    return Bdat(int(parts[0]), last=len(parts) == 2)


def _helo_domain(rest: str, verb: str) -> str:
    # Liberal on purpose: many real clients send bare hostnames or junk here, and the
    # name is only used in the Received: header.
    domain = rest.strip()
    if not domain or " " in domain:
        raise SmtpSyntaxError(R501_SYNTAX, f"Syntax: {verb} <hostname>")
    return domain


def _eight_bit_refusal(address: str) -> Reply:
    """UTF-8 in a MAIL/RCPT line outside an SMTPUTF8 transaction: a non-ASCII mailbox
    is RFC 6531's 553 5.6.7; 8-bit bytes anywhere else in the line stay a 500."""
    return R500_BAD_BYTES if address.isascii() else R553_NON_ASCII_ADDRESS


def parse_command(raw: bytes, *, utf8_rcpt: bool = False) -> Command:
    """Parse one command line (without its CRLF).

    `utf8_rcpt` allows a UTF-8 RCPT address: the transaction's MAIL carried SMTPUTF8.
    Raises SmtpSyntaxError with the reply to send; nothing else for any input.
    """
    # Finding 3: a bare CR or LF inside a command line is never part of a command.
    if b"\0" in raw or b"\r" in raw or b"\n" in raw:
        raise SmtpSyntaxError(R500_BAD_BYTES)
    ascii_line = raw.isascii()
    if ascii_line:
        line = raw.decode("ascii")
    else:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SmtpSyntaxError(R500_BAD_BYTES) from None
    verb, rest = _split_verb(line)
    if not ascii_line and verb not in ("MAIL", "RCPT"):
        raise SmtpSyntaxError(R500_BAD_BYTES)
    if verb == "MAIL":
        mail = _mail(rest)
        if not ascii_line and not mail.smtputf8:
            raise SmtpSyntaxError(_eight_bit_refusal(mail.address))
        return mail
    if verb == "RCPT":
        if not ascii_line and not utf8_rcpt:
            raise SmtpSyntaxError(_eight_bit_refusal(_rcpt(rest, True).address))
        return _rcpt(rest, utf8_rcpt)
    if verb == "DATA":
        if rest.strip():
            raise SmtpSyntaxError(R501_SYNTAX, "Syntax: DATA takes no argument")
        return Data()
    if verb == "BDAT":
        return _bdat(rest)
    if verb == "EHLO":
        return Ehlo(_helo_domain(rest, verb))
    if verb == "HELO":
        return Helo(_helo_domain(rest, verb))
    if verb in ("RSET", "QUIT", "STARTTLS"):
        if rest.strip():
            raise SmtpSyntaxError(R501_SYNTAX, f"Syntax: {verb} takes no argument")
        return {"RSET": Rset, "QUIT": Quit, "STARTTLS": StartTls}[verb]()
    if verb == "NOOP":  # RFC 5321 §4.1.1.9: the argument is ignored
        return Noop()
    if verb == "HELP":
        return Help()
    if verb == "VRFY":
        if not rest.strip():
            raise SmtpSyntaxError(R501_SYNTAX, "Syntax: VRFY <address>")
        return Vrfy(rest.strip())
    if verb == "AUTH":
        parts = rest.split()
        if not 1 <= len(parts) <= 2:
            raise SmtpSyntaxError(R501_SYNTAX, "Syntax: AUTH <mechanism> [initial-response]")
        return Auth(parts[0].upper(), parts[1] if len(parts) == 2 else None)
    if verb in ("EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML"):
        raise SmtpSyntaxError(R502_NOT_IMPLEMENTED)
    raise SmtpSyntaxError(R500_UNKNOWN_COMMAND)


def encode(command: Command) -> bytes:
    """Client side: a Command back to its wire line (with CRLF)."""
    if isinstance(command, Mail):
        parts = [f"MAIL FROM:<{command.address}>"]
        if command.size is not None:
            parts.append(f"SIZE={command.size}")
        if command.body:
            parts.append(f"BODY={command.body}")
        if command.smtputf8:
            parts.append("SMTPUTF8")
        if command.ret:
            parts.append(f"RET={command.ret}")
        if command.envid:
            parts.append(f"ENVID={grammar.xtext_encode(command.envid)}")
        line = " ".join(parts)
    elif isinstance(command, Rcpt):
        parts = [f"RCPT TO:<{command.address}>"]
        if command.notify:
            parts.append("NOTIFY=" + ",".join(command.notify))
        if command.orcpt:
            parts.append(f"ORCPT={grammar.xtext_encode(command.orcpt)}")
        line = " ".join(parts)
    elif isinstance(command, (Ehlo, Helo)):
        line = f"{type(command).__name__.upper()} {command.domain}"
    elif isinstance(command, Bdat):
        line = f"BDAT {command.size}" + (" LAST" if command.last else "")
    elif isinstance(command, Auth):
        line = f"AUTH {command.mechanism}" + (f" {command.initial}" if command.initial else "")
    elif isinstance(command, Vrfy):
        line = f"VRFY {command.argument}"
    else:
        line = "STARTTLS" if isinstance(command, StartTls) else type(command).__name__.upper()
    return line.encode("utf-8") + b"\r\n"
