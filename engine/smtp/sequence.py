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
    if state is _S.CONNECTED:
        return R503_NEED_HELO
    if isinstance(command, Mail):
        return R503_NESTED_MAIL
    if isinstance(command, Rcpt):
        return R503_NEED_MAIL
    if isinstance(command, (Data, Bdat)) and state is _S.MAIL:
        # The contract and Postfix's habit: DATA with no accepted RCPT is 554.
        return R554_NO_VALID_RCPTS
    return R503_BAD_SEQUENCE


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
