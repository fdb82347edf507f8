"""Fuzz targets for every parser a peer can reach (run with ``python -m fuzz``; see the README's "Fuzzing").

Each target is a module of this package with ``one_input(data: bytes)``: it feeds ``data`` to one
parser the way a peer's bytes reach it and checks that parser's contract: bad input ends in the
parser's own specific error (``ProtocolError``, a SOCKS/HTTP error answer, ``ProxyError``, a dropped
and counted DNS message, a 400), never in another exception type, a hang or unbounded memory. A
contract breach raises ``Finding`` (or lets the unexpected exception through): the fuzzer saves
the input and stops. ``corpus/<target>/`` holds each target's small seed inputs (and every
finding's input, kept as a regression seed).

This module imports nothing of the product, so the runner can instrument the product's modules
for coverage as the chosen target imports them.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# name -> (module, what it parses)
TARGETS: dict[str, tuple[str, str]] = {
    "frames": ("fuzz.t_frames", "tunnel frame bodies: the msgspec wire codec of every control frame and the preamble"),
    "tunnel": ("fuzz.t_tunnel", "a tunnel byte stream: frame reader and decoder, stream reassembly, flow state"),
    "quic": ("fuzz.t_quic", "Ferryman framing on QUIC: control and flow streams, DATAGRAM flow tags"),
    "control": ("fuzz.t_control", "control-plane request bodies (JSON into the API's request structs)"),
    "socks5": ("fuzz.t_socks5", "the client agent's SOCKS5 handshake and SOCKS UDP header"),
    "httpconnect": ("fuzz.t_httpconnect", "the client agent's HTTP CONNECT request head"),
    "dns": ("fuzz.t_dns", "DNS queries and answers: the client's resolver and the connector's query check"),
    "proxy": ("fuzz.t_proxy", "an egress proxy's answer to CONNECT, read by a node dialing through it"),
    "webhead": ("fuzz.t_webhead", "the web front door's HTTP/1.1 request heads"),
}

# Modules whose code is instrumented for coverage feedback.
INSTRUMENT = ["dataplane", "control", "dnslib", "h11", "fuzz"]


class Finding(AssertionError):
    """A parser broke its contract on this input."""


class Reader:
    """Splits one fuzz input into the pieces a target needs (sizes, choices, byte strings)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        return self.take(self.left())

    def chunks(self, payload: bytes) -> list[bytes]:
        """``payload`` split at sizes taken from the input (a split per byte read; 0: the rest)."""
        out = []
        pos = 0
        while pos < len(payload):
            size = self.byte()
            if size == 0:
                size = len(payload) - pos
            out.append(payload[pos:pos + size])
            pos += size
        return out


class RecordingTransport:
    """The transport a front end's asyncio Protocol writes to in a target: it keeps what was
    written and whether the connection was closed or paused (the socket under a real one)."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000),
                 local: tuple[str, int] = ("127.0.0.1", 1080)) -> None:
        self.written = bytearray()
        self.closed = False
        self.paused = False
        self._extra = {"peername": peer, "sockname": local}

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._extra.get(name, default)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise Finding("write after close")
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass
