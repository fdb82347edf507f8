"""The floor of the web path's shape in Python: what browser -> edge -> tunnel -> connector ->
backend costs on uvloop with none of the edge's work in it.

``python -m bench.web_floor connector --cert C --key K --listen PORT --backend PORT`` and
``python -m bench.web_floor edge --ca CA --cert C --key K --listen PORT --tunnel PORT``: two processes
shaped like the fabric's web path, each a handful of asyncio protocol callbacks (no coroutine
per request, no object per request beyond the parsers' own):

- the edge terminates the client's TLS (uvloop), parses each request head with httptools,
  writes a new head (internal ``Host``, ``Cookie`` removed, ``X-Forwarded-For`` added) into one
  TLS connection to the connector, framed as ``stream id, length, payload`` (8 bytes), and
  copies every response byte back to its client while httptools' response parser follows
  the framing;
- the connector reads the frames and keeps one keep-alive TCP connection to the backend per
  stream, sending the backend's bytes back in frames of their own.

What it leaves out is everything the fabric's web path is for: sign-in, the session cookie,
per-request authorization and assertion, traffic records, limits, timeouts, flow control and
back-pressure (nothing here bounds a buffer: it is a measuring stick for a benchmark on
loopback, never something to put in front of anyone). ``bench.web_fabric`` runs it next to the
fabric and nginx, so the table shows how much of the fabric's cost per request is the shape
(two TLS hops, framing, three event loops) and how much is the edge's own per-request work.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import struct
import sys

import httptools
import uvloop

_FRAME = struct.Struct("!II")  # stream id, payload length


def _frames(buffer: bytearray, deliver) -> None:
    """Hand every whole frame at the start of ``buffer`` to ``deliver(stream, payload)`` and cut
    them off (bytes arrive in TLS records of 16 KiB: a frame is copied once, when it is whole)."""
    at, end = 0, len(buffer)
    with memoryview(buffer) as view:
        while end - at >= 8:
            stream, size = _FRAME.unpack_from(view, at)
            if end - at - 8 < size:
                break
            deliver(stream, bytes(view[at + 8:at + 8 + size]))
            at += 8 + size
    if at:
        del buffer[:at]


# ---------------------------------------------------------------- connector
class _Backend(asyncio.Protocol):
    def __init__(self, tunnel: _ConnectorTunnel, stream: int) -> None:
        self.tunnel, self.stream = tunnel, stream
        self.transport: asyncio.Transport | None = None
        self.waiting: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        for payload in self.waiting:
            transport.write(payload)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        self.tunnel.transport.write(_FRAME.pack(self.stream, len(data)) + data)

    def send(self, payload: bytes) -> None:
        if self.transport is None:
            self.waiting.append(payload)
        else:
            self.transport.write(payload)


class _ConnectorTunnel(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.buffer = bytearray()
        self.streams: dict[int, _Backend] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        _frames(self.buffer, self._frame)

    def _frame(self, stream: int, payload: bytes) -> None:
        backend = self.streams.get(stream)
        if backend is None:
            backend = self.streams[stream] = _Backend(self, stream)
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(lambda: backend, "127.0.0.1", self.backend_port))
        backend.send(payload)


# ---------------------------------------------------------------- edge
class _ResponseFraming:
    """httptools' response parser needs callbacks to follow a keep-alive connection's responses."""

    def on_message_complete(self) -> None:
        pass


class _Client(asyncio.Protocol):
    def __init__(self, tunnel: _EdgeTunnel) -> None:
        self.tunnel = tunnel
        self.url = b""
        self.headers: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stream = self.tunnel.add(self)
        self.requests = httptools.HttpRequestParser(self)
        self.responses = httptools.HttpResponseParser(_ResponseFraming())
        peer = transport.get_extra_info("peername")
        self.forwarded = b"x-forwarded-for: " + peer[0].encode() + b"\r\n\r\n"

    def data_received(self, data: bytes) -> None:
        try:
            self.requests.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in (b"host", b"cookie", b"connection"):
            self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        head = b"".join([self.requests.get_method(), b" ", self.url, b" HTTP/1.1\r\nhost: backend\r\n",
                         *self.headers, self.forwarded])
        self.headers = []
        self.tunnel.send(self.stream, head)

    def response(self, payload: bytes) -> None:
        self.responses.feed_data(payload)
        self.transport.write(payload)

    def connection_lost(self, exc) -> None:
        self.tunnel.clients.pop(self.stream, None)


class _EdgeTunnel(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.clients: dict[int, _Client] = {}
        self.last = 0
        self.out: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def add(self, client: _Client) -> int:
        self.last += 1
        self.clients[self.last] = client
        return self.last

    def send(self, stream: int, payload: bytes) -> None:
        if not self.out:  # one write per event loop turn for everything sent in it
            asyncio.get_running_loop().call_soon(self._flush)
        self.out += (_FRAME.pack(stream, len(payload)), payload)

    def _flush(self) -> None:
        self.transport.write(b"".join(self.out))
        self.out = []

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        _frames(self.buffer, self._frame)

    def _frame(self, stream: int, payload: bytes) -> None:
        client = self.clients.get(stream)
        if client is not None:
            client.response(payload)


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(args.cert, args.key)
    if args.role == "connector":
        server = await loop.create_server(lambda: _ConnectorTunnel(args.backend), "127.0.0.1", args.listen,
                                          ssl=server_tls)
    else:
        client_tls = ssl.create_default_context(cafile=args.ca)
        _, tunnel = await loop.create_connection(_EdgeTunnel, "127.0.0.1", args.tunnel, ssl=client_tls,
                                                 server_hostname="localhost")
        server = await loop.create_server(lambda: _Client(tunnel), "127.0.0.1", args.listen, ssl=server_tls)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_floor", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("edge", "connector"))
    parser.add_argument("--ca", help="edge: the CA file that verifies the connector's certificate")
    parser.add_argument("--cert", required=True, help="PEM certificate for localhost (both TLS hops)")
    parser.add_argument("--key", required=True)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--backend", type=int, default=0, help="connector: the backend's port")
    parser.add_argument("--tunnel", type=int, default=0, help="edge: the connector's port")
    args = parser.parse_args(argv)
    if (args.role == "connector") != bool(args.backend) or (args.role == "edge") != bool(args.tunnel and args.ca):
        parser.error("a connector needs --backend, an edge --tunnel and --ca")
    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
