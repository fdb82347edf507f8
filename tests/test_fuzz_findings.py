"""Regression tests for what fuzzing found (``python -m fuzz``): each input, what went wrong, the fix.

The inputs are also kept in the targets' seed corpora (``fuzz/corpus/*/finding-*``), so every fuzz
run starts by replaying them.
"""

from __future__ import annotations

import types

import pytest

from dataplane.basics.metrics import Stats
from dataplane.client import socks

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
    proto = socks.Socks5(client=None)  # type: ignore[arg-type]  # refused before any flow
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb")
    assert bytes(transport.written[:4]) == b"\x05\x00\x05\x08"  # method chosen, then "address type not supported"
    assert transport.closed


def test_socks_names_that_are_host_names_still_pass() -> None:
    for name, expected in ((b"db.corp.example", "db.corp.example"), (b"xn--ls8h.example", "\U0001f4a9.example"),
                           (b"_srv.example.", "_srv.example."), (b"10.0.0.1", "10.0.0.1")):
        assert socks.parse_address(b"\x03" + bytes([len(name)]) + name + b"\x00\x50", 0) == (
            expected, 80, 2 + len(name) + 2)
