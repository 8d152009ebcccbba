"""SMTP AUTH's SASL side (RFC 4954): the PLAIN (RFC 4616) and LOGIN exchanges.

Pure: lines from the client go in, a challenge or refusal Reply or the
(user, password) to verify comes out. Checking the password is users.py's job.
Passwords never appear in exception messages, reprs or logs.
"""

from __future__ import annotations

import base64
import binascii

from engine.errors import Permanent
from engine.smtp.replies import R501_AUTH_CANCELLED, R501_BAD_BASE64, Reply

__all__ = [
    "LOGIN_PASSWORD_CHALLENGE",
    "LOGIN_USERNAME_CHALLENGE",
    "MECHANISMS",
    "AuthCancelled",
    "AuthError",
    "AuthExchange",
    "AuthSyntaxError",
    "decode_login_field",
    "decode_plain",
]

# What EHLO offers, in this order.
MECHANISMS = ("PLAIN", "LOGIN")

# draft-murchison-sasl-login-00 §2: the server's challenges are "Username:" and
# "Password:", base64-encoded.
LOGIN_USERNAME_CHALLENGE = "VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"

_CANCEL = "*"


class AuthError(Permanent):
    """A client's AUTH exchange cannot go on; `reply` is what the session sends."""

    reply: Reply = R501_BAD_BASE64


class AuthSyntaxError(AuthError):
    """The client's response is not valid base64 or not a valid SASL message."""

    reply = R501_BAD_BASE64


class AuthCancelled(AuthError):
    """The client answered a challenge with "*" (RFC 4954 §4)."""

    reply = R501_AUTH_CANCELLED


# --- one AUTH command's conversation ------------------------------------------------


class AuthExchange:
    """The SASL conversation of one AUTH command, one step per client line."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.user: str | None = None
        self.asked = False

    def step(self, response: str | None) -> Reply | tuple[str, str]:
        """A Reply to send (challenge or refusal) or the (user, password) to verify.

        `response` is the client's line, or None when the AUTH command carried no
        initial response.
        """
        try:
            if response == _CANCEL:
                raise AuthCancelled()
            if self.mechanism == "PLAIN":
                return self._plain(response)
            return self._login(response)
        except AuthCancelled:
            return R501_AUTH_CANCELLED
        except AuthSyntaxError as err:
            return err.reply

    def _plain(self, response: str | None) -> Reply | tuple[str, str]:
        if response is None:
            if self.asked:
                return R501_AUTH_CANCELLED
            self.asked = True
            return Reply(334, "", "")
        # RFC 4954 §4: "=" is an empty initial response.
        return decode_plain("" if response == "=" else response)

    def _login(self, response: str | None) -> Reply | tuple[str, str]:
        if response is None or (self.user is None and not self.asked and response == "="):
            self.asked = True
            return Reply(334, "", LOGIN_USERNAME_CHALLENGE)
        if self.user is None:
            self.user = decode_login_field(response)
            return Reply(334, "", LOGIN_PASSWORD_CHALLENGE)
        return self.user, decode_login_field(response)


# --- SASL message decoding -----------------------------------------------------------


def _b64decode(data: str | bytes) -> bytes:
    """Strict RFC 4648 §4 base64 (RFC 4954 §4 requires it), after a cancel check.

    Raises:
        AuthCancelled: the response is "*" (RFC 4954 §4).
        AuthSyntaxError: not base64 (bad alphabet, bad padding, non-ASCII).
    """
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    # The session hands us the line; tolerate the CRLF it may not have stripped.
    text = text.strip(" \t\r\n")
    if text == _CANCEL:
        raise AuthCancelled("client cancelled the AUTH exchange")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise AuthSyntaxError("response is not valid base64") from None


def _utf8(raw: bytes) -> str:
    """Raises AuthSyntaxError: RFC 4616 §2 and RFC 4954 §4 carry UTF-8 only."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthSyntaxError("response is not valid UTF-8") from None


def decode_plain(b64: str | bytes) -> tuple[str, str]:
    """Decode a PLAIN response (RFC 4616 §2): ``[authzid] NUL authcid NUL passwd``.

    Returns (authcid, passwd). We do not support acting as another identity, so an
    authzid must be empty or equal to the authcid.

    Raises:
        AuthCancelled: the response is "*" (RFC 4954 §4).
        AuthSyntaxError: bad base64, not exactly two NULs, empty authcid or passwd
            (both are 1*SAFE in RFC 4616 §2), invalid UTF-8, or an authzid that
            differs from the authcid. Its `reply` is 501 5.5.2.
    """
    raw = _b64decode(b64)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise AuthSyntaxError("PLAIN response must be authzid NUL authcid NUL passwd")
    authzid, authcid, passwd = (_utf8(p) for p in parts)
    if not authcid or not passwd:
        raise AuthSyntaxError("PLAIN response has an empty user name or password")
    if authzid and authzid != authcid:
        raise AuthSyntaxError("PLAIN authorization identity must match the user")
    return authcid, passwd


def decode_login_field(b64: str | bytes) -> str:
    """Decode one LOGIN response (the user name or the password).

    Raises:
        AuthCancelled: the response is "*" (RFC 4954 §4).
        AuthSyntaxError: bad base64 or invalid UTF-8; its `reply` is 501 5.5.2.
    """
    return _utf8(_b64decode(b64))
