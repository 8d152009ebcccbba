"""RFC 5321 / 6531 / 3461 grammar, compiled once.

Every rule carries its ABNF. Patterns run on `str` (the command line decoded as
UTF-8); where SMTPUTF8 (RFC 6531 §3.3) widens a rule, the UTF-8 form is a separate
pattern so a plain-ASCII session can never match a non-ASCII address.
"""

from __future__ import annotations

import ipaddress
import re

# RFC 5322 §3.2.3:  atext = ALPHA / DIGIT / "!" / "#" / "$" / "%" / "&" / "'" / "*" /
#                           "+" / "-" / "/" / "=" / "?" / "^" / "_" / "`" / "{" / "|" / "}" / "~"
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
# RFC 6531 §3.3: atext =/ UTF8-non-ascii ; qtextSMTP =/ UTF8-non-ascii
_UTF8 = "\u0080-\U0010ffff"

# RFC 5321 §4.1.2:  Dot-string = Atom *("."  Atom)
_DOT_STRING = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_DOT_STRING_UTF8 = rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*"
# Quoted-string = DQUOTE *QcontentSMTP DQUOTE ; QcontentSMTP = qtextSMTP / quoted-pairSMTP
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = %d92 %d32-126
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_UTF8 = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'

# Domain = sub-domain *("." sub-domain) ; sub-domain = Let-dig [Ldh-str]
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# RFC 6531 §3.3: sub-domain =/ U-label
_LABEL_UTF8 = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_DOMAIN_UTF8 = rf"{_LABEL_UTF8}(?:\.{_LABEL_UTF8})*"
# address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
#                         General-address-literal ) "]"   (validated further below)
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"

# A-d-l = At-domain *( "," At-domain ) ; At-domain = "@" Domain
# RFC 5321 §4.1.2 / §3.3: source routes MUST be accepted and SHOULD be ignored (P7).
_ADL = rf"(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)"

# Path = "<" [ A-d-l ":" ] Mailbox ">" ; Mailbox = Local-part "@" ( Domain / address-literal )
PATH = re.compile(
    rf"<{_ADL}?(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_ADDRESS_LITERAL})>"
)
PATH_UTF8 = re.compile(
    rf"<{_ADL}?(?P<local>{_DOT_STRING_UTF8}|{_QUOTED_UTF8})@"
    rf"(?P<domain>{_DOMAIN_UTF8}|{_ADDRESS_LITERAL})>"
)
# Reverse-path = Path / "<>"
NULL_PATH = "<>"

# esmtp-param = esmtp-keyword ["=" esmtp-value]
# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
# esmtp-value = 1*(%d33-60 / %d62-126)   ; RFC 6531 §3.3 adds UTF8-non-ascii
ESMTP_PARAM = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")

# RFC 3461 §4: xtext = *( xchar / hexchar ) ; xchar = %d33-42 / %d44-60 / %d62-126 ;
#              hexchar = "+" HEXDIG HEXDIG  (upper-case A-F only)
XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")

# RFC 3461 §4.1: notify-esmtp-value = "NEVER" / 1#notify-list-element
NOTIFY_ELEMENTS = frozenset({"SUCCESS", "FAILURE", "DELAY"})

# RFC 5321 §4.5.3.1: Local-part 64 octets, Domain 255, Path 256 (incl. brackets).
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext; ValueError if it is not xtext."""
    if XTEXT.fullmatch(value) is None:
        raise ValueError("not xtext")
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    """Encode as RFC 3461 xtext; ValueError for a character above U+00FF.

    "+XX" carries one octet, so "€" would become "+20AC" and decode as " AC".
    """
    if any(ord(c) > 0xFF for c in value):
        raise ValueError("xtext cannot carry characters above U+00FF")
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value
    )


def valid_address_literal(text: str) -> bool:
    """RFC 5321 §4.1.3: IPv4, "IPv6:" + address, or Standardized-tag ":" dcontent."""
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        if "%" in inner:  # ipaddress accepts a zone id ("fe80::1%eth0"); IPv6-addr has none
            return False
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    if ":" in inner:
        tag, _, content = inner.partition(":")  # Standardized-tag ":" 1*dcontent
        return bool(content) and re.fullmatch(r"[A-Za-z0-9-]*[A-Za-z0-9]", tag) is not None
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True
