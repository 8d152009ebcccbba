"""The loopback lab DNS server, now `engine.lab.dns` (re-exported here for the tests).

    with DnsServerThread({"example.test": {"MX": [(10, "mx1.example.test")]}}) as server:
        ...  # dns.nameservers = [server.address]

`python -m tests.peers.dns_server --zone FILE` still serves a JSON zone as its own
process (bench/relay.py starts it so); see engine/labdns.py.
"""

from __future__ import annotations

from engine.lab.dns import (
    DnsServer,
    DnsServerThread,
    ZoneData,
    check_loopback,
    dns_server_thread,
    main,
    start_dns_server,
)

__all__ = ["DnsServer", "DnsServerThread", "ZoneData", "check_loopback", "dns_server_thread", "main",
           "start_dns_server"]

if __name__ == "__main__":
    raise SystemExit(main())
