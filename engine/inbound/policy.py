"""Pure receiving policy: session facts + config → a Reply, or None to accept.

No I/O here, so relay and limit rules are tested as plain functions (P7).
"""

from __future__ import annotations

import ipaddress

from engine.config import Config
from engine.mail import verp
from engine.smtp.commands import Mail, Rcpt
from engine.smtp.replies import (
    R452_TOO_MANY_RCPTS,
    R530_AUTH_REQUIRED,
    R552_MESSAGE_TOO_BIG,
    R554_RELAY_DENIED,
    Reply,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 5321 §4.5.1 wants "postmaster" (no domain) accepted, but with no mailbox
# configured for it the only honest answer is that there is none (Postfix answers
# 550 5.1.1 for an unknown local user too). The text names the key to set.
R550_NO_POSTMASTER = Reply(
    550, "5.1.1", "<postmaster> has no mailbox here (server.postmaster is not set)"
)


_RELAY_CACHE_MAX = 4096  # client addresses remembered per Policy (per worker and config)


class Policy:
    """Built once per config (and again on reload); methods are pure (in_relay_networks
    remembers its answers: the networks never change within one Policy)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in cfg.relay.networks
        )
        self.local_domains = frozenset(d.lower().rstrip(".") for d in cfg.relay.local_domains)
        self.max_message_size = int(cfg.limits.max_message_size)
        self.max_recipients = cfg.limits.max_recipients
        # Where a bare RCPT TO:<postmaster> is queued ("" = refused): queue_record maps it.
        self.postmaster = cfg.server.postmaster
        # Complaints and late bounces come here; read by Volley, never relayed.
        self.feedback_address = cfg.feedback.address
        # Client address -> in relay.networks. Bulk senders open a connection per
        # message or a pool of them from a few addresses; parsing the address and
        # testing each network cost 2.3 us per connection, a hit 0.1 us (issue 15).
        self._relay_cache: dict[str, bool] = {}

    def is_feedback(self, address: str) -> bool:
        """The feedback address or its VERP form local+TOKEN@domain, in any case."""
        return verp.is_feedback_address(self.feedback_address, address)

    def in_relay_networks(self, ip: str) -> bool:
        cache = self._relay_cache
        hit = cache.get(ip)
        if hit is None:
            if len(cache) >= _RELAY_CACHE_MAX:  # bounded (P8): start over, never grow
                cache.clear()
            hit = cache[ip] = self._match_relay_networks(ip)
        return hit

    def _match_relay_networks(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def check_mail(self, needs_auth: bool, mail: Mail) -> Reply | None:
        """`needs_auth`: the listener requires AUTH and the client has not done it."""
        if needs_auth:
            return R530_AUTH_REQUIRED
        # RFC 1870 §6: refuse at MAIL when the declared size is already too big.
        if mail.size is not None and mail.size > self.max_message_size:
            return R552_MESSAGE_TOO_BIG
        return None

    def check_rcpt(self, trusted: bool, rcpt: Rcpt, accepted: int) -> Reply | None:
        """`trusted`: the client is in relay.networks or authenticated."""
        if accepted >= self.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 so the client sends the rest in a new transaction.
            return R452_TOO_MANY_RCPTS
        if rcpt.address == "postmaster":
            # The parser's spelling of RFC 5321's bare <Postmaster>, any case: ours to
            # take from anyone when it has somewhere to go, never queued domain-less.
            # postmaster@DOMAIN has a domain and is an ordinary recipient: §4.5.1 asks
            # for it at the domains we provide mail service for, which for a relay are
            # relay.local_domains (open to anyone, relayed to that domain's MX, where
            # its postmaster mailbox lives); our own hostname is a mail domain only if
            # listed there, as Volley delivers nothing locally.
            return None if self.postmaster else R550_NO_POSTMASTER
        if trusted:
            return None
        if self.feedback_address and self.is_feedback(rcpt.address):
            # Reports come from receivers anywhere on the internet (RFC 5965 §4,
            # RFC 3464 §2): the feedback address takes them from any client.
            return None
        # P7: the destination is the text after the last "@" and nothing else: no %,
        # ! or source-route interpretation can change it.
        domain = rcpt.address.rpartition("@")[2].lower().rstrip(".")
        if domain in self.local_domains:
            return None
        return R554_RELAY_DENIED
