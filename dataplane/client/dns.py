"""The client agent's local DNS resolver (``FERRYMAN_DNS_LISTEN``, UDP and TCP, localhost only).

Names under one of the forwarding profile's private DNS suffixes are resolved by a
connector, through the tunnel: each query is a short ``dns`` flow (OPEN protocol ``dns``,
host = the name) that the edge allows only for private names and the connector answers
from its own DNS server, accepting only queries for the granted name. Every other name goes
to the system resolver (``FERRYMAN_DNS_UPSTREAM``, else the first ``nameserver`` of
/etc/resolv.conf that is not this resolver). A response is taken only when its id and its
question (name, type, class) are the query's; any other datagram is counted
(``dns_answer_mismatch``) and ignored, and the answer is waited for until ``QUERY_TIMEOUT``.
Queries to the system resolver go out under an id of the resolver's own. Record TTLs above
``TTL_MAX`` are lowered to it. Answers are cached for their TTL (negative answers for their
SOA minimum, at most ``NEGATIVE_TTL_MAX``), at most ``FERRYMAN_DNS_CACHE`` of them (least
recently used go first), and served with the remaining TTL.

An answer of the system resolver (a name that is not private) never points into a private
application: A/AAAA records (answer, authority and additional sections) whose address lies in
a private application's segment, or that transparent capture holds for a private name, or that
a private name owns (a CNAME into a private suffix), are withheld, as unbound's
``private-address`` does, unless the name is under a suffix of ``FERRYMAN_DNS_REBIND_ALLOW``;
so are HTTPS/SVCB records whose address hints (``ipv4hint``, ``ipv6hint``) are such addresses,
or that cannot be read. Otherwise a web page
could point its own name at a private address (DNS rebinding) and have the browser reach that
private application through the tunnel, reading its answers as the page's own. What the app
gets is always the answer as parsed and written again, never the server's bytes: a record
hidden from the parser (a record length that says more than its data) cannot reach the app.
With no forwarding profile (an agent on a certificate) no segment is known and nothing is
withheld; a public name answered before the private name it rebinds to is captured is not
known as private yet.

When no edge is reachable, a private name gets SERVFAIL and a log line (fail closed), or
goes to the system resolver (fail open), as the profile says. A query that cannot be
parsed, or not written again (every answer repeats its question), is dropped and counted
(``ferryman_datagrams_dropped_total{reason="dns_malformed"}``): there is no question to answer.
An answer that cannot be parsed and written again (the cache serves its records again) is
logged and the app gets SERVFAIL. With transparent capture on (``transparent.py``) the
addresses of a private name's answer are put in the capture set before the app gets it (or
caches it); when that fails and the profile fails closed, the app gets SERVFAIL.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable

from dnslib import QTYPE, RCODE, RR, DNSBuffer, DNSHeader, DNSQuestion, DNSRecord

from ..basics.hostport import RESOLV_CONF, dns_server
from ..basics.metrics import Stats
from ..transport.udpflow import UdpFlow
from .opener import FlowOpener

log = logging.getLogger("ferryman.dns")

QUERY_TIMEOUT = 5.0  # seconds for one answer, through the tunnel or from the upstream server
NEGATIVE_TTL_MAX = 300
# A record's TTL is served (and cached) as this at most, as unbound's cache-max-ttl: transparent
# capture holds an answer's addresses no longer (plus its margin), and nft refuses set timeouts
# of 10**8 s and more, so an app must not go on using an address past that.
TTL_MAX = 86400
TUNNEL_PAYLOAD = 1232  # EDNS payload size for queries through the tunnel (the DNS flag day's value)
TCP_PIPELINE = 64  # DNS-over-TCP queries of one connection waiting for their answers; reading pauses beyond
# Seconds a DNS-over-TCP connection may go without a complete query while none is being answered
# (RFC 7766 §6.2.3: servers close idle connections; 10 s as unbound's tcp-idle-timeout default).
TCP_IDLE = 10.0
MAX_PENDING = 1024  # queries being resolved at once; more are answered SERVFAIL (counted)
_DNS_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


def rebind_allow(setting: str) -> tuple[str, ...]:
    """The suffixes of FERRYMAN_DNS_REBIND_ALLOW (comma-separated DNS names; ValueError naming a bad one)."""
    out = []
    for item in setting.split(","):
        name = item.strip().lower().strip(".")
        if not item.strip():
            continue
        if not _DNS_NAME.fullmatch(name):
            raise ValueError(f"FERRYMAN_DNS_REBIND_ALLOW: {item.strip()!r} is not a DNS name")
        out.append(name)
    return tuple(out)


_HINTED = (64, 65)  # SVCB, HTTPS (RFC 9460): may carry ipv4hint (key 4) / ipv6hint (key 6) addresses
_HINT_SIZE = {4: 4, 6: 16}


def svc_record(rr: RR) -> tuple[str, list[tuple[int, bytes]]] | None:
    """(target name, parameters) of an SVCB or HTTPS record; None when its data cannot be read
    as RFC 9460 says (such a record is not passed on). A target label longer than 63 bytes is a
    compression pointer (0xC0..) to a lenient parser, which then reads what dnslib took for the
    label's bytes as parameters: hints hidden from this one."""
    rdata = rr.rdata
    if hasattr(rdata, "params"):  # dnslib reads HTTPS; SVCB comes as raw data
        labels = [bytes(label) for label in rdata.target]
        params = [(key, bytes(value)) for key, value in rdata.params]
    else:
        data = bytes(getattr(rdata, "data", b""))
        labels, params, at = [], [], 2
        try:
            while data[at]:  # the target name: uncompressed labels
                labels.append(data[at + 1:at + 1 + data[at]])
                at += 1 + data[at]
        except IndexError:
            return None
        at += 1
        while at < len(data):
            if at + 4 > len(data):
                return None
            key, size = struct.unpack_from("!HH", data, at)
            params.append((key, data[at + 4:at + 4 + size]))
            at += 4 + size
        if at != len(data):
            return None
    if any(len(label) > 63 for label in labels):
        return None
    return ".".join(label.decode("ascii", "replace") for label in labels), params


def hint_addresses(params: list[tuple[int, bytes]]) -> list[str] | None:
    """The ipv4hint and ipv6hint addresses among an SVCB/HTTPS record's parameters; None when one
    is not a whole number of addresses."""
    found = []
    for key, value in params:
        width = _HINT_SIZE.get(key)
        if width is None:
            continue
        if not value or len(value) % width:
            return None
        found += [str(ipaddress.ip_address(value[i:i + width])) for i in range(0, len(value), width)]
    return found


def withhold_private(reply: DNSRecord, private: Callable[[str], bool], private_owner: Callable[[str], bool]) -> list[str]:
    """Remove from ``reply`` (answer, authority and additional sections) the A and AAAA records,
    and the SVCB/HTTPS records with address hints, that point at an address ``private`` says is
    a private application's (an SVCB/HTTPS record that cannot be read too), and those whose owner
    name, or SVCB/HTTPS target, ``private_owner`` says is private; what was removed (addresses,
    or ``TYPE owner``)."""
    withheld: list[str] = []
    for section in ("rr", "auth", "ar"):
        records = getattr(reply, section)
        kept = []
        for rr in records:
            owner = str(rr.rname).rstrip(".")
            if rr.rtype in _HINTED:
                record = svc_record(rr)
                hints = None if record is None else hint_addresses(record[1])
                if record is None or hints is None or private_owner(owner) or private_owner(record[0]) \
                        or any(private(a) for a in hints):
                    withheld.append(f"{QTYPE.get(rr.rtype)} {owner}")
                    continue
            elif rr.rtype in (QTYPE.A, QTYPE.AAAA) and (private(str(ipaddress.ip_address(str(rr.rdata))))
                                                        or private_owner(owner)):
                withheld.append(str(rr.rdata))
                continue
            kept.append(rr)
        if len(kept) != len(records):
            setattr(reply, section, kept)
    return withheld


class Answer:
    """A cached answer: the reply's records and code, and when it stops being valid (monotonic)."""

    __slots__ = ("reply", "expires", "stored")

    def __init__(self, reply: DNSRecord, ttl: int, now: float) -> None:
        self.reply = reply
        self.stored = now
        self.expires = now + ttl


class DnsCache:
    """Answers by (name, type, class), least recently used evicted beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: collections.OrderedDict[tuple[str, int, int], Answer] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: tuple[str, int, int], now: float) -> Answer | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple[str, int, int], reply: DNSRecord, now: float) -> None:
        ttl = cache_ttl(reply)
        if ttl <= 0 or self.limit <= 0 or reply.header.tc:  # a truncated answer is not the whole answer:
            return  # served again from here it would lose its TC bit, and the app would not ask over TCP

        self._entries[key] = Answer(reply, ttl, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)


def cache_ttl(reply: DNSRecord) -> int:
    """How long ``reply`` may be served from the cache: its smallest answer TTL; for NXDOMAIN or an
    empty answer the SOA minimum (RFC 2308), capped; 0 for anything else (not cached)."""
    rcode = reply.header.rcode
    if rcode == RCODE.NOERROR and reply.rr:
        return min(rr.ttl for rr in reply.rr)
    if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        soa = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA]
        if soa:
            return min(soa[0].ttl, soa[0].rdata.times[-1], NEGATIVE_TTL_MAX)
    return 0


def key_of(query: DNSRecord) -> tuple[str, int, int]:
    return str(query.q.qname).lower(), int(query.q.qtype), int(query.q.qclass)


def from_cache(query: DNSRecord, entry: Answer, now: float) -> bytes:
    """The cached answer for ``query``: its id and question, records with the TTL that is left."""
    left = max(0, int(entry.expires - now))
    reply = query.reply()
    reply.header.rcode = entry.reply.header.rcode
    for section, records in ((reply.rr, entry.reply.rr), (reply.auth, entry.reply.auth),
                             (reply.ar, entry.reply.ar)):
        for rr in records:
            copied = type(rr)(rr.rname, rr.rtype, rr.rclass, min(rr.ttl, left), rr.rdata)
            section.append(copied)
    return reply.pack()


def answers(data: bytes, ident: int, question: DNSQuestion) -> bool:
    """``data`` is a response with id ``ident`` to ``question`` alone (same name, label by label
    and case aside, type and class). Only its header and question are read: an answer whose
    records are unusable is still the answer (SERVFAIL for the app), not a datagram to wait past."""
    try:
        buffer = DNSBuffer(data)
        header = DNSHeader.parse(buffer)
        if not header.qr or header.id != ident or header.q != 1:
            return False
        asked = DNSQuestion.parse(buffer)
    except Exception:  # dnslib raises DNSError, and UnicodeDecodeError and others on crafted input
        return False
    return asked.qname == question.qname and (asked.qtype, asked.qclass) == (question.qtype, question.qclass)


def clamp_ttls(reply: DNSRecord) -> bool:
    """Lower the TTLs above ``TTL_MAX`` to it (not OPT's: that field holds EDNS flags); whether any was."""
    clamped = False
    for rr in (*reply.rr, *reply.auth, *reply.ar):
        if rr.ttl > TTL_MAX and rr.rtype != QTYPE.OPT:
            rr.ttl = TTL_MAX
            clamped = True
    return clamped


def tunnel_query(query: DNSRecord) -> bytes:
    """``query`` as it goes through the tunnel: an EDNS UDP payload size above ``TUNNEL_PAYLOAD``
    is lowered to it, so the DNS server truncates (TC) what a tunnel datagram could not carry
    (a QUIC datagram holds 1,304 bytes) instead of the answer being lost."""
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT and rr.rclass > TUNNEL_PAYLOAD:
            rr.rclass = TUNNEL_PAYLOAD
    return query.pack()


def servfail(query: DNSRecord) -> bytes:
    reply = query.reply()
    reply.header.rcode = RCODE.SERVFAIL
    return reply.pack()


class Resolver:
    """Answers one query at a time (``resolve``) for the UDP and TCP front ends."""

    def __init__(self, client: FlowOpener, listen: tuple[str, int]) -> None:
        self.client = client
        self.listen = listen
        self.cache = DnsCache(client.settings.dns_cache)
        self.pending = 0
        self._upstream: tuple[str, int] | None = None
        self._upstream_error = ""
        # transparent capture (``transparent.py``): awaited with each fresh answer, before the app gets
        # it; False: its addresses are not captured and the profile fails closed (the app gets SERVFAIL)
        self.on_answer: Callable[[str, DNSRecord], Awaitable[bool]] | None = None
        # transparent capture: the private name an address was last answered for (``Transparent.name_for``):
        # a public name answered with such an address would be opened as that private name
        self.captured_name: Callable[[str], str | None] | None = None

    # ------------------------------------------------------------------ upstream
    def upstream(self) -> tuple[str, int] | None:
        """The system resolver (FERRYMAN_DNS_UPSTREAM or resolv.conf), never this resolver itself."""
        if self._upstream is None and not self._upstream_error:
            setting = self.client.settings.dns_upstream
            try:
                server = dns_server(setting) if setting else _resolv_conf_server(self.listen)
            except ValueError as exc:
                self._upstream_error = str(exc)
                log.error("names that are not private cannot be resolved: %s", exc)
                return None
            self._upstream = server
        return self._upstream

    # ------------------------------------------------------------------ resolving
    async def answer(self, data: bytes) -> bytes | None:
        """``resolve``, and SERVFAIL (logged) if resolving failed unexpectedly: an app waiting for
        an answer gets one rather than a timeout."""
        try:
            return await self.resolve(data)
        except Exception:
            log.exception("DNS query failed")
            try:
                return servfail(DNSRecord.parse(data))
            except Exception:  # not even a question to answer
                return None

    async def resolve(self, data: bytes) -> bytes | None:
        """The answer to the query ``data`` (None: not a DNS query, dropped and counted)."""
        stats = self.client.stats
        try:
            query = DNSRecord.parse(data)
            query.pack()  # every answer repeats the question: one dnslib cannot write again is malformed
        except Exception:  # dnslib raises DNSError, and UnicodeDecodeError and others on crafted input
            stats.count(stats.datagrams_dropped, "dns_malformed")
            return None
        if query.header.qr or len(query.questions) != 1:
            stats.count(stats.datagrams_dropped, "dns_malformed")
            return None
        now = time.monotonic()
        key = key_of(query)
        cached = self.cache.get(key, now)
        if cached is not None:
            return from_cache(query, cached, now)
        if self.pending >= MAX_PENDING:
            stats.count(stats.datagrams_dropped, "dns_busy")
            return servfail(query)
        self.pending += 1
        name = key[0].rstrip(".")
        try:
            answer, route = await self._answer(query, name)
        finally:
            self.pending -= 1
        if answer is None:
            return servfail(query)
        try:
            reply = DNSRecord.parse(answer)
            reply.pack()  # the cache serves its records again: an answer dnslib cannot write again is unusable
        except Exception:
            log.warning("unusable DNS answer", extra={"qname": key[0]})
            return servfail(query)
        clamp_ttls(reply)
        if route == "public":
            self._rebinding(name, reply)
        # Served as parsed and checked: the server's own bytes may hold records the parser skipped.
        answer = reply.pack()
        # captured before it is cached: an answer from the cache is served without capturing again
        if self.on_answer is not None and not await self.on_answer(key[0].rstrip("."), reply):
            return servfail(query)
        if route != "open":  # not an answer from the system resolver for a private name (fail open): once
            self.cache.put(key, reply, time.monotonic())  # the tunnel is back, the private name is asked again
        return answer

    def _rebinding(self, name: str, reply: DNSRecord) -> None:
        """Withhold the records of a public name's answer that point into private applications
        (module doc), counted and logged."""
        profile = self.client.profile
        if profile is None or any(name == s or name.endswith("." + s) for s in self.client.dns_rebind_allow):
            return
        captured = self.captured_name

        def private(address: str) -> bool:
            return profile.private_address(address) or (captured is not None and captured(address) is not None)

        withheld = withhold_private(reply, private, profile.private_name)
        if not withheld:
            return
        stats = self.client.stats
        stats.count(stats.dial_refused, "dns_rebinding", len(withheld))
        stats.log_limit.log(log, logging.WARNING, ("dns_rebinding", name),
                            "public name pointing at private addresses: those records withheld (DNS rebinding)",
                            {"qname": name, "addresses": ",".join(withheld[:8])})

    async def _answer(self, query: DNSRecord, name: str) -> tuple[bytes | None, str]:
        """(the answer or None, the name's route: ``tunnel``, ``closed``, ``open`` (a private name
        the system resolver answered: not cached) or ``public``)."""
        route = self.client.route_name(name)
        if route == "tunnel":
            return await self._through_tunnel(query, name), route
        if route == "closed":
            log.warning("private name not resolved: no tunnel to an edge is up (fail closed)", extra={"qname": name})
            return None, route
        upstream = self.upstream()
        if upstream is None:
            return None, route
        return await _ask(upstream, query, self.client.stats), route

    async def _through_tunnel(self, query: DNSRecord, name: str) -> bytes | None:
        """One ``dns`` flow: OPEN for ``name``, the query as a datagram, the answer back, RST."""
        client = self.client
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        stats = client.stats

        def answered(data: bytes | memoryview) -> None:
            if done.done():
                return
            if answers(bytes(data), query.header.id, query.q):
                done.set_result(bytes(data))
            else:
                stats.count(stats.datagrams_dropped, "dns_answer_mismatch")

        def opened(_flow: UdpFlow, code: str, reason: str) -> None:
            if code and not done.done():
                done.set_exception(LookupError(f"{code}: {reason}"))

        flow = UdpFlow(client, answered, lambda _flow: None, idle=QUERY_TIMEOUT, queue=1, dest=(name, 53),
                       peer=f"dns:{name}")
        flow.protocol = "dns"
        flow.on_opened = opened
        flow.from_local(tunnel_query(query))  # sent once the connector's DNS socket is open
        client.open(flow, "")  # the resolver's own query: no app process to look up
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                return await done
        except TimeoutError:
            log.warning("private name not resolved: no answer through the tunnel", extra={
                "qname": name, "reason": f"no answer within {QUERY_TIMEOUT:g}s"})
            return None
        except LookupError as exc:
            log.warning("private name not resolved", extra={"qname": name, "reason": str(exc)})
            return None
        finally:
            flow.close("dns_done", "answered")


class _OneShot(asyncio.DatagramProtocol):
    """Takes the first datagram that answers ``ident`` / ``question``; others are counted and ignored."""

    def __init__(self, done: asyncio.Future[bytes], ident: int, question: DNSQuestion, stats: Stats) -> None:
        self.done = done
        self.ident = ident
        self.question = question
        self.stats = stats

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.done.done():
            return
        if answers(data, self.ident, self.question):
            self.done.set_result(data)
        else:
            self.stats.count(self.stats.datagrams_dropped, "dns_answer_mismatch")

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _ask(server: tuple[str, int], query: DNSRecord, stats: Stats) -> bytes | None:
    """Send ``query`` to ``server`` over UDP and wait for its answer (None on timeout or error).
    It goes out under a random id of our own, as the app's may be guessable (RFC 5452: an
    off-path spoofer must then guess id and port); the answer gets the app's id back."""
    ident = secrets.randbelow(1 << 16)
    packed = bytearray(query.pack())
    struct.pack_into("!H", packed, 0, ident)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: _OneShot(done, ident, query.q, stats),
                                                           remote_addr=server)
    except OSError as exc:
        log.warning("DNS server unreachable", extra={"server": f"{server[0]}:{server[1]}", "reason": str(exc)})
        return None
    try:
        transport.sendto(bytes(packed))
        async with asyncio.timeout(QUERY_TIMEOUT):
            answer = await done
        return struct.pack("!H", query.header.id) + answer[2:]
    except (TimeoutError, OSError) as exc:
        log.warning("no answer from the DNS server", extra={"server": f"{server[0]}:{server[1]}",
                                                            "reason": str(exc) or "timed out"})
        return None
    finally:
        transport.close()


def _resolv_conf_server(listen: tuple[str, int], path: str = RESOLV_CONF) -> tuple[str, int]:
    """The first nameserver of resolv.conf that is not ``listen`` (this resolver)."""
    try:
        with open(path) as fh:
            servers = [line.split()[1] for line in fh if line.split()[:1] == ["nameserver"] and len(line.split()) > 1]
    except OSError as exc:
        raise ValueError(f"FERRYMAN_DNS_UPSTREAM is empty and {path} cannot be read ({exc.strerror})") from None
    for server in servers:
        if (server, 53) != listen:
            return server, 53
    raise ValueError(f"FERRYMAN_DNS_UPSTREAM is empty and {path} names no nameserver other than this resolver")


# ---------------------------------------------------------------------------- front ends


class DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # queries being answered (held: tasks are weakly referenced)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple) -> None:
        answer = await self.resolver.answer(data)
        if answer is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(answer, addr)


class DnsTcp(asyncio.Protocol):
    """DNS over TCP (RFC 1035 §4.2.2: each message after a 2-byte length), answers in order; a
    connection without a complete query for ``TCP_IDLE`` seconds, none being answered, is closed."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self._work())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            (size,) = struct.unpack_from("!H", self.buf)
            if len(self.buf) < 2 + size:  # at most 2 + 65535 bytes are ever buffered
                return
            message = bytes(self.buf[2:2 + size])
            del self.buf[:2 + size]
            self.queue.put_nowait(message)
            if self.queue.qsize() >= TCP_PIPELINE and self.transport is not None:
                self.transport.pause_reading()  # an app pipelining without reading answers waits

    def eof_received(self) -> bool:
        self.queue.put_nowait(None)  # answer what was asked, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def _work(self) -> None:
        while True:
            if self.queue.empty():
                try:
                    message = await asyncio.wait_for(self.queue.get(), TCP_IDLE)
                except TimeoutError:
                    break  # idle (or trickling a message): closed, so idle connections hold no descriptor
            else:
                message = self.queue.get_nowait()
            if message is None:
                break
            transport = self.transport
            if self.queue.qsize() < TCP_PIPELINE // 2 and transport is not None and not transport.is_closing():
                transport.resume_reading()
            answer = await self.resolver.answer(message)
            if answer is None or self.transport is None or self.transport.is_closing():
                continue
            self.transport.write(struct.pack("!H", len(answer)) + answer)
        if self.transport is not None:
            self.transport.close()


async def serve(client: FlowOpener, listen: tuple[str, int]
                ) -> tuple[Resolver, asyncio.DatagramTransport, asyncio.AbstractServer]:
    """Start the resolver's UDP and TCP listeners on ``listen``."""
    resolver = Resolver(client, listen)
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: DnsUdp(resolver), local_addr=listen)
    port = udp.get_extra_info("sockname")[1]
    resolver.listen = (listen[0], port)
    tcp = await loop.create_server(lambda: DnsTcp(resolver), listen[0], port, reuse_address=True)
    return resolver, udp, tcp
