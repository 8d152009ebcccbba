"""A zone-driven DNS server on loopback, real UDP and TCP: the lab DNS of tests and `volley demo`.

    server = await start_dns_server({
        "example.test": {"MX": [(10, "mx1.example.test")], "TTL": 300},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": "SERVFAIL",             # whole name: "SERVFAIL", "REFUSED", "DROP"
        "half.test": {"A": ["127.0.0.3"], "AAAA": "SERVFAIL"},  # per type, too
        "slow.test": {"delay": 2, "MX": [(10, "mx1.example.test")]},
        "cname.test": {"CNAME": "example.test"},
        "big.test": {"TC": True, "MX": [...]},   # UDP answers truncated: TCP retry
        "s1._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=..."]},  # >255 bytes: split
    }, soa_minimum=120)
    resolver = Resolver([server.address], timeout=1)
    ...
    assert server.count("example.test", "MX") == 1
    await server.close()

Behaves like an authoritative server for `origin` (default "test."): NXDOMAIN for a name
that does not exist, NODATA (NOERROR, empty answer) for a name that exists without the
type, including empty non-terminals; both carry the zone SOA in the authority section
(RFC 2308 §3), whose TTL and MINIMUM a test can set. CNAMEs are chased inside the zone
and the final rcode is the chain's last name's (RFC 6604). Names outside the origin get
REFUSED. "DROP" never answers (a dead server: the client times out). "delay" (seconds)
holds the answer back; pending answers are cancelled by close().

UDP and TCP listen on the same port of `host` (127.0.0.1 by default). It is a lab
tool: it refuses to bind anything but 127.0.0.0/8 or ::1 (ValueError). `queries` counts every query received
per (name, type), over either transport, so a truncated UDP answer retried over TCP
counts twice. From a synchronous test use `with DnsServerThread(zone) as server:`.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

ZoneData = dict[str, Any]
MAX_CHAIN = 8


def _abs(name: str) -> dns.name.Name:
    return dns.name.root if name in ("", ".") else dns.name.from_text(name.rstrip(".") + ".")


def check_loopback(host: str) -> str:
    """`host` if it is a loopback address (127.0.0.0/8 or ::1); ValueError otherwise."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"the lab DNS binds loopback addresses only, not {host!r}") from None
    if not ip.is_loopback:  # 127.0.0.0/8 and ::1 exactly
        raise ValueError(f"the lab DNS binds 127.0.0.0/8 or ::1 only, not {host}")
    return str(ip)


def _rdata_texts(rdtype: str, value: list[Any]) -> list[str]:
    if rdtype == "MX":
        return [f"{pref} {_abs(host).to_text()}" for pref, host in value]
    if rdtype in ("CNAME", "NS", "PTR"):
        return [_abs(v).to_text() for v in value]
    if rdtype == "TXT":
        return [_txt_text(str(v)) for v in value]
    return [str(v) for v in value]


def _txt_text(text: str) -> str:
    """One TXT record in zone-file form: a character-string holds at most 255 bytes
    (RFC 1035 §3.3), so a longer text (a DKIM RSA key, RFC 6376 §3.6.2.2) is split in
    quoted pieces that the reader concatenates."""
    data = text.encode()
    pieces = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join('"' + "".join(f"\\{b:03d}" if b in (34, 92) or not 32 <= b < 127 else chr(b)
                                  for b in piece) + '"' for piece in pieces)


def _names_of(zone: ZoneData) -> frozenset[str]:
    """Every name of the zone and each of its ancestors ("" is the root)."""
    names = {""} if zone else set()
    for key in zone:
        labels = key.split(".")
        names.update(".".join(labels[i:]) for i in range(len(labels)))
    return frozenset(names)


class DnsServer:
    """The zone, the counters and the query logic; sockets are added by start()."""

    def __init__(self, zone: ZoneData, origin: str = "test.", soa_minimum: int = 300, soa_ttl: int = 3600,
                 default_ttl: int = 300, host: str = "127.0.0.1") -> None:
        self.host = check_loopback(host)
        # Replaced whole on set(), never changed in place: a query takes both under the
        # lock and reads them without it. `_names` holds every name and its ancestors,
        # so telling an empty non-terminal from NXDOMAIN is one set lookup, not a walk
        # of the zone (that walk cost 90 ms per query in a 10k-domain zone).
        self._zone: ZoneData = {self._key(k): v for k, v in zone.items()}
        self._names: frozenset[str] = _names_of(self._zone)
        self.origin = _abs(origin)
        self.soa_minimum = soa_minimum
        self.soa_ttl = soa_ttl
        self.default_ttl = default_ttl
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.port = 0
        self._lock = threading.Lock()  # zone and counters may be touched from a test thread
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @staticmethod
    def _key(name: str) -> str:
        return name.rstrip(".").lower()

    @property
    def address(self) -> str:
        """"127.0.0.1:port" (or "[::1]:port"), as `dns.nameservers` takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def set(self, name: str, data: ZoneData | str | None) -> None:
        """Replace (or with None remove) the data of one name, live."""
        with self._lock:
            zone = dict(self._zone)
            if data is None:
                zone.pop(self._key(name), None)
            else:
                zone[self._key(name)] = data
            self._zone, self._names = zone, _names_of(zone)

    def count(self, name: str, rdtype: str = "MX") -> int:
        """Queries received for (name, type)."""
        with self._lock:
            return self.queries[(self._key(name), rdtype.upper())]

    def total(self) -> int:
        with self._lock:
            return sum(self.queries.values())

    # --- answering ---------------------------------------------------------------------

    def _soa(self) -> dns.rrset.RRset:
        o = self.origin.to_text()
        ns = "ns." + (o if o != "." else "")
        mbox = "hostmaster." + (o if o != "." else "")
        text = f"{ns} {mbox} 1 3600 600 86400 {self.soa_minimum}"
        return dns.rrset.from_text_list(self.origin, self.soa_ttl, "IN", "SOA", [text])


    def build(self, query: dns.message.Message) -> tuple[dns.message.Message | None, float, bool]:
        """(response or None to drop, delay in seconds, truncate over UDP)."""
        question = query.question[0]
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries[(self._key(question.name.to_text()), rdtype)] += 1
            zone, names = self._zone, self._names
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        delay, truncate = 0.0, False
        name = question.name
        for _ in range(MAX_CHAIN):
            if not name.is_subdomain(self.origin):
                if name == question.name:
                    response.set_rcode(dns.rcode.REFUSED)
                return response, delay, truncate  # a chain leaving the zone: stop there
            data = zone.get(self._key(name.to_text()))
            if isinstance(data, str):
                if data == "DROP":
                    return None, delay, truncate
                response.set_rcode(dns.rcode.from_text(data))
                return response, delay, truncate
            if data is None:
                # A name exists if it has data or is an empty non-terminal (RFC 8020).
                if self._key(name.to_text()) not in names:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa())
                return response, delay, truncate
            delay = max(delay, float(data.get("delay", 0)))
            truncate = truncate or bool(data.get("TC", False))
            ttl = int(data.get("TTL", self.default_ttl))
            if "CNAME" in data and rdtype != "CNAME":
                target = _abs(data["CNAME"])
                response.answer.append(dns.rrset.from_text_list(name, ttl, "IN", "CNAME", [target.to_text()]))
                name = target
                continue
            value = data.get(rdtype)
            if isinstance(value, str):
                if value == "DROP":
                    return None, delay, truncate
                response.set_rcode(dns.rcode.from_text(value))
                return response, delay, truncate
            if value:
                response.answer.append(dns.rrset.from_text_list(name, ttl, "IN", rdtype, _rdata_texts(rdtype, value)))
            else:
                response.authority.append(self._soa())  # NODATA (RFC 2308 §2.2)
            return response, delay, truncate
        response.set_rcode(dns.rcode.SERVFAIL)  # CNAME loop
        return response, delay, truncate

    async def answer(self, wire: bytes, udp: bool) -> bytes | None:
        """The wire answer to one wire query, after its delay; None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        response, delay, truncate = self.build(query)
        if delay:
            await asyncio.sleep(delay)  # the simulated slow server, not synchronisation
        if response is None:
            return None
        if udp:
            limit = max(512, query.payload) if query.edns >= 0 else 512
            if truncate:
                response = dns.message.make_response(query)
                response.flags |= dns.flags.AA | dns.flags.TC
            return response.to_wire(max_size=limit, prefer_truncation=True)
        return response.to_wire()

    # --- transports --------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_reply(self, wire: bytes, addr: Any) -> None:
        out = await self.answer(wire, udp=True)
        if out is not None and self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(out, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # RFC 1035 §4.2.2 / RFC 7766: each message is preceded by a two-byte length.
        self._writers.add(writer)
        try:
            while True:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                out = await self.answer(await reader.readexactly(size), udp=False)
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        """Bind UDP on an ephemeral port, then TCP on the same port (retrying on clash)."""
        loop = asyncio.get_running_loop()
        server = self

        class _Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                server._spawn(server._udp_reply(data, addr))

        for _ in range(20):
            transport, _proto = await loop.create_datagram_endpoint(_Udp, local_addr=(self.host, 0))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self.host, port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise OSError("could not bind UDP and TCP on one port")

    async def close(self) -> None:
        """Stop listening, cancel pending (delayed) answers, drop TCP clients."""
        if self._udp is not None:
            self._udp.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._tcp.wait_closed()


async def start_dns_server(zone: ZoneData, **kw: Any) -> DnsServer:
    """A running server on the current loop; `await server.close()` when done."""
    server = DnsServer(zone, **kw)
    await server.start()
    return server


class DnsServerThread:
    """`with DnsServerThread(zone) as server:` runs the server on its own loop and thread."""

    def __init__(self, zone: ZoneData, **kw: Any) -> None:
        self._zone, self._kw = zone, kw
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dns-server", daemon=True)
        self.server: DnsServer | None = None

    def __enter__(self) -> DnsServer:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_dns_server(self._zone, **self._kw), self._loop)
        self.server = fut.result(timeout=10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextmanager
def dns_server_thread(zone: ZoneData, **kw: Any) -> Iterator[DnsServer]:
    """Function form of DnsServerThread."""
    with DnsServerThread(zone, **kw) as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.lab.dns --zone FILE`: serve a JSON zone as its own process.

    The zone file maps names to data as `start_dns_server` takes it (MX values as
    [[preference, "host"], ...]). Prints one JSON line on stdout,
    `{"event": "ready", "address": "127.0.0.1:PORT", "port": PORT}`, serves UDP and TCP
    on that loopback port (of `--host`) until SIGTERM or SIGINT (or `--lifetime` seconds), then prints
    `{"event": "stopped", "queries": N}`.
    """
    import argparse
    import json
    import signal

    p = argparse.ArgumentParser(prog="python -m engine.lab.dns",
                                description="A loopback authoritative DNS server for one JSON zone.")
    p.add_argument("--zone", required=True, help="JSON file: {name: data}")
    p.add_argument("--origin", default="test.",
                   help='zone origin; names outside it are REFUSED ("." serves every name)')
    p.add_argument("--ttl", type=int, default=300, help="TTL of records without their own")
    p.add_argument("--soa-minimum", type=int, default=300)
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (127.0.0.0/8 or ::1)")
    a = p.parse_args(argv)
    try:
        check_loopback(a.host)
    except ValueError as err:
        p.error(str(err))
    with open(a.zone, encoding="utf-8") as f:
        zone = json.load(f)
    if not isinstance(zone, dict):
        p.error("the zone file must hold a JSON object")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(a.lifetime, stop.set)
        server = await start_dns_server(zone, origin=a.origin, default_ttl=a.ttl,
                                        soa_minimum=a.soa_minimum, host=a.host)
        print(json.dumps({"event": "ready", "address": server.address, "port": server.port,
                          "names": len(zone)}), flush=True)
        await stop.wait()
        await server.close()
        print(json.dumps({"event": "stopped", "queries": server.total()}), flush=True)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
