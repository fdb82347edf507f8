"""A UDP socket on the event loop, with segmentation offload where the kernel has it.

``UdpEndpoint`` takes the place of an asyncio datagram transport (for QUIC tunnels, UDP port
forwards and the connector's backend sockets): the calls they make (``sendto``, ``close``,
``is_closing``, ``get_extra_info``) plus ``send_batch``, ``send_all`` and ``send_train`` (a
GRO buffer sent back as the datagrams it holds), which hand the kernel many datagrams at once:

- **GSO** (``UDP_SEGMENT``, Linux 4.18+): consecutive datagrams of one size to one address
  leave in one ``sendmsg`` that the kernel (or the NIC) cuts into packets; a shorter last
  datagram ends the run. Where the kernel refuses it (``ENOPROTOOPT``, ``EINVAL``, ``EIO``
  on a device without checksum offload), the endpoint falls back to one ``sendto`` per
  datagram for good and logs it once;
- **GRO** (``UDP_GRO``, Linux 5.0+): the kernel coalesces packets from one source into one
  buffer with their segment size in a control message; ``UdpEndpoint`` hands it whole to a
  protocol that has ``segments_received(buffer, segment_size, addr)`` (a QUIC engine takes
  such a train in one call) or cuts it back into datagrams. Without it each read is one
  datagram. Either way a readable socket is read
  until empty (up to ``READ_BUDGET`` reads) in one loop callback.

The same endpoint serves the UDP sockets that face apps and backends (the client agent's UDP
forwards, the connector's per-flow backend sockets): the datagrams one tunnel read brings for a
flow leave in ``send_all`` runs, one system call per run instead of one per datagram.

A send the kernel cannot take now (``EAGAIN``: the socket buffer is full) is dropped and
counted (``send_drops``, and ``on_send_drop(n)`` when given); QUIC's loss recovery resends what
mattered, and an app's UDP has no more promise than the network's. ICMP errors (a refused
port on a connected socket) reach the protocol's ``error_received``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger("ferryman.quic")

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
MAX_GSO_BYTES = 65000  # one sendmsg: below the 64 KiB IP payload limit
READ_SIZE = 65535 + 1024
READ_BUDGET = 64  # reads per readable callback before other work gets a turn
_CMSG_SPACE = socket.CMSG_SPACE(4)
_INT = struct.Struct("=i")
_U16 = struct.Struct("=H")
_GSO_REFUSED = (errno.ENOPROTOOPT, errno.EINVAL, errno.EIO, errno.EOPNOTSUPP)


class UdpEndpoint:
    """One non-blocking UDP socket served by the loop for ``protocol`` (an ``asyncio.DatagramProtocol``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any, *,
                 gso: bool = True, gro: bool = True, on_send_drop: Callable[[int], None] | None = None) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._closing = False
        self._connected = False
        self._peer: Any = None
        try:
            self._peer = sock.getpeername()
            self._connected = True
        except OSError:
            pass
        self.gso = gso and _probe(sock, UDP_SEGMENT, 0)
        self.gro = gro and _probe(sock, UDP_GRO, 1)
        self.send_drops = 0
        self._on_send_drop = on_send_drop
        self.coalesced_reads = 0  # reads that returned several datagrams (GRO)
        # a protocol that takes a coalesced buffer whole: segments_received(buffer, segment_size, addr)
        self._segments = getattr(protocol, "segments_received", None)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)
        protocol.connection_made(self)

    # ------------------------------------------------------------------ asyncio transport calls
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def sendto(self, data: bytes | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            if addr is None or self._connected:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except BlockingIOError:
            self._dropped(1)
        except OSError as exc:
            self._protocol.error_received(exc)

    def _dropped(self, n: int) -> None:
        self.send_drops += n
        if self._on_send_drop is not None:
            self._on_send_drop(n)

    # ------------------------------------------------------------------ batches
    def send_batch(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send ``(data, addr)`` datagrams in order: each run to one address goes to ``send_all``."""
        if self._closing or not datagrams:
            return
        if not self.gso or len(datagrams) == 1:
            for data, addr in datagrams:
                self.sendto(data, addr)
            return
        i, n = 0, len(datagrams)
        while i < n and not self._closing:
            addr = datagrams[i][1]
            j = i + 1
            while j < n and datagrams[j][1] == addr:
                j += 1
            self.send_all([d for d, _a in datagrams[i:j]], addr)
            i = j

    def send_all(self, parts: list[bytes], addr: Any = None) -> None:
        """Send datagrams to one address (``None``: the connected peer) in order, each run of one
        size (a shorter datagram ends a run) in one GSO ``sendmsg``."""
        if self._closing or not parts:
            return
        if not self.gso or len(parts) == 1:
            for data in parts:
                self.sendto(data, addr)
            return
        i, n = 0, len(parts)
        while i < n:
            size = len(parts[i])
            j = i + 1
            total = size
            # (an empty datagram is never in a run: the kernel cuts a run by bytes, so it would vanish)
            while (size and j < n and j - i < MAX_SEGMENTS and 0 < len(parts[j]) <= size
                   and total + len(parts[j]) <= MAX_GSO_BYTES):
                total += len(parts[j])
                j += 1
                if len(parts[j - 1]) < size:
                    break  # a shorter datagram ends a run
            if j - i == 1:
                self.sendto(parts[i], addr)
            else:
                self._send_segments(parts[i:j], size, addr)
            if self._closing:
                return
            i = j

    def send_train(self, buffer: bytes | memoryview, segment: int, addr: Any = None) -> None:
        """Send ``buffer`` as the datagrams of ``segment`` bytes it holds (the last one may be
        shorter), as a GRO read delivered them: in GSO ``sendmsg`` calls of at most
        ``MAX_SEGMENTS`` datagrams and ``MAX_GSO_BYTES``, or one by one without GSO."""
        if self._closing or segment <= 0:
            return
        view = memoryview(buffer)
        step = segment * max(1, min(MAX_SEGMENTS, MAX_GSO_BYTES // segment)) if self.gso else segment
        for start in range(0, len(view), step):
            chunk = view[start:start + step]
            if len(chunk) <= segment:
                self.sendto(chunk, addr)
            else:
                self._send_segments([chunk], segment, addr)
            if self._closing:
                return

    def _send_segments(self, parts: Sequence[bytes | memoryview], size: int, addr: Any) -> None:
        control = [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
        try:
            if self._connected or addr is None:
                self._sock.sendmsg(parts, control)
            else:
                self._sock.sendmsg(parts, control, 0, addr)
        except BlockingIOError:
            self._dropped(len(parts))
        except OSError as exc:
            if exc.errno in _GSO_REFUSED:
                self.gso = False
                log.info("UDP segmentation offload refused by the kernel; sending datagrams one by one",
                         extra={"reason": exc.strerror})
                for part in _datagrams(parts, size):
                    self.sendto(part, addr)
            else:
                # e.g. an ICMP error an earlier datagram caused, reported on this send: it is
                # consumed now, so the run goes out one by one (each failure reported) rather
                # than the whole run being lost for one report
                self._protocol.error_received(exc)
                for part in _datagrams(parts, size):
                    if self._closing:
                        return
                    self.sendto(part, addr)

    # ------------------------------------------------------------------ receiving
    def _readable(self) -> None:
        sock, protocol = self._sock, self._protocol
        for _ in range(READ_BUDGET):
            if self._closing:
                return
            try:
                if self.gro:
                    data, ancdata, _flags, addr = sock.recvmsg(READ_SIZE, _CMSG_SPACE)
                elif self._connected:  # only the peer's datagrams arrive: no address to decode each time
                    data, addr, ancdata = sock.recv(READ_SIZE), self._peer, None
                else:
                    data, addr = sock.recvfrom(READ_SIZE)
                    ancdata = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            segment = 0
            if ancdata:
                for level, kind, value in ancdata:
                    if level == SOL_UDP and kind == UDP_GRO:
                        segment = _INT.unpack(value[:4])[0]
            if segment and len(data) > segment:
                self.coalesced_reads += 1
                if self._segments is not None:
                    self._segments(data, segment, addr)
                    continue
                view = memoryview(data)
                for start in range(0, len(data), segment):
                    protocol.datagram_received(bytes(view[start:start + segment]), addr)
                    if self._closing:
                        return
            else:
                protocol.datagram_received(data, addr)


def _datagrams(parts: Sequence[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    """The datagrams a GSO send of ``parts`` cut at ``size`` bytes would make: each part (a
    ``send_train`` chunk holds several) cut at ``size``."""
    for part in parts:
        if len(part) <= size:
            yield part
        else:
            for start in range(0, len(part), size):
                yield part[start:start + size]


def _probe(sock: socket.socket, option: int, value: int) -> bool:
    """Whether the kernel knows the UDP socket option (and takes ``value`` for it)."""
    try:
        if option == UDP_SEGMENT:
            sock.getsockopt(SOL_UDP, option)
        else:
            sock.setsockopt(SOL_UDP, option, value)
        return True
    except OSError:
        return False


async def udp_listener(host: str, port: int, protocol: Any, *, buffer: int,
                       on_send_drop: Callable[[int], None] | None = None) -> UdpEndpoint:
    """A UDP socket bound to ``host:port`` (the first address ``host`` resolves to), served on the
    loop for ``protocol``: an app-facing listener such as a UDP port forward."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    failure: OSError | None = None
    for family, _type, _proto, _name, sockaddr in infos:  # the first address that binds
        try:
            sock = udp_socket(family, bind=sockaddr, buffer=buffer)
            break
        except OSError as exc:
            failure = exc
    else:
        assert failure is not None
        raise failure
    try:
        return UdpEndpoint(loop, sock, protocol, gro=False, on_send_drop=on_send_drop)
    except BaseException:
        sock.close()
        raise


def udp_socket(family: int, *, bind: Any = None, connect: Any = None, reuse_port: bool = False,
               buffer: int = 0) -> socket.socket:
    """A non-blocking UDP socket, bound and/or connected, with ``buffer``-byte kernel buffers asked for."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if buffer:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, buffer)
                except OSError as exc:
                    log.warning("cannot set a UDP socket buffer", extra={"size": buffer, "reason": exc.strerror})
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
