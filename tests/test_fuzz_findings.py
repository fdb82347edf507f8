"""Regression tests for what fuzzing found (``python -m fuzz``): each input, what went wrong, the fix.

The inputs are also kept in the targets' seed corpora (``fuzz/corpus/*/finding-*``), so every fuzz
run starts by replaying them.
"""

from __future__ import annotations

import asyncio
import logging
import types

import pytest
from dnslib import RCODE, DNSRecord

from dataplane.basics.metrics import Stats
from dataplane.client import dns, socks
from dataplane.client.process import LocalUsers

pytestmark = pytest.mark.timeout(20)


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 1080)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


# SOCKS5 names the idna codec decodes but cannot encode again (an empty label, a label over 63
# characters) or that are no host name at all. Found: a UDP relay datagram naming ".\x00\x00m\x02"
# passed the header check, then writing the answers' header (pack_address) raised UnicodeError out
# of datagram_received. Fix: parse_address refuses any name that is not a host name (is_host_name).
BAD_NAMES = [b".\x00\x00m\x02", b"a..b", b".", b"a" * 64 + b".example", b"a b", b"\x00", b"-a.example"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_socks_udp_datagram_naming_no_host_name_is_dropped_and_counted(name: bytes) -> None:
    stats = Stats("client", "test")
    association = socks.UdpAssociation(types.SimpleNamespace(stats=stats), "127.0.0.1", 0, "127.0.0.1:40000")
    association.connection_made(_Transport())  # type: ignore[arg-type]
    association.datagram_received(b"\x00\x00\x00\x03" + bytes([len(name)]) + name + b"\x00\x35query",
                                  ("127.0.0.1", 5555))
    assert stats.datagrams_dropped == {"socks_bad_header": 1}
    assert association.flows == {}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_socks_connect_to_no_host_name_gets_address_type_error(name: bytes) -> None:
    async def main() -> _Transport:
        # refused before any flow: the client is asked only for its handshake timeout and local users
        client = types.SimpleNamespace(settings=types.SimpleNamespace(handshake_timeout=10.0),
                                       local_users=LocalUsers("*"))
        proto = socks.Socks5(client=client)  # type: ignore[arg-type]
        transport = _Transport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb")
        proto.connection_lost(None)
        return transport

    transport = asyncio.run(main())
    assert bytes(transport.written[:4]) == b"\x05\x00\x05\x08"  # method chosen, then "address type not supported"
    assert transport.closed


def test_socks_names_that_are_host_names_still_pass() -> None:
    for name, expected in ((b"db.corp.example", "db.corp.example"), (b"xn--ls8h.example", "\U0001f4a9.example"),
                           (b"_srv.example.", "_srv.example."), (b"10.0.0.1", "10.0.0.1")):
        assert socks.parse_address(b"\x03" + bytes([len(name)]) + name + b"\x00\x50", 0) == (
            expected, 80, 2 + len(name) + 2)


# DNS messages dnslib parses but cannot write again: a label byte of 0x40-0xbf is read as a label
# longer than 63 bytes. Found: an answer carrying one (from the system resolver or a connector)
# was passed to the app and cached; every later query for that name then failed inside
# from_cache (DNSLabelError), logged with its traceback, until the TTL ran out. A query carrying
# one reached the upstream path and failed the same way. Fix: the resolver re-packs each query
# (else dropped and counted ``dns_malformed``) and each answer (else SERVFAIL, "unusable DNS answer").
FOUND_QUERY = bytes.fromhex("e4060100000100000000000102763604636f7270076578616d706c6500001c00010000291000000000000000")
FOUND_ANSWER = bytes.fromhex(
    "e4068580000100010000000002000000000102763604636f7270076578616d706c6500001c000000000102763604636f7270"
    "076578616d706c6500001c000000000102763604636f7270076578616d706c6500001c000000000102763604636f727007"
    "6578616d706c6500001c000000000102763604636f7270076578616d706c6500001c000000000102763604636f727007657"
    "8616d706c6500001c763604636f7270076578616d706c6500001c0001c00c001c00010000001e001020010db80000000000"
    "00000000000005")
LONG_LABEL_QUERY = bytes.fromhex("abcd01000001000000000000") + b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01"
# FOUND_ANSWER's question is not FOUND_QUERY's, so the resolver now ignores it as no answer to the query
# (tests/test_client_dns_guard.py); the same trouble in an answer that does answer it: an owner name with
# a label byte of 0x50.
UNWRITABLE_ANSWER = (FOUND_QUERY[:2] + bytes.fromhex("85800001000100000000") + FOUND_QUERY[12:33]
                     + b"\x50" + b"a" * 80 + bytes.fromhex("00001c00010000001e0010") + bytes(15) + b"\x05")


class _Upstream(asyncio.DatagramProtocol):
    """A DNS server on loopback that answers every query with ``answer`` (its id set to the query's)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queries += 1
        self.transport.sendto(data[:2] + self.answer[2:], addr)  # type: ignore[attr-defined]


async def _resolver_with_upstream(answer: bytes):
    loop = asyncio.get_running_loop()
    upstream = _Upstream(answer)
    transport, _ = await loop.create_datagram_endpoint(lambda: upstream, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    client = types.SimpleNamespace(stats=Stats("client", "test"), route_name=lambda name: "public",
                                   settings=types.SimpleNamespace(dns_cache=16, dns_upstream=f"127.0.0.1:{port}"),
                                   profile=None, dns_rebind_allow=())
    return dns.Resolver(client, ("127.0.0.1", 53)), client.stats, upstream, transport


def test_dns_answer_dnslib_cannot_write_again_gets_servfail_and_is_never_cached(caplog) -> None:
    async def main() -> list[bytes | None]:
        resolver, _stats, upstream, transport = await _resolver_with_upstream(UNWRITABLE_ANSWER)
        try:
            answers = [await resolver.answer(FOUND_QUERY) for _ in range(3)]
        finally:
            transport.close()
        assert upstream.queries == 3  # nothing was cached
        return answers

    with caplog.at_level(logging.WARNING, logger="ferryman.dns"):
        answers = asyncio.run(main())
    for answer in answers:
        assert answer is not None and DNSRecord.parse(answer).header.rcode == RCODE.SERVFAIL
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert [r.getMessage() for r in caplog.records] == ["unusable DNS answer"] * 3


def test_dns_query_dnslib_cannot_write_again_is_dropped_and_counted(caplog) -> None:
    async def main() -> bytes | None:
        resolver, stats, upstream, transport = await _resolver_with_upstream(FOUND_ANSWER)
        try:
            answer = await resolver.answer(LONG_LABEL_QUERY)
        finally:
            transport.close()
        assert upstream.queries == 0
        assert stats.datagrams_dropped == {"dns_malformed": 1}
        return answer

    with caplog.at_level(logging.WARNING, logger="ferryman.dns"):
        assert asyncio.run(main()) is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
