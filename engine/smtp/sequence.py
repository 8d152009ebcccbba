"""Which SMTP command is legal in which session state, and the commands the state
machine (server.py) answers by itself. RFC 5321 §4.1.4 fixes the order of commands;
a pair missing from `ALLOWED` is answered 503 5.5.1."""

from __future__ import annotations

from engine.smtp.commands import (
    Auth,
    Bdat,
    Command,
    Data,
    Ehlo,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
)
from engine.smtp.events import AutoReply, State
from engine.smtp.replies import (
    R214_HELP,
    R221_BYE,
    R250_OK,
    R250_RESET,
    R252_CANNOT_VRFY,
    R354_START_DATA,
    R503_BAD_SEQUENCE,
    R503_BDAT_OPEN,
    R503_NEED_HELO,
    R503_NEED_MAIL,
    R503_NESTED_MAIL,
    R554_NO_VALID_RCPTS,
    Reply,
)

_S = State
_TRANSACTION = frozenset({_S.MAIL, _S.RCPT})
_ANY_GREETED = frozenset({_S.READY, _S.MAIL, _S.RCPT})
_ANYTIME = frozenset({_S.CONNECTED, _S.READY, _S.MAIL, _S.RCPT, _S.BDAT_MORE})

# (command type) → states in which it is legal. Everything else is 503.
ALLOWED: dict[type[Command], frozenset[State]] = {
    Ehlo: frozenset({_S.CONNECTED}) | _ANY_GREETED,
    Helo: frozenset({_S.CONNECTED}) | _ANY_GREETED,
    Mail: frozenset({_S.READY}),
    Rcpt: _TRANSACTION,
    Data: frozenset({_S.RCPT}),
    Bdat: frozenset({_S.RCPT, _S.BDAT_MORE}),
    Rset: _ANYTIME,
    Noop: _ANYTIME,
    Quit: _ANYTIME,
    Help: _ANYTIME,
    Vrfy: _ANYTIME - {_S.BDAT_MORE},
    StartTls: frozenset({_S.READY}),
    Auth: frozenset({_S.READY}),
}
# The same table as tuples: `state in tuple` compares by identity, while a frozenset
# lookup calls Enum.__hash__ (Python code) once per command.
ALLOWED_IN: dict[type[Command], tuple[State, ...]] = {
    kind: tuple(states) for kind, states in ALLOWED.items()
}


def sequence_reply(command: Command, state: State) -> Reply:
    """The 503 (or 554) for `command` out of order in `state`, saying what is missing."""
    if state is _S.CONNECTED:
        return R503_NEED_HELO
    if isinstance(command, Mail):
        return R503_NESTED_MAIL
    if state is _S.BDAT_MORE and isinstance(command, (Rcpt, Data)):
        return R503_BDAT_OPEN  # RFC 3030 §3: the BDAT chunks end only with BDAT LAST
    if isinstance(command, (Rcpt, Data, Bdat)) and state is _S.READY:
        return R503_NEED_MAIL  # (DATA and BDAT as RCPT: the transaction has no sender)
    if isinstance(command, (Data, Bdat)) and state is _S.MAIL:
        # The contract and Postfix's habit: DATA with no accepted RCPT is 554;
        # its text says what is missing (an accepted RCPT).
        return R554_NO_VALID_RCPTS
    return R503_BAD_SEQUENCE


# RFC 5321 §4.1.1.8: HELP lists what this session takes. BDAT, STARTTLS and AUTH only
# once the last EHLO reply offered them (CHUNKING, STARTTLS, AUTH): before EHLO, after
# HELO, after the TLS handshake (EHLO again) and on a listener without them, never.
_HELP_EXTENSIONS = (("CHUNKING", "BDAT"), ("STARTTLS", "STARTTLS"), ("AUTH", "AUTH"))
_HELP_CACHE: dict[frozenset[str], Reply] = {}


def help_reply(offered: frozenset[str]) -> Reply:
    """The 214 to HELP for a session whose last EHLO reply offered the `offered` keywords."""
    reply = _HELP_CACHE.get(offered)
    if reply is None:
        extra = [command for keyword, command in _HELP_EXTENSIONS if keyword in offered]
        reply = R214_HELP.with_text(" ".join([str(R214_HELP.text), *extra]))
        if len(_HELP_CACHE) < 64:  # (a handful of listener kinds; never unbounded)
            _HELP_CACHE[offered] = reply
    return reply


# Commands the machine answers itself: no policy is involved.
AUTO_REPLIES: dict[type[Command], AutoReply] = {
    Noop: AutoReply(R250_OK),
    Help: AutoReply(R214_HELP),
    Vrfy: AutoReply(R252_CANNOT_VRFY),
    Rset: AutoReply(R250_RESET),
    Quit: AutoReply(R221_BYE),
    Data: AutoReply(R354_START_DATA),
}

JUNK = frozenset({Noop, Rset, Vrfy, Help})
