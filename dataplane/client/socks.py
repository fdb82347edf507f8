"""SOCKS5 front end of the client agent (RFC 1928: no authentication, CONNECT).

The handshake is parsed here; once the CONNECT request is read, the connection is
handed to a ``ClientFlow`` on the same transport and the reply code reports the edge's
answer (a refused application becomes "connection not allowed by ruleset", an
unreachable edge "network unreachable", and so on). Anything else a client asks for
gets the matching SOCKS error and a log line, never a silent close.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct

from .node import Client, ClientFlow

log = logging.getLogger("ferryman.socks")

MAX_HANDSHAKE = 600  # greeting (<= 257) + request (<= 262)

REP_OK = 0x00
REP_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NET_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_REFUSED = 0x05
REP_TTL = 0x06
REP_COMMAND = 0x07
REP_ADDRESS = 0x08

REPLY_FOR_CODE = {
    "no_application": REP_NOT_ALLOWED,
    "not_allowed": REP_NOT_ALLOWED,
    "no_connector": REP_NET_UNREACHABLE,
    "edge_unreachable": REP_NET_UNREACHABLE,
    "connector_lost": REP_NET_UNREACHABLE,
    "tunnel_lost": REP_NET_UNREACHABLE,
    "dial_refused": REP_REFUSED,
    "dial_timeout": REP_HOST_UNREACHABLE,
    "dns_error": REP_HOST_UNREACHABLE,
    "dial_error": REP_HOST_UNREACHABLE,
    "open_timeout": REP_TTL,
}


def reply(code: int) -> bytes:
    return struct.pack("!BBBB4sH", 5, code, 0, 1, b"\x00\x00\x00\x00", 0)


class Socks5(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.greeted = False
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self._parse() and len(self.buf) > MAX_HANDSHAKE:
            self._fail(REP_FAILURE, "SOCKS handshake too long")

    def _parse(self) -> bool:
        """Advance the handshake; True once it is finished (answered or handed to a flow)."""
        buf = self.buf
        if not self.greeted:
            if len(buf) < 2:
                return False
            if buf[0] != 5:
                self._close(f"not a SOCKS5 client (version byte {buf[0]})")
                return True
            n = buf[1]
            if len(buf) < 2 + n:
                return False
            methods = bytes(buf[2:2 + n])
            del buf[:2 + n]
            if 0 not in methods:
                self.transport.write(b"\x05\xff")  # type: ignore[union-attr]
                self._close("client offers no supported authentication method (only 'no authentication')")
                return True
            self.greeted = True
            self.transport.write(b"\x05\x00")  # type: ignore[union-attr]
        if len(buf) < 5:
            return False
        if buf[0] != 5:
            self._fail(REP_FAILURE, f"bad SOCKS request version {buf[0]}")
            return True
        cmd, atyp = buf[1], buf[3]
        if atyp == 1:
            end = 4 + 4
        elif atyp == 4:
            end = 4 + 16
        elif atyp == 3:
            end = 5 + buf[4]
        else:
            self._fail(REP_ADDRESS, f"address type {atyp} not supported")
            return True
        if len(buf) < end + 2:
            return False
        if atyp == 1:
            host = str(ipaddress.IPv4Address(bytes(buf[4:8])))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(bytes(buf[4:20])))
        else:
            try:  # (the idna codec has no errors="replace": a bad name is an address error)
                host = bytes(buf[5:end]).decode("idna")
            except UnicodeError:
                self._fail(REP_ADDRESS, "domain name is not a valid host name")
                return True
        (port,) = struct.unpack_from("!H", buf, end)
        if cmd != 1:
            self._fail(REP_COMMAND, f"SOCKS command {cmd} not supported (only CONNECT)")
        elif not host or port == 0:
            self._fail(REP_ADDRESS, "empty host or port 0")
        else:
            self._connect(host, port, bytes(buf[end + 2:]))
        return True

    def _connect(self, host: str, port: int, rest: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.pause_reading()

        def opened(flow: ClientFlow, code: str, reason: str) -> None:
            if transport.is_closing():
                return
            if code:
                transport.write(reply(REPLY_FOR_CODE.get(code, REP_FAILURE)))
                transport.close()
                return
            transport.write(reply(REP_OK))
            if rest:
                flow.data_received(rest)

        flow = ClientFlow(self.client, (host, port), opened)
        transport.set_protocol(flow)
        flow.connection_made(transport)
        self.client.open(flow)

    def _fail(self, code: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply(code))
        self._close(message)

    def _close(self, message: str) -> None:
        log.warning("socks request refused", extra={"source": self.peer, "reason": message})
        if self.transport is not None:
            self.transport.close()
