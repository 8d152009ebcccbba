"""scrypt password hashes in a self-describing text form (RFC 7914).

The hash names its own parameters, so the cost can be raised later without
invalidating existing entries::

    $scrypt$ln=14,r=8,p=1$<salt base64>$<hash base64>

Pure CPU work: one verification costs ~50 ms at the default cost, so callers on an
event loop run it in an executor (users.authenticate does). Passwords never appear
in exception messages, reprs or logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from typing import NamedTuple

__all__ = [
    "DEFAULT_LN",
    "ScryptHash",
    "dummy_hash",
    "hash_password",
    "parse_hash",
    "verify_password",
]

# 2**14 * r=8 * 128 bytes = 16 MiB and ~50 ms per verification: the scrypt paper's
# interactive-login cost, still cheap enough for a relay's AUTH rate.
DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
DKLEN = 32

# Bounds on what a stored hash may ask for: a hand-edited (or hostile) users file
# must not make one AUTH attempt allocate gigabytes or spin for minutes.
_MAX_LN = 20
_MAX_R = 32
_MAX_P = 16
_MAX_MEM = 256 * 1024**2

_HASH_RE = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})"
    r"\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})"
)


class ScryptHash(NamedTuple):
    """An encoded hash, split: its cost parameters, salt and digest."""

    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _scrypt_memory(n: int, r: int, p: int) -> int:
    # OpenSSL's own estimate (crypto/evp/pbe_scrypt.c): B = 128*r*p, V = 128*r*(N+2).
    return 128 * r * p + 128 * r * (n + 2)


def parse_hash(encoded: str) -> ScryptHash:
    """Split and bound-check an encoded hash.

    Raises:
        ValueError: the string is not a `$scrypt$` hash this module can verify. The
            message never quotes the input, which may be a mistyped password.
    """
    m = _HASH_RE.fullmatch(encoded)
    if m is None:
        raise ValueError("malformed password hash (expected $scrypt$ln=N,r=N,p=N$salt$hash)")
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError("password hash parameters out of range")
    if _scrypt_memory(2**ln, r, p) > _MAX_MEM:
        raise ValueError("password hash parameters need too much memory")
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except binascii.Error:
        raise ValueError("malformed base64 in password hash") from None
    if not salt or not 16 <= len(digest) <= 64:
        raise ValueError("password hash has a bad salt or digest length")
    return ScryptHash(ln, r, p, salt, digest)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 2**ln
    # hashlib's default maxmem (OpenSSL's 32 MiB) would refuse ln=15 at r=8; give it
    # what the parameters need, which parse_hash has already bounded.
    maxmem = _scrypt_memory(n, r, p) + 1024**2
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def hash_password(
    password: str, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash `password` (UTF-8) with scrypt and a fresh 16-byte salt.

    Tests pass a lower `ln` to stay fast; production callers keep the default.

    Raises:
        ValueError: `ln`, `r` or `p` are outside what `verify_password` accepts (a
            hash we could not verify later must not be written).
    """
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError("scrypt parameters out of range")
    if _scrypt_memory(2**ln, r, p) > _MAX_MEM:
        raise ValueError("scrypt parameters need too much memory")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, ln, r, p, DKLEN)
    b64 = base64.b64encode
    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches `encoded`; a malformed hash is simply False.

    The comparison is constant-time (hmac.compare_digest) so response timing does
    not leak how many leading bytes matched.
    """
    try:
        h = parse_hash(encoded)
    except ValueError:
        return False
    try:
        candidate = _scrypt(password.encode("utf-8"), h.salt, h.ln, h.r, h.p, len(h.digest))
    except (ValueError, MemoryError, UnicodeEncodeError):
        # UnicodeEncodeError: a lone surrogate cannot be anyone's password.
        return False
    return hmac.compare_digest(candidate, h.digest)


def dummy_hash(like: str | None) -> str:
    """A hash with the same cost as `like` (or the default) that matches nothing useful.

    Verifying an unknown user against it costs what a real verification costs.
    """
    ln, r, p, dklen = DEFAULT_LN, DEFAULT_R, DEFAULT_P, DKLEN
    if like is not None:
        try:
            h = parse_hash(like)
            ln, r, p, dklen = h.ln, h.r, h.p, len(h.digest)
        except ValueError:
            pass
    salt = base64.b64encode(bytes(SALT_BYTES)).decode()
    digest = base64.b64encode(bytes(dklen)).decode()
    return f"$scrypt$ln={ln},r={r},p={p}${salt}${digest}"
