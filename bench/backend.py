"""The benchmark's private backend: echo, sink and source server, run as its own process.

``python -m bench.backend --port P`` (0 picks a free port) serves 127.0.0.1 on uvloop and
prints ``listening PORT`` once bound. Every connection starts with a 9-byte header, a mode
byte and a big-endian u64 length:

- ``E`` echo: send back every byte received (the length is ignored);
- ``U`` sink: read ``length`` bytes, then answer their count as a u64;
- ``D`` source: send ``length`` bytes, then close;
- ``S`` stats: answer the counters below as JSON and close (not itself counted).

The counters (flows per mode, flows open now, payload bytes in and out) let the bench
check that what it measured through a proxy really reached the backend.

``--udp-port P`` (0 picks one) also serves a UDP echo on 127.0.0.1: every datagram goes
back to its sender unchanged; it then prints ``listening PORT UDPPORT``. Like a well-built UDP
server on Linux it reads with GRO and answers with GSO (``dataplane.transport.udpio``): a
train of datagrams a sender handed the kernel in one call is read in one call and goes back
in one, so the echo takes little of the CPU the paths under test share. The bench runs
this as a second backend process, so UDP load never shares a loop with TCP. Its counters
(``udp`` in the stats: datagrams and bytes in and out, distinct senders, send errors)
come through the TCP ``S`` request like the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys

import uvloop

from dataplane.transport.udpio import UdpEndpoint, udp_socket

from .procfs import raise_nofile_limit

HEADER = struct.Struct("!cQ")
ECHO, SINK, SOURCE, STATS = b"E", b"U", b"D", b"S"
COUNTED_MODES = (ECHO, SINK, SOURCE)
SOURCE_CHUNK = os.urandom(1 << 20)
SCRATCH = memoryview(bytearray(256 * 1024))
UDP_BUFFER = 4 << 20  # the app's socket buffers (capped by net.core.[rw]mem_max); paths keep their own


def header(mode: bytes, length: int = 0) -> bytes:
    return HEADER.pack(mode, length)


class Counters:
    def __init__(self) -> None:
        self.flows = {mode.decode(): 0 for mode in COUNTED_MODES}
        self.bad_headers = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.udp: UdpEcho | None = None

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {"flows": dict(self.flows), "bad_headers": self.bad_headers, "active": self.active,
                                   "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        if self.udp is not None:
            snap["udp"] = self.udp.snapshot()
        return snap


class UdpEcho:
    """UDP echo: every datagram back to its sender, counted (senders by address)."""

    def __init__(self) -> None:
        self.transport: UdpEndpoint
        self.datagrams_in = self.datagrams_out = self.bytes_in = self.bytes_out = 0
        self.send_errors = 0
        self.senders: set[tuple] = set()

    def connection_made(self, transport: UdpEndpoint) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.datagrams_in += 1
        self.bytes_in += len(data)
        if addr not in self.senders:
            self.senders.add(addr)
        self.transport.sendto(data, addr)
        self.datagrams_out += 1
        self.bytes_out += len(data)

    def segments_received(self, buffer: bytes, segment: int, addr: tuple) -> None:
        """A GRO read: datagrams of ``segment`` bytes (the last may be shorter), echoed as such."""
        count = -(-len(buffer) // segment)
        self.datagrams_in += count
        self.bytes_in += len(buffer)
        if addr not in self.senders:
            self.senders.add(addr)
        self.transport.send_train(buffer, segment, addr)
        self.datagrams_out += count
        self.bytes_out += len(buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1  # e.g. ICMP unreachable: a sender's socket closed

    def snapshot(self) -> dict[str, int]:
        sock = self.transport.get_extra_info("socket")
        return {"datagrams_in": self.datagrams_in, "datagrams_out": self.datagrams_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "senders": len(self.senders),
                "send_errors": self.send_errors, "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}


class BackendProtocol(asyncio.BufferedProtocol):
    """One backend connection; reads into a shared scratch buffer and copies only what it echoes."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.transport: asyncio.Transport
        self.head = bytearray()
        self.mode = b""
        self.length = 0
        self.remaining = 0
        self.paused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport  # uvloop has set TCP_NODELAY already
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def get_buffer(self, sizehint: int) -> memoryview:
        return SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        data = SCRATCH[:nbytes]
        if not self.mode:
            need = HEADER.size - len(self.head)
            self.head += data[:need]
            data = data[need:]
            if len(self.head) < HEADER.size:
                return
            self._start(*HEADER.unpack(self.head))
        if data and self.mode in (ECHO, SINK):
            self.counters.bytes_in += len(data)
            if self.mode == ECHO:
                self.counters.bytes_out += len(data)
                self.transport.write(bytes(data))
            else:
                self._sink(len(data))

    def _start(self, mode: bytes, length: int) -> None:
        transport = self.transport
        if mode == STATS:
            transport.write(json.dumps(self.counters.snapshot()).encode())
            transport.close()
            return
        if mode not in COUNTED_MODES:
            self.counters.bad_headers += 1
            transport.abort()
            return
        self.mode = mode
        self.counters.flows[mode.decode()] += 1
        self.counters.active += 1
        self.length = self.remaining = length
        if mode == SOURCE:
            self._fill()
        elif mode == SINK and length == 0:
            transport.write(struct.pack("!Q", 0))

    def _sink(self, nbytes: int) -> None:
        """Count sunk bytes; answer the total once ``length`` bytes have arrived."""
        before = self.remaining
        self.remaining -= nbytes
        if before > 0 >= self.remaining:
            self.transport.write(struct.pack("!Q", self.length - self.remaining))

    def _fill(self) -> None:
        chunk = memoryview(SOURCE_CHUNK)
        while self.remaining > 0 and not self.paused:
            n = min(self.remaining, len(chunk))
            self.transport.write(chunk[:n])
            self.remaining -= n
            self.counters.bytes_out += n
        if self.remaining == 0:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        if self.mode == ECHO:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == SOURCE:
            self._fill()
        elif self.mode == ECHO:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.mode:
            self.counters.active -= 1


def query_stats(port: int, timeout: float = 10.0) -> dict:
    """Read the counters of the backend on 127.0.0.1:``port`` (a blocking helper for the bench)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(header(STATS))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


async def serve(port: int, udp_port: int | None = None) -> None:
    counters = Counters()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: BackendProtocol(counters), "127.0.0.1", port, backlog=8192)
    line = f"listening {server.sockets[0].getsockname()[1]}"
    if udp_port is not None:
        counters.udp = UdpEcho()
        sock = udp_socket(socket.AF_INET, bind=("127.0.0.1", udp_port), buffer=UDP_BUFFER)
        transport = UdpEndpoint(loop, sock, counters.udp)
        line += f" {transport.get_extra_info('sockname')[1]}"
    print(line, flush=True)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0: pick one)")
    parser.add_argument("--udp-port", type=int, default=None, help="also a UDP echo on 127.0.0.1 (0: pick one)")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    try:
        uvloop.run(serve(args.port, args.udp_port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
