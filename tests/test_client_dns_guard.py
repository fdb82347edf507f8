"""What the client's resolver and transparent capture take from a DNS answer
(``dataplane/client/dns.py``, ``dataplane/client/transparent.py``).

Covered: a private name's answer puts in the capture sets only the A/AAAA records of the name
asked and of its CNAME chain, never a loopback, unspecified, link-local, multicast or broadcast
address, each for a TTL nft accepts (examples, and hypothesis over answers written and parsed
again); those left out are counted and logged at a limited rate; when the capture backend
fails, the app gets SERVFAIL if the profile fails closed and the answer if it fails open
(counted either way), and nothing is cached; record TTLs above ``TTL_MAX`` are served as it;
the resolver takes only the datagram that answers its query (id and question), from the system
resolver (a real UDP socket sending spoofed answers first) and through the tunnel, and waits
for it until its timeout. When ``nft`` and root are there, ``nft --check`` accepts the elements.
Also: ``ferryman client status`` escapes control characters in what edges and the control
plane wrote (``dataplane/client/status.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import shutil
import struct
import subprocess
import time
import types
from collections.abc import Awaitable, Callable

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RD, RR, A, DNSError, DNSLabel, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.basics.metrics import Stats
from dataplane.client import dns, status
from dataplane.client import transparent as tp
from dataplane.client.profile import Profile
from dataplane.contract.snapshot import ClientProfile, SnapApp, SnapSegment
from dataplane.transport.udpflow import UdpFlow

pytestmark = pytest.mark.timeout(60)

NAME = "wiki.corp.example"


def _answer(records: list[RR], name: str = NAME) -> DNSRecord:
    reply = DNSRecord.question(name, "A").reply()
    for rr in records:
        reply.add_answer(rr)
    return DNSRecord.parse(reply.pack())  # as the resolver has it: parsed from the wire


def _a(owner: str, address: str, ttl: int = 60) -> RR:
    return RR(owner, QTYPE.AAAA if ":" in address else QTYPE.A,
              rdata=AAAA(ipaddress.ip_address(address).exploded) if ":" in address else A(address), ttl=ttl)


def _cname(owner: str, target: str) -> RR:
    return RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=60)


# ---------------------------------------------------------------------------- what an answer captures
def test_private_answers_never_capture_local_special_or_unrelated_addresses() -> None:
    reply = _answer([
        _a(NAME, "127.0.0.1"), _a(NAME, "0.0.0.0"), _a(NAME, "169.254.1.1"), _a(NAME, "224.0.0.251"),
        _a(NAME, "255.255.255.255"), _a(NAME, "::1"), _a(NAME, "::"), _a(NAME, "fe80::1"), _a(NAME, "ff02::1"),
        _a(NAME, "::ffff:127.0.0.1"),  # judged as its IPv4 address
        _a("other.example", "203.0.113.9"),  # not the name asked
        _a(NAME, "10.7.0.1", ttl=2**31 - 1),  # far beyond what nft takes as a timeout
        _a(NAME.upper(), "10.7.0.2", ttl=10),  # names are case-insensitive
        _a(NAME, "fd00::7", ttl=20),
    ])
    entries, dropped = tp.capture_entries(reply, ipv6=True)
    assert entries == {"10.7.0.1": dns.TTL_MAX + tp.DNS_MARGIN, "10.7.0.2": 10 + tp.DNS_MARGIN,
                       "fd00::7": 20 + tp.DNS_MARGIN}
    assert [(address, why) for _owner, address, why in dropped] == [
        ("127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("169.254.1.1", "link_local"),
        ("224.0.0.251", "multicast"), ("255.255.255.255", "broadcast"), ("::1", "loopback"),
        ("::", "unspecified"), ("fe80::1", "link_local"), ("ff02::1", "multicast"),
        ("::ffff:7f00:1", "loopback"), ("203.0.113.9", "other_name")]
    assert dropped[-1][0] == "other.example"
    v4_only, _ = tp.capture_entries(reply, ipv6=False)  # no IPv6 listener: AAAA records are not captured
    assert set(v4_only) == {"10.7.0.1", "10.7.0.2"}


def _recording_capture(agent: _Agent, monkeypatch, ipv6: bool = False) -> tuple[tp.Transparent, list[str]]:
    """Transparent capture as installed, its nft scripts recorded instead of run (no root needed)."""
    scripts: list[str] = []

    async def recording_nft(script: str, *args: str) -> str:
        scripts.append(script)
        return ""

    monkeypatch.setattr(tp, "_nft", recording_nft)
    capture = tp.Transparent(agent)  # type: ignore[arg-type]
    capture.installed, capture.port4, capture.port6 = True, 40001, 40002 if ipv6 else 0
    return capture, scripts


def test_only_the_names_own_ordinary_addresses_go_into_the_sets(monkeypatch) -> None:
    capture, scripts = _recording_capture(_Agent(), monkeypatch, ipv6=True)
    reply = _answer([_a(NAME, "127.0.0.1"), _a(NAME, "0.0.0.0"), _a(NAME, "169.254.1.1"), _a(NAME, "::1"),
                     _a("other.example", "203.0.113.9"), _a(NAME, "10.7.0.1", ttl=2**31 - 1)])
    assert asyncio.run(capture.dns_answered(NAME, reply))
    assert scripts == [tp.elements(capture.table, [("10.7.0.1", dns.TTL_MAX + tp.DNS_MARGIN)])]
    assert capture.name_for("127.0.0.1") is None and capture.name_for("203.0.113.9") is None


def test_the_cname_chain_from_the_name_asked_is_followed_and_nothing_else() -> None:
    reply = _answer([
        _cname(NAME, "web.corp.example"), _cname("WEB.corp.example", "edge.cdn.example"),
        _a("edge.cdn.example", "10.8.0.1"),  # the end of the chain
        _a("web.corp.example", "10.8.0.2"),  # on the chain
        _cname("other.example", "bank.example"), _a("bank.example", "203.0.113.10"),  # a chain not from NAME
        _cname("edge.cdn.example", NAME),  # a loop ends the chain
    ])
    entries, dropped = tp.capture_entries(reply, ipv6=True)
    assert set(entries) == {"10.8.0.1", "10.8.0.2"}
    assert dropped == [("bank.example", "203.0.113.10", "other_name")]
    # labels count, not text: "wiki.corp" + "example" is another name than wiki.corp.example
    dotted = DNSRecord.question(NAME, "A").reply()
    dotted.add_answer(RR(DNSLabel([b"wiki.corp", b"example"]), QTYPE.A, rdata=A("10.8.0.3")))
    assert tp.capture_entries(dotted, ipv6=True)[0] == {}


def _special(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast
            or ip == ipaddress.IPv4Address("255.255.255.255"))


OWNERS = [NAME, NAME.upper(), "web.corp.example", "edge.cdn.example", "other.example", "wiki.corp.example.evil"]
_records = st.lists(st.one_of(
    st.tuples(st.sampled_from(OWNERS), st.ip_addresses().map(str), st.integers(0, 2**32 - 1)),
    st.tuples(st.sampled_from(OWNERS), st.sampled_from(OWNERS)),  # a CNAME
), max_size=12)


@settings(max_examples=300, deadline=None)
@given(records=_records, ipv6=st.booleans())
def test_captured_entries_are_never_special_always_in_the_chain_and_bounded(records, ipv6) -> None:
    rrs = [_a(r[0], r[1], r[2]) if len(r) == 3 else _cname(r[0], r[1]) for r in records]
    reply = _answer(rrs)
    entries, dropped = tp.capture_entries(reply, ipv6=ipv6)
    chain = [DNSLabel(NAME)]  # the oracle: CNAMEs followed from the name asked, label by label
    while True:
        target = next((rr.rdata.label for rr in reply.rr if rr.rtype == QTYPE.CNAME and rr.rname == chain[-1]), None)
        if target is None or target in chain:
            break
        chain.append(target)
    taken = [rr for rr in reply.rr if rr.rtype == QTYPE.A or (rr.rtype == QTYPE.AAAA and ipv6)]
    for address, seconds in entries.items():
        assert not _special(address)
        assert tp.DNS_MARGIN <= seconds <= dns.TTL_MAX + tp.DNS_MARGIN < 10**8  # nft refuses 10**8 s and more
        assert any(str(ipaddress.ip_address(str(rr.rdata))) == address and rr.rname in chain for rr in taken)
    left_out = {(address, why) for _owner, address, why in dropped}
    for rr in taken:
        address = str(ipaddress.ip_address(str(rr.rdata)))
        if rr.rname not in chain:
            assert (address, "other_name") in left_out
        elif _special(address):
            assert (address, tp.never_captured(address)) in left_out
        else:
            assert entries[address] >= min(rr.ttl, dns.TTL_MAX) + tp.DNS_MARGIN


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft --check needs root and nft")
def test_nft_accepts_the_capped_elements() -> None:
    entries, _ = tp.capture_entries(_answer([_a(NAME, "10.7.0.1", ttl=2**32 - 1), _a(NAME, "fd00::7", ttl=2**31)]),
                                    ipv6=True)
    script = tp.ruleset("ferryman_4242", None, 40001, 40002, [], []) + tp.elements("ferryman_4242", entries.items())
    done = subprocess.run(["nft", "--check", "-f", "-"], input=script.encode(), capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr.decode()


# ---------------------------------------------------------------------------- the resolver and capture together
class _Agent:
    """The agent as the resolver and transparent capture see it; a private name is resolved
    through a fake tunnel whose edge answers with ``tunnel_answers`` (each given the query's id
    unless it is a ``bytes`` datagram, sent as it is)."""

    def __init__(self, fail_mode: str = "closed", upstream: str = "127.0.0.1:9") -> None:
        self.stats = Stats("client", "test")
        self.profile: Profile | None = Profile(ClientProfile(
            version=1, issued_at="2026-12-01T00:00:00Z", dns_suffixes=["corp.example"], fail_mode=fail_mode,
            applications=[SnapApp(name="lab", kind="per_app", connector_group="default", segments=[
                SnapSegment(destination="10.20.0.0/16", ports="22", protocol="tcp"),
                SnapSegment(destination="fd00:20::/64", ports="53", protocol="udp")])]))
        self.settings = types.SimpleNamespace(dns_cache=16, dns_upstream=upstream)
        self.dns_rebind_allow: tuple[str, ...] = ()
        self.udp_backlog = 64
        self.tunnel_answers: list[DNSRecord | bytes] = []
        self.opened = 0

    def route_name(self, name: str) -> str:
        return "tunnel" if self.profile is not None and self.profile.private_name(name) else "public"

    def open(self, flow: UdpFlow, process: str | None = None, local: tuple[str, int] | None = None) -> None:
        self.opened += 1
        query = DNSRecord.parse(flow.queue[0])
        for answer in self.tunnel_answers:
            if isinstance(answer, DNSRecord):
                answer.header.id = query.header.id
                answer = answer.pack()
            flow.on_datagram(memoryview(answer))


def _private_answer(*records: RR, name: str = NAME, qtype: str = "A") -> DNSRecord:
    reply = DNSRecord.question(name, qtype).reply()
    for rr in records:
        reply.add_answer(rr)
    return reply


def _with_failing_capture(agent: _Agent, monkeypatch) -> dns.Resolver:
    async def failing_nft(script: str, *args: str) -> str:
        raise tp.NftError("`nft -f -` failed: Error: Could not process rule: No buffer space available")

    monkeypatch.setattr(tp, "_nft", failing_nft)
    capture = tp.Transparent(agent)  # type: ignore[arg-type]
    capture.installed, capture.port4 = True, 40001
    resolver = dns.Resolver(agent, ("127.0.0.1", 53))  # type: ignore[arg-type]
    resolver.on_answer = capture.dns_answered
    return resolver


def test_an_answer_whose_addresses_cannot_be_captured_is_servfail_when_failing_closed(monkeypatch, caplog) -> None:
    agent = _Agent("closed")
    agent.tunnel_answers = [_private_answer(_a(NAME, "10.7.0.1"))]
    resolver = _with_failing_capture(agent, monkeypatch)
    query = DNSRecord.question(NAME, "A")

    async def main() -> list[bytes | None]:
        return [await resolver.answer(query.pack()) for _ in range(2)]

    with caplog.at_level(logging.ERROR, logger="ferryman.transparent"):
        answers = asyncio.run(main())
    for answer in answers:
        assert answer is not None
        reply = DNSRecord.parse(answer)
        assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == query.header.id and not reply.rr
    assert agent.opened == 2 and len(resolver.cache) == 0  # never cached: asked (and captured) again
    assert agent.stats.datagrams_dropped == {"dns_capture_failed": 2}
    assert [r.getMessage() for r in caplog.records] == [
        "transparent capture: private name's addresses not captured, answered SERVFAIL (fail closed)"] * 2


def test_an_answer_whose_addresses_cannot_be_captured_is_passed_on_when_failing_open(monkeypatch) -> None:
    agent = _Agent("open")
    agent.tunnel_answers = [_private_answer(_a(NAME, "10.7.0.1"))]
    resolver = _with_failing_capture(agent, monkeypatch)
    answer = asyncio.run(resolver.answer(DNSRecord.question(NAME, "A").pack()))
    assert answer is not None and [str(rr.rdata) for rr in DNSRecord.parse(answer).rr] == ["10.7.0.1"]
    assert agent.stats.datagrams_dropped == {"dns_capture_failed": 1}


def test_left_out_records_are_counted_and_logged_at_a_limited_rate(monkeypatch, caplog) -> None:
    agent = _Agent()
    agent.stats.log_limit.limit = 3
    capture, scripts = _recording_capture(agent, monkeypatch)
    local = _answer([_a(NAME, "127.0.0.1"), _a("other.example", "203.0.113.9")])

    async def main() -> list[bool]:
        return [await capture.dns_answered(NAME, local) for _ in range(5)]

    with caplog.at_level(logging.WARNING, logger="ferryman.transparent"):
        assert asyncio.run(main()) == [True] * 5  # nothing to capture: the answer goes to the app
    assert scripts == [] and capture.name_for("127.0.0.1") is None
    assert agent.stats.datagrams_dropped == {"dns_capture_loopback": 5, "dns_capture_other_name": 5}
    lines = [r for r in caplog.records if r.getMessage().startswith("transparent capture: address")]
    assert len(lines) == 6 and {(r.address, r.reason) for r in lines} == {  # type: ignore[attr-defined]
        ("127.0.0.1", "loopback"), ("203.0.113.9", "other_name")}


def test_record_ttls_are_served_and_cached_no_longer_than_ttl_max() -> None:
    agent = _Agent()
    reply = _private_answer(_a(NAME, "10.7.0.1", ttl=2**31 - 1), _a(NAME, "10.7.0.2", ttl=30))
    # OPT's TTL field holds the extended rcode and flags, not a TTL: left alone
    reply.add_ar(EDNS0(udp_len=1232, flags="do", ext_rcode=1))
    agent.tunnel_answers = [reply]
    resolver = dns.Resolver(agent, ("127.0.0.1", 53))  # type: ignore[arg-type]
    answer = asyncio.run(resolver.answer(DNSRecord.question(NAME, "A").pack()))
    assert answer is not None
    served = DNSRecord.parse(answer)
    assert [rr.ttl for rr in served.rr] == [dns.TTL_MAX, 30]
    assert [rr.ttl for rr in served.ar] == [(1 << 24) | 0x8000]
    cached = resolver.cache.get(dns.key_of(DNSRecord.question(NAME)), time.monotonic())
    assert cached is not None and cached.expires - cached.stored == 30


# ---------------------------------------------------------------------------- only the answer to the query
def test_answers_match_id_and_question() -> None:
    query = DNSRecord.question(NAME, "A")
    right = query.reply()
    packed = right.pack()
    assert dns.answers(packed, query.header.id, query.q)
    upper = DNSRecord.question(NAME.upper(), "A").reply()
    assert dns.answers(upper.pack(), upper.header.id, query.q)  # case does not count
    assert not dns.answers(packed, (query.header.id + 1) % 65536, query.q)
    assert not dns.answers(query.pack(), query.header.id, query.q)  # a query, not a response
    for other in (DNSRecord.question("files.corp.example", "A"), DNSRecord.question(NAME, "AAAA"),
                  DNSRecord.question(NAME, "A", "CH")):
        assert not dns.answers(other.reply().pack(), other.header.id, query.q)
    dotted = DNSRecord.question(NAME)
    dotted.q.qname = DNSLabel([b"wiki.corp", b"example"])
    assert not dns.answers(dotted.reply().pack(), dotted.header.id, query.q)
    assert not dns.answers(packed[:4] + b"\x00\x00" + packed[6:12], query.header.id, query.q)  # no question
    assert not dns.answers(packed[:15], query.header.id, query.q)  # cut in its question
    assert not dns.answers(b"", query.header.id, query.q)
    # only header and question are read: an answer whose records are unusable is still the answer
    unusable = packed[:6] + b"\x00\x01" + packed[8:]  # one answer record announced, none there
    with pytest.raises(DNSError):
        DNSRecord.parse(unusable)
    assert dns.answers(unusable, query.header.id, query.q)


class _Spoofing(asyncio.DatagramProtocol):
    """A DNS server on loopback that answers every query first with ``spoofed`` datagrams (bytes,
    or DNSRecords given the query's id), then, unless ``silent``, with the right answer."""

    def __init__(self, spoofed: list[DNSRecord | bytes], silent: bool = False) -> None:
        self.spoofed = spoofed
        self.silent = silent
        self.ids: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        query = DNSRecord.parse(data)
        self.ids.append(query.header.id)
        for datagram in self.spoofed:
            if isinstance(datagram, DNSRecord):
                datagram.header.id = query.header.id
                datagram = datagram.pack()
            self.transport.sendto(datagram, addr)  # type: ignore[attr-defined]
        if not self.silent:
            right = query.reply()
            right.add_answer(_a(str(query.q.qname), "198.51.100.7"))
            self.transport.sendto(right.pack(), addr)  # type: ignore[attr-defined]


PUBLIC = "www.example.org"


def _spoofs(query_id_guess: int) -> list[DNSRecord | bytes]:
    wrong_id = DNSRecord.question(PUBLIC).reply()
    wrong_id.add_answer(_a(PUBLIC, "203.0.113.66"))
    wrong_id_bytes = struct.pack("!H", query_id_guess) + wrong_id.pack()[2:]  # the app's id, not ours
    other_name = _private_answer(_a("bank.example", "203.0.113.66"), name="bank.example")
    other_type = _private_answer(_a(PUBLIC, "::66"), name=PUBLIC, qtype="AAAA")
    return [wrong_id_bytes, other_name, other_type, DNSRecord.question(PUBLIC), b"\x00"]


async def _upstream(spoofed: list[DNSRecord | bytes],
                    silent: bool = False) -> tuple[_Spoofing, asyncio.DatagramTransport]:
    server = _Spoofing(spoofed, silent)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: server,
                                                                             local_addr=("127.0.0.1", 0))
    return server, transport


def test_spoofed_answers_from_the_system_resolver_are_ignored_until_the_right_one(monkeypatch) -> None:
    monkeypatch.setattr(secrets, "randbelow", lambda n: 0x4242)
    query = DNSRecord.question(PUBLIC, "A")
    query.header.id = 7

    async def main() -> tuple[list[bytes | None], _Spoofing, _Agent]:
        server, transport = await _upstream(_spoofs(7))
        agent = _Agent(upstream=f"127.0.0.1:{transport.get_extra_info('sockname')[1]}")
        resolver = dns.Resolver(agent, ("127.0.0.1", 53))  # type: ignore[arg-type]
        try:
            return [await resolver.answer(query.pack()) for _ in range(2)], server, agent
        finally:
            transport.close()

    answers, server, agent = asyncio.run(main())
    for answer in answers:
        assert answer is not None
        reply = DNSRecord.parse(answer)
        assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [(PUBLIC + ".", "198.51.100.7")]
        assert reply.header.id == 7 and reply.header.rcode == RCODE.NOERROR
    assert agent.stats.datagrams_dropped == {"dns_answer_mismatch": 5}
    assert server.ids == [0x4242]  # asked once, under the resolver's own id; the second answer is cached


def test_only_spoofed_answers_mean_no_answer_within_the_timeout(monkeypatch) -> None:
    monkeypatch.setattr(dns, "QUERY_TIMEOUT", 0.5)
    query = DNSRecord.question(PUBLIC, "A")

    async def main() -> tuple[bytes | None, _Agent]:
        _server, transport = await _upstream(_spoofs(query.header.id), silent=True)
        agent = _Agent(upstream=f"127.0.0.1:{transport.get_extra_info('sockname')[1]}")
        resolver = dns.Resolver(agent, ("127.0.0.1", 53))  # type: ignore[arg-type]
        try:
            return await resolver.answer(query.pack()), agent
        finally:
            transport.close()

    answer, agent = asyncio.run(main())
    assert answer is not None and DNSRecord.parse(answer).header.rcode == RCODE.SERVFAIL
    assert agent.stats.datagrams_dropped == {"dns_answer_mismatch": 5}


def test_an_answer_through_the_tunnel_must_answer_the_query_too() -> None:
    agent = _Agent()
    wrong_id = _private_answer(_a(NAME, "10.66.0.1"))
    wrong_id.header.id = 0x4321
    agent.tunnel_answers = [wrong_id.pack(),
                            _private_answer(_a("files.corp.example", "10.66.0.2"), name="files.corp.example"),
                            _private_answer(_a(NAME, "10.7.0.1"))]
    query = DNSRecord.question(NAME, "A")
    query.header.id = 0x1234
    answer = asyncio.run(dns.Resolver(agent, ("127.0.0.1", 53)).answer(query.pack()))  # type: ignore[arg-type]
    assert answer is not None and [str(rr.rdata) for rr in DNSRecord.parse(answer).rr] == ["10.7.0.1"]
    assert agent.stats.datagrams_dropped == {"dns_answer_mismatch": 2}


# ---------------------------------------------------------------------------- edge text in status output
def test_status_output_escapes_what_a_terminal_would_act_on() -> None:
    data = {
        "user": "alice@corp.example", "device": "dev-1", "flows": 1,
        "tunnel": {"state": "up", "edge": "edge-1\x1b]0;pwned\x07", "address": "192.0.2.1:8443",
                   "transport": "tcp", "rtt_ms": 1.5, "edges": []},
        "profile": {"version": 3, "applications": 1, "fail_mode": "closed", "dns_suffixes": ["corp.example"],
                    "last_sync": None, "error": "refused\r\nuser      mallory"},
        "forwards": [{"forward": "127.0.0.1:8080=db:5432", "ready": False,
                      "reason": "open_failed: \x1b[2J\u202egnp.exe"}],
    }
    shown = status.render(data)
    assert len(shown.splitlines()) == 6  # one line each, whatever the texts hold
    assert not any(c in shown for c in "\x1b\x07\r\u202e")
    assert "edge-1\\x1b]0;pwned\\x07 at 192.0.2.1:8443" in shown
    assert "last sync failed: refused\\r\\nuser      mallory" in shown
    assert shown.endswith("not ready: open_failed: \\x1b[2J\\u202egnp.exe")
    assert status.printable("wiki.corp.example é") == "wiki.corp.example é"


# ---------------------------------------------------------------------------- DNS rebinding
class _Answering(asyncio.DatagramProtocol):
    """A system resolver on loopback answering every query with ``records(name)`` (A and AAAA)."""

    def __init__(self, records: dict[str, list[RR]]) -> None:
        self.records = records

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        query = DNSRecord.parse(data)
        reply = query.reply()
        for rr in self.records.get(str(query.q.qname).rstrip("."), []):
            reply.add_answer(rr)
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


def _aaaa(owner: str, address: str) -> RR:
    return RR(owner, QTYPE.AAAA, rdata=AAAA(address), ttl=60)


def _resolve_all(agent: _Agent, records: dict[str, list[RR]], names: list[tuple[str, str]],
                 setup: Callable[[dns.Resolver], Awaitable[None]] | None = None) -> list[DNSRecord]:
    async def main() -> list[DNSRecord]:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Answering(records), local_addr=("127.0.0.1", 0))
        agent.settings.dns_upstream = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
        resolver = dns.Resolver(agent, ("127.0.0.1", 53))  # type: ignore[arg-type]
        if setup is not None:
            await setup(resolver)
        try:
            out = []
            for name, qtype in names:
                for _ in range(2):  # the second answer comes from the cache: withheld there too
                    answer = await resolver.answer(DNSRecord.question(name, qtype).pack())
                    assert answer is not None
                    out.append(DNSRecord.parse(answer))
            return out
        finally:
            transport.close()

    return asyncio.run(main())


REBINDING = {
    "evil.example": [_a("evil.example", "10.20.1.5"), _a("evil.example", "198.51.100.9")],
    "only-private.example": [_a("only-private.example", "10.20.7.7")],
    "v6.example": [_aaaa("v6.example", "fd00:20::5"), _aaaa("v6.example", "2001:db8::5")],
    "mapped.example": [_aaaa("mapped.example", "::ffff:a14:105")],  # ::ffff:10.20.1.5
    "elsewhere.example": [_a("elsewhere.example", "10.21.0.1")],  # private range, but no app's
    "split.lab.example": [_a("split.lab.example", "10.20.3.3")],
    "captured.example": [_a("captured.example", "10.7.0.1")],  # a private name's address, by transparent capture
    "cname.example": [RR("cname.example", QTYPE.CNAME, rdata=CNAME("wiki.corp.example"), ttl=60),
                      _a("wiki.corp.example", "10.99.0.1")],  # into a private suffix
    # HTTPS / SVCB: priority 1, target ".", then an ipv4hint (key 4) or ipv6hint (key 6)
    "hints.example": [RR("hints.example", QTYPE.HTTPS, ttl=60, rdata=RD(b"\x00\x01\x00\x00\x04\x00\x04\x0a\x14\x01\x05"))],
    "public-hints.example": [RR("public-hints.example", QTYPE.HTTPS, ttl=60,
                                rdata=RD(b"\x00\x01\x00\x00\x04\x00\x04\xc6\x33\x64\x09"))],  # 198.51.100.9
    "svcb.example": [RR("svcb.example", QTYPE.SVCB, ttl=60, rdata=RD(
        b"\x00\x01\x00\x00\x06\x00\x10" + ipaddress.ip_address("fd00:20::7").packed))],
    "bad-hints.example": [RR("bad-hints.example", QTYPE.HTTPS, ttl=60,
                             rdata=RD(b"\x00\x01\x00\x00\x04\x00\x03\x0a\x14\x01"))],  # a hint of 3 bytes
    # target "\xc0\x0c...": dnslib reads a 192-byte label, a lenient parser a compression pointer
    # and then, as parameters, the bytes dnslib took for the label: ipv4hint 10.20.1.5
    "pointer.example": [RR("pointer.example", QTYPE.SVCB, ttl=60, rdata=RD(
        b"\x00\x01\xc0" + (b"\x0c\x00\x04\x00\x04\x0a\x14\x01\x05\xfd\xe8\x00\xb4" + bytes(179)) + b"\x00"))],
    "alias.example": [RR("alias.example", QTYPE.HTTPS, ttl=60,
                         rdata=RD(b"\x00\x00\x04wiki\x04corp\x07example\x00"))],  # alias mode to a private name
}


def test_public_names_never_resolve_into_private_segments(caplog) -> None:
    agent = _Agent()
    agent.dns_rebind_allow = dns.rebind_allow("lab.example")
    caplog.set_level(logging.WARNING, logger="ferryman.dns")
    replies = _resolve_all(agent, REBINDING, [("evil.example", "A"), ("only-private.example", "A"),
                                              ("v6.example", "AAAA"), ("mapped.example", "AAAA"),
                                              ("elsewhere.example", "A"), ("split.lab.example", "A")])
    got = [[str(rr.rdata) for rr in reply.rr] for reply in replies[::2]]
    assert got == [["198.51.100.9"], [], ["2001:db8::5"], [], ["10.21.0.1"], ["10.20.3.3"]]
    assert all(reply.header.rcode == RCODE.NOERROR for reply in replies)  # no data, not an error
    assert [[str(rr.rdata) for rr in reply.rr] for reply in replies[1::2]] == got  # cached as withheld
    # Asked once each, the second answer from the cache; an answer left with no record (no SOA,
    # so no negative TTL) is not cached: those two names were asked twice, and withheld twice.
    assert agent.stats.dial_refused == {"dns_rebinding": 6}
    assert sum("DNS rebinding" in r.getMessage() for r in caplog.records) == 6


def test_addresses_capture_holds_for_private_names_private_owners_and_address_hints_are_withheld() -> None:
    agent = _Agent()

    async def with_capture(resolver: dns.Resolver) -> None:
        resolver.captured_name = lambda address: "wiki.corp.example" if address == "10.7.0.1" else None

    replies = _resolve_all(agent, REBINDING, [("captured.example", "A"), ("cname.example", "A"),
                                              ("hints.example", "HTTPS"), ("public-hints.example", "HTTPS"),
                                              ("svcb.example", "SVCB"), ("bad-hints.example", "HTTPS"),
                                              ("pointer.example", "SVCB"), ("alias.example", "HTTPS")],
                           setup=with_capture)
    assert [[QTYPE.get(rr.rtype) for rr in reply.rr] for reply in replies[::2]] == [
        [], ["CNAME"], [], ["HTTPS"], [], [], [], []]
    assert "ipv4hint=198.51.100.9" in str(replies[6].rr[0].rdata)  # a public hint is served as it was
    # An answer with no record left is not cached (asked twice); the CNAME's answer is (asked once).
    assert agent.stats.dial_refused == {"dns_rebinding": 13}


def _hiding(query: DNSRecord) -> bytes:
    """An answer whose first record (A 198.51.100.9) says its data is longer than its four bytes:
    a parser that skips by that length sees only it; one that reads four bytes goes on and finds
    a TXT where a strict parser never looks. Then A 10.20.1.5, which the strict parser does see."""
    def name(text: str) -> bytes:
        return b"".join(bytes([len(label)]) + label for label in text.encode().split(b".")) + b"\0"

    def record(owner: str, rtype: int, rdata: bytes) -> bytes:
        return name(owner) + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata

    asked = str(query.q.qname).rstrip(".")
    hidden = record("x.example", QTYPE.TXT, b"\x03abc")
    first = record(asked, QTYPE.A, bytes([198, 51, 100, 9]) + hidden)
    second = record(asked, QTYPE.A, bytes([10, 20, 1, 5]))
    question = query.pack()[12:]
    return struct.pack("!HHHHHH", query.header.id, 0x8180, 1, 2, 0, 0) + question + first + second


def test_the_app_gets_the_answer_as_checked_not_the_servers_bytes() -> None:
    agent = _Agent()

    async def main() -> bytes | None:
        class Hiding(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple) -> None:
                self.transport.sendto(_hiding(DNSRecord.parse(data)), addr)  # type: ignore[attr-defined]

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Hiding, local_addr=("127.0.0.1", 0))
        agent.settings.dns_upstream = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
        try:
            return await dns.Resolver(agent, ("127.0.0.1", 53)).answer(  # type: ignore[arg-type]
                DNSRecord.question("hide.example", "A").pack())
        finally:
            transport.close()

    served = asyncio.run(main())
    assert served is not None and bytes([10, 20, 1, 5]) not in served  # the record the parser did not see
    assert served == DNSRecord.parse(served).pack()  # nothing in it but what was parsed


def test_without_a_profile_or_for_a_private_name_nothing_is_withheld() -> None:
    agent = _Agent()
    agent.profile = None  # an agent on a certificate: no segment is known
    replies = _resolve_all(agent, REBINDING, [("only-private.example", "A")])
    assert [str(rr.rdata) for rr in replies[0].rr] == ["10.20.7.7"]
    agent = _Agent()  # a private name's answer comes through the tunnel, from the connector's DNS
    agent.tunnel_answers = [_private_answer(_a(NAME, "10.20.1.5"))]
    replies = _resolve_all(agent, {}, [(NAME, "A")])
    assert [str(rr.rdata) for rr in replies[0].rr] == ["10.20.1.5"] and not agent.stats.dial_refused


def test_the_allow_list_takes_dns_names_only() -> None:
    assert dns.rebind_allow(" Lab.Example., corp.example ,") == ("lab.example", "corp.example")
    for bad in ("lab example", "-x.example", "a..b", "x" * 64 + ".example"):
        with pytest.raises(ValueError, match="FERRYMAN_DNS_REBIND_ALLOW"):
            dns.rebind_allow(bad)
