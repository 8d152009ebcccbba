"""DKIM signing (RFC 6376; Ed25519 per RFC 8463), with the `cryptography` library.

`DkimSigner.from_config(cfg.dkim)` loads every `[[dkim]]` key once (a key that does
not load is a DkimKeyError naming the entry and the file, which the supervisor's
startup check turns into a ConfigError). `sign(message)` returns the DKIM-Signature
fields to prepend: one per key whose domain is the From: domain or a parent of it
(the relaxed alignment DMARC checks, RFC 7489 §3.1.1), so an RSA and an Ed25519 key
of one domain give two signatures (RFC 8463 §5).

Per call, the body is canonicalized and hashed once per body canonicalization in use,
whatever the number of keys. No l= (a length limit lets anyone append content,
RFC 6376 §8.2). t= is the signing time: the scheduler signs each delivery attempt.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa

from engine.config import DkimConfig
from engine.mail.dkim_canon import canon_body, canon_header
from engine.mail.headers import Field, from_domain, split_message

MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT accept shorter keys
FOLD_AT = 78  # RFC 5322 §2.1.1 SHOULD line length
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


class DkimKeyError(ValueError):
    """A [[dkim]] key that does not load; the message names the entry and the file."""


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One loaded `[[dkim]]` entry."""

    domain: str  # lower-cased: d=
    selector: str
    algorithm: str
    header_canon: str
    body_canon: str
    headers: tuple[str, ...]  # the configured names, deduplicated (any case)
    over_sign: bool
    private: PrivateKey

    def aligns(self, author_domain: str) -> bool:
        return author_domain == self.domain or author_domain.endswith("." + self.domain)

    def sign_data(self, data: bytes) -> bytes:
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(data, _PKCS1, _SHA256)
        # RFC 8463 §3: Ed25519 (PureEdDSA) signs the SHA-256 hash of the data.
        return self.private.sign(hashlib.sha256(data).digest())

    def txt_record(self) -> str:
        """The DNS TXT text for `selector._domainkey.domain` (RFC 6376 §3.6.1)."""
        public = self.private.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            # RFC 8463 §4.2: p= is the bare 32-byte public key.
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def load_key(index: int, entry: DkimConfig) -> DkimKey:
    """Load one entry's key; DkimKeyError("dkim[i].key_file: PATH: reason")."""
    def fail(reason: str) -> DkimKeyError:
        return DkimKeyError(f"dkim[{index}].key_file: {entry.key_file}: {reason}")

    try:
        with open(entry.key_file, "rb") as f:
            pem = f.read()
    except OSError as err:
        raise fail(err.strerror or str(err)) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        # A worker has no terminal to ask a passphrase on.
        raise fail("the key is encrypted; Volley needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise fail("not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        kind = "an RSA key"
        if key.key_size < MIN_RSA_BITS:
            raise fail(f"the RSA key has {key.key_size} bits; RFC 8301 §3.2 requires at least "
                       f"{MIN_RSA_BITS} (2048 recommended)")
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        kind = "an Ed25519 key"
    else:
        raise fail(f"is {_kind(key)}; DKIM signs with RSA (rsa-sha256) or Ed25519 "
                   "(ed25519-sha256, RFC 8463)")
    wanted = "an RSA key" if entry.algorithm == "rsa-sha256" else "an Ed25519 key"
    if kind != wanted:
        raise fail(f"is {kind} but algorithm is {entry.algorithm}")
    seen: dict[str, str] = {}
    for name in entry.headers:
        seen.setdefault(name.lower(), name)
    return DkimKey(entry.domain.lower(), entry.selector, entry.algorithm, entry.header_canon,
                   entry.body_canon, tuple(seen.values()), entry.over_sign, key)


def _kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "an EC (ECDSA) key"
    if isinstance(key, dsa.DSAPrivateKey):
        return "a DSA key"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "an Ed448 key"
    return f"a {type(key).__name__} key"


class DkimSigner:
    """Every configured key, loaded once; signs messages whose From: domain aligns."""

    def __init__(self, keys: Sequence[DkimKey] = ()) -> None:
        self.keys: list[DkimKey] = list(keys)

    @classmethod
    def from_config(cls, entries: Sequence[DkimConfig]) -> DkimSigner:
        """Load every key. Raises DkimKeyError naming `dkim[i].key_file` and the path."""
        return cls([load_key(i, entry) for i, entry in enumerate(entries)])

    def __bool__(self) -> bool:
        return bool(self.keys)

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The DKIM-Signature field(s) to prepend to `message` (CRLF-terminated each),
        one per key aligned with the From: domain; b"" when none aligns."""
        if not self.keys:
            return b""
        fields, body_at = split_message(message)
        author = from_domain(fields)
        if author is None:
            return b""
        keys = [k for k in self.keys if k.aligns(author)]
        if not keys:
            return b""
        stamp = int(time.time() if now is None else now)
        body_hashes: dict[str, str] = {}
        out = []
        for key in keys:
            bh = body_hashes.get(key.body_canon)
            if bh is None:
                digest = hashlib.sha256(canon_body(key.body_canon, message[body_at:])).digest()
                bh = body_hashes[key.body_canon] = base64.b64encode(digest).decode()
            out.append(signature_field(key, fields, bh, stamp))
        return b"".join(out)


def header_list(key: DkimKey, fields: Sequence[Field]) -> list[str]:
    """h= (RFC 6376 §5.4.2): each configured name once per instance in the message, and
    with over_sign once more, so no instance can be added (§8.15) — including a header
    the message lacks, listed once (it then signs as absent)."""
    counts: dict[str, int] = {}
    for f in fields:
        counts[f.name] = counts.get(f.name, 0) + 1
    extra = 1 if key.over_sign else 0
    names = []
    for name in key.headers:
        names.extend([name] * (counts.get(name.lower(), 0) + extra))
    return names


def signed_headers(key: DkimKey, fields: Sequence[Field], names: list[str]) -> bytes:
    """The canonical header fields named in h=, each name taking the instances from the
    bottom up (§5.4.2); a name with no instance left contributes nothing."""
    by_name: dict[str, list[Field]] = {}
    for f in fields:
        by_name.setdefault(f.name, []).append(f)
    parts = []
    for name in names:
        instances = by_name.get(name.lower())
        if instances:
            f = instances.pop()
            parts.append(canon_header(key.header_canon, f.name, f.raw))
    return b"".join(parts)


def signature_field(key: DkimKey, fields: Sequence[Field], bh: str, stamp: int) -> bytes:
    """One DKIM-Signature field, folded, CRLF-terminated."""
    names = header_list(key, fields)
    h = [n + ":" for n in names]
    h[-1] = h[-1][:-1] + ";"  # From is always there: names is never empty
    h[0] = "h=" + h[0]
    tags = [
        "v=1;", f"a={key.algorithm};", f"c={key.header_canon}/{key.body_canon};",
        f"d={key.domain};", f"s={key.selector};", f"t={stamp};", *h, f"bh={bh};",
    ]
    unsigned = _fold("DKIM-Signature:", tags) + "\r\n b="
    # The b= value is empty in the hashed form, and that form has no final CRLF (§3.7).
    hashed = canon_header(key.header_canon, "dkim-signature", unsigned.encode("ascii"))[:-2]
    data = signed_headers(key, fields, names) + hashed
    b = base64.b64encode(key.sign_data(data)).decode()
    # FWS inside b= is ignored by verifiers (§3.5 base64string).
    chunks = [b[:FOLD_AT - 4]] + [b[i:i + FOLD_AT - 2] for i in range(FOLD_AT - 4, len(b), FOLD_AT - 2)]
    return (unsigned + "\r\n ".join(c for c in chunks if c) + "\r\n").encode("ascii")


def _fold(start: str, tokens: list[str]) -> str:
    """`start` and the tokens, one SP apart, broken with CRLF SP before a token that
    would pass FOLD_AT columns. A token after one ending in ":" (inside h=) follows it
    directly: FWS around h='s colons is allowed (§3.5), so a fold may fall there."""
    lines = [start]
    prev = start
    for token in tokens:
        joint = "" if prev.endswith(":") and prev is not start else " "
        if len(lines[-1]) + len(joint) + len(token) > FOLD_AT:
            lines.append(" " + token)
        else:
            lines[-1] += joint + token
        prev = token
    return "\r\n".join(lines)
