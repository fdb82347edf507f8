"""SOCKS5 front end of the client agent (RFC 1928: no authentication; CONNECT and UDP ASSOCIATE).

The handshake is parsed here. Each request's destination is routed by the agent
(``FlowOpener.route``): ``"tunnel"`` carries it to the edge, ``"direct"`` dials it from this
device (``direct.py``). For CONNECT the connection is handed over by ``capture.connect`` and
the reply code reports the answer (a refused application becomes "connection not allowed
by ruleset", an unreachable edge "network unreachable", and so on).

UDP ASSOCIATE (RFC 1928 §7) binds a UDP relay socket on the control connection's local
(localhost) address and replies with it. Datagrams are taken only from the control
connection's client: its IP (or the address it announced), and one port (the announced
one, else that of its first datagram); others are dropped and counted. Each carries the
SOCKS UDP header; fragments (FRAG != 0) are dropped and counted (``socks_fragment``). A
domain name is passed to the edge as is ("remote DNS": the connector resolves it). Each
distinct destination becomes one UDP flow (``UdpFlow``, OPEN protocol ``udp``, at most
FERRYMAN_MAX_UDP_FLOWS per association) and its answers come back wrapped in the SOCKS
UDP header with that destination as the source. When the control connection closes,
every flow of the association ends (RST) and the relay socket closes.

Anything else a client asks for gets the matching SOCKS error and a log line, never a
silent close.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct

from ..basics.hostport import is_host_name
from ..transport.udpflow import UdpFlow
from .capture import connect, local_user_refusal
from .direct import DirectUdp
from .opener import FlowOpener

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
    "dns_timeout": REP_HOST_UNREACHABLE,
    "dial_error": REP_HOST_UNREACHABLE,
    "destination_forbidden": REP_NOT_ALLOWED,
    "open_timeout": REP_TTL,
}


CMD_CONNECT = 1
CMD_UDP_ASSOCIATE = 3
REFUSED_RETRY = 1.0  # seconds a refused UDP destination is not asked for again (datagrams dropped, counted)
MAX_REMEMBERED = 4096  # refused / logged destinations remembered per association


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A SOCKS5 reply; ``host``/``port``: BND.ADDR/BND.PORT (an IPv4 or IPv6 address)."""
    return struct.pack("!BBB", 5, code, 0) + pack_address(host) + struct.pack("!H", port)


def pack_address(host: str) -> bytes:
    """ATYP + address: IPv4, IPv6, or a domain name (as given)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return b"\x03" + bytes([len(name)]) + name
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


def parse_address(buf: bytes | bytearray | memoryview, offset: int) -> tuple[str, int, int] | None:
    """ATYP + DST.ADDR + DST.PORT at ``offset`` → (host, port, end); None when truncated.
    Raises ValueError for an unknown address type or an invalid name."""
    if len(buf) < offset + 1:
        return None
    atyp = buf[offset]
    if atyp == 1:
        end = offset + 1 + 4
    elif atyp == 4:
        end = offset + 1 + 16
    elif atyp == 3:
        if len(buf) < offset + 2:
            return None
        end = offset + 2 + buf[offset + 1]
    else:
        raise ValueError(f"address type {atyp} not supported")
    if len(buf) < end + 2:
        return None
    if atyp == 1:
        host = str(ipaddress.IPv4Address(bytes(buf[offset + 1:end])))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(bytes(buf[offset + 1:end])))
    else:
        try:  # (the idna codec has no errors="replace": a bad name is an address error)
            host = bytes(buf[offset + 2:end]).decode("idna")
            valid = is_host_name(host.encode("idna").decode("ascii"))  # as it is written back in replies
        except UnicodeError:
            valid = False
        if not valid:
            raise ValueError("domain name is not a valid host name")
    (port,) = struct.unpack_from("!H", buf, end)
    return host, port, end + 2


class Socks5(asyncio.Protocol):
    def __init__(self, client: FlowOpener) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.greeted = False
        self.peer = ""
        self.association: UdpAssociation | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if local_user_refusal(self.client, transport):
            transport.abort()  # another local account: nothing is answered
            return
        # A connection that never finishes its handshake would hold a file descriptor for ever;
        # enough of them and the agent could not dial its edge or write its state.
        self.timer = asyncio.get_running_loop().call_later(self.client.settings.handshake_timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info("socks handshake not completed in time: closed",
                     extra={"source": self.peer, "seconds": self.client.settings.handshake_timeout})
            self.transport.close()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.association is not None:
            return  # nothing more is expected on a UDP ASSOCIATE control connection: ignored
        self.buf += data
        if self._parse():
            self._stop_timer()
        elif len(self.buf) > MAX_HANDSHAKE:
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
        cmd = buf[1]
        try:
            parsed = parse_address(buf, 3)
        except ValueError as exc:
            self._fail(REP_ADDRESS, str(exc))
            return True
        if parsed is None:
            return False
        host, port, end = parsed
        rest = bytes(buf[end:])
        if cmd == CMD_UDP_ASSOCIATE:
            self._associate(host, port)
        elif cmd != CMD_CONNECT:
            self._fail(REP_COMMAND, f"SOCKS command {cmd} not supported (only CONNECT and UDP ASSOCIATE)")
        elif not host or port == 0:
            self._fail(REP_ADDRESS, "empty host or port 0")
        else:
            self._connect(host, port, rest)
        return True

    def _connect(self, host: str, port: int, rest: bytes) -> None:
        """Through the tunnel or directly (``capture.connect``); the reply code reports the outcome."""
        transport = self.transport
        assert transport is not None

        def result(code: str, reason: str) -> None:
            transport.write(reply(REPLY_FOR_CODE.get(code, REP_FAILURE) if code else REP_OK))

        connect(self.client, transport, (host, port), rest, result)

    # ------------------------------------------------------------------ UDP ASSOCIATE
    def _associate(self, host: str, port: int) -> None:
        transport = self.transport
        assert transport is not None
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        if not local or not peer:
            self._fail(REP_FAILURE, "no local address for the UDP relay")
            return
        announced_ip = "" if host in ("0.0.0.0", "::") else host
        try:
            if announced_ip:
                ipaddress.ip_address(announced_ip)
        except ValueError:
            self._fail(REP_ADDRESS, f"UDP ASSOCIATE names {host!r}: an address is expected (or all zeros)")
            return
        association = UdpAssociation(self.client, announced_ip or peer[0], port, self.peer)
        self.association = association
        self.buf.clear()

        async def bind() -> None:
            loop = asyncio.get_running_loop()
            try:
                udp, _ = await loop.create_datagram_endpoint(lambda: association, local_addr=(local[0], 0))
            except OSError as exc:
                self._fail(REP_FAILURE, f"cannot bind the UDP relay on {local[0]}: {exc.strerror or exc}")
                return
            if transport.is_closing():
                association.close("control connection closed")
                return
            bound = udp.get_extra_info("sockname")
            log.info("socks udp associate", extra={"source": self.peer, "relay": f"{bound[0]}:{bound[1]}"})
            transport.write(reply(REP_OK, bound[0], bound[1]))

        asyncio.get_running_loop().create_task(bind())

    def eof_received(self) -> bool | None:
        if self.association is not None:
            self.association.close("control connection closed")
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.association is not None:
            self.association.close("control connection closed")

    def _fail(self, code: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply(code))
        self._close(message)

    def _close(self, message: str) -> None:
        log.warning("socks request refused", extra={"source": self.peer, "reason": message})
        if self.transport is not None:
            self.transport.close()


class UdpAssociation(asyncio.DatagramProtocol):
    """The UDP relay of one UDP ASSOCIATE: one flow per destination, all ended with the
    control connection (``close``)."""

    def __init__(self, client: FlowOpener, client_ip: str, client_port: int, control: str) -> None:
        self.client = client
        self.client_ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
        self.client_port = client_port  # 0: fixed by the first datagram
        self.control = control
        self.app: tuple | None = None  # the client's UDP address, once known
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[tuple[str, int], UdpFlow | DirectUdp] = {}
        self.refused: dict[tuple[str, int], float] = {}  # destination -> not asked again before
        self.logged: set[tuple[str, int]] = set()  # destinations whose refusal was logged
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            transport.close()

    def _drop(self, reason: str, n: int = 1) -> None:
        stats = self.client.stats
        stats.count(stats.datagrams_dropped, reason, n)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.closed:
            return
        if self.app is None or addr[:2] != self.app[:2]:
            try:
                ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
            except ValueError:
                ip = None
            if (self.app is not None or ip != self.client_ip
                    or (self.client_port and addr[1] != self.client_port)):
                self._drop("socks_foreign_source")
                return
            self.app = addr
        if len(data) < 4 or data[0] or data[1]:
            self._drop("socks_bad_header")
            return
        if data[2] != 0:
            self._drop("socks_fragment")
            return
        try:
            parsed = parse_address(data, 3)
        except ValueError:
            parsed = None
        if parsed is None or not parsed[0] or parsed[1] == 0:
            self._drop("socks_bad_header")
            return
        host, port, end = parsed
        payload = data[end:]
        key = (host, port)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._new_flow(key)
            if flow is None:
                return
            flow.from_local(payload)  # queued until the flow is open
            if isinstance(flow, UdpFlow):
                self.client.open(flow)
            return
        flow.from_local(payload)

    def _new_flow(self, key: tuple[str, int]) -> UdpFlow | DirectUdp | None:
        client = self.client
        settings = client.settings
        loop = asyncio.get_running_loop()
        retry = self.refused.get(key)
        if retry is not None:
            if loop.time() < retry:
                self._drop("flow_refused")
                return None
            del self.refused[key]
        host, port = key
        if len(self.flows) >= settings.max_udp_flows:
            self._drop("too_many_udp_flows")
            self._log_refusal(key, "too_many_udp_flows",
                              f"the association carries its maximum of {settings.max_udp_flows} UDP flows")
            return None
        header = b"\x00\x00\x00" + pack_address(host) + struct.pack("!H", port)
        app = self.app
        transport = self.transport
        assert transport is not None and app is not None

        def send(data: bytes | memoryview) -> None:
            transport.sendto(b"".join((header, data)), app)

        flow: UdpFlow | DirectUdp
        if client.route(host, port, "udp") == "direct":
            flow = DirectUdp(client, host, port, send, self._closed)
        else:
            flow = UdpFlow(client, send, self._closed, idle=settings.udp_idle_timeout, queue=settings.udp_queue,
                           dest=key, peer=f"{app[0]}:{app[1]}")
            flow.on_opened = self._opened
        self.flows[key] = flow
        return flow

    def _log_refusal(self, key: tuple[str, int], code: str, reason: str) -> None:
        if key in self.logged:
            return
        if len(self.logged) >= MAX_REMEMBERED:
            self.logged.clear()
        self.logged.add(key)
        log.warning("socks udp destination refused", extra={"source": self.control, "dest": "%s:%s" % key,
                                                             "code": code, "reason": reason})

    def _opened(self, flow: UdpFlow, code: str, reason: str) -> None:
        """A refused destination: its queued datagrams are dropped (counted), and it is not asked
        for again for REFUSED_RETRY seconds."""
        if not code:
            return
        self._drop("flow_refused", len(flow.queue))
        key = flow.dest
        assert key is not None
        if len(self.refused) >= MAX_REMEMBERED:
            self.refused.clear()
        self.refused[key] = asyncio.get_running_loop().time() + REFUSED_RETRY
        self._log_refusal(key, code, reason)

    def _closed(self, flow: UdpFlow | DirectUdp) -> None:
        key = flow.dest if isinstance(flow, UdpFlow) else (flow.host, flow.port)
        if key is not None and self.flows.get(key) is flow:
            del self.flows[key]

    def error_received(self, exc: Exception) -> None:
        self._drop("local_error")  # e.g. ICMP port unreachable: the client's socket is gone

    def close(self, reason: str) -> None:
        """The control connection closed: every flow ends (RST through the tunnel), the relay closes."""
        if self.closed:
            return
        self.closed = True
        flows = list(self.flows.values())
        self.flows.clear()
        for flow in flows:
            flow.close("closed", f"SOCKS5 {reason}")
        if self.transport is not None:
            self.transport.close()
        log.info("socks udp association ended", extra={"source": self.control, "flows": len(flows),
                                                        "reason": reason})
