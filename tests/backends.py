"""Private backends for the end-to-end tests, each run as its own uvloop process.

``python -m tests.backends MODE --port P`` (or ``python tests/backends.py ...``; port 0
picks a free one) listens on 127.0.0.1, prints ``listening PORT`` once bound, then one
JSON line per connection event on stdout, so a test can see what the backend saw::

    {"ev": "open", "id": 1, "peer": "127.0.0.1:40000"}
    {"ev": "eof", "id": 1, "bytes": 8388608, "sha256": "..."}        the peer half-closed
    {"ev": "lost", "id": 1, "bytes": 8388608, "sha256": "...", "error": "ConnectionResetError"}

``error`` is empty for an orderly close. ``bytes``/``sha256`` cover every byte received
(for ``source`` and ``source-half``: every byte after the 40-byte request).

Modes:

- ``echo``: send back every byte; an EOF from the peer is echoed as ``write_eof`` after
  the echoed bytes (half-close aware), then the backend closes.
- ``sha``: read until EOF, answer the sha256 hex digest (64 ASCII bytes) of all of it, close.
- ``source``: the peer sends an 8-byte big-endian N and a 32-byte seed; the backend sends
  ``source_bytes(N, seed)`` and closes.
- ``source-half``: like ``source`` but half-closes (``write_eof``) after the N bytes and
  keeps reading until the peer's EOF (logged with the digest of what came after the request).
- ``hold``: accepts and never reads (head-of-line tests).
- ``rst``: reads 1 byte, then resets the connection (SO_LINGER 0 + close).
- ``udp-echo`` (UDP): sends every datagram back to its sender; the first datagram of each
  sender is reported as ``{"ev": "udp", "peer": ..., "bytes": ...}``.
- ``dns`` (UDP): a private DNS server for ``corp.example``: ``NAME.corp.example`` A
  queries are answered with ``dns_address(NAME)`` (TTL 60), anything else with NXDOMAIN;
  each query is reported as ``{"ev": "dns", "peer": ..., "name": ...}``.

``start_backend(mode)`` starts one as a subprocess and returns a ``Backend`` handle once
it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

MODES = ("echo", "sha", "source", "source-half", "hold", "rst", "udp-echo", "dns")
SOURCE_REQUEST = struct.Struct("!Q32s")
_LINGER_RESET = struct.pack("ii", 1, 0)
_CHUNK = 1 << 20


def source_bytes(n: int, seed: bytes) -> bytes:
    """The N deterministic pseudo-random bytes the ``source`` modes send for ``seed``."""
    return random.Random(seed).randbytes(n)


def source_request(n: int, seed: bytes) -> bytes:
    return SOURCE_REQUEST.pack(n, seed)


# ---------------------------------------------------------------------------- server side
class _Conn(asyncio.Protocol):
    counter = 0

    def __init__(self, mode: str) -> None:
        _Conn.counter += 1
        self.id = _Conn.counter
        self.mode = mode
        self.transport: asyncio.Transport | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.head = bytearray()
        self.got_eof = False
        self.sent_eof = False
        self.source: memoryview | None = None
        self.source_pos = 0
        self.write_paused = False

    @staticmethod
    def emit(**fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=1 << 20, low=256 << 10)  # type: ignore[attr-defined]
        self.emit(ev="open", id=self.id, peer=f"{peer[0]}:{peer[1]}", mode=self.mode)
        if self.mode == "hold":
            # uvloop starts reading after connection_made returns, even when paused here:
            # pause once it has started (and again in data_received should a read slip in).
            transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_soon(self._hold)

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if self.mode == "rst":
            self._count(data[:1])
            self._reset()
            return
        if self.mode == "hold":
            self._count(data)
            self._hold()
            return
        if self.mode in ("source", "source-half") and self.source is None:
            need = SOURCE_REQUEST.size - len(self.head)
            self.head += data[:need]
            data = data[need:]
            if len(self.head) < SOURCE_REQUEST.size:
                return
            n, seed = SOURCE_REQUEST.unpack(self.head)
            self.source = memoryview(source_bytes(n, seed))
            self._count(data)
            self._pump()
            return
        self._count(data)
        if self.mode == "echo":
            t.write(data)
            if self.write_paused:
                t.pause_reading()

    def eof_received(self) -> bool:
        self.got_eof = True
        self.emit(ev="eof", id=self.id, bytes=self.received, sha256=self.digest.hexdigest())
        t = self.transport
        assert t is not None
        if self.mode == "echo":
            # Everything received is already echoed (or buffered): pass the EOF on, and
            # close, which sends what is still buffered first.
            t.write_eof()
            self.sent_eof = True
            t.close()
            return True
        if self.mode == "sha":
            t.write(self.digest.hexdigest().encode())
            t.close()
            return True
        if self.mode in ("source", "source-half") and self.source is not None \
                and self.source_pos < len(self.source):
            return True  # keep sending; _pump closes once everything is out
        t.close()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.mode == "echo":
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.mode == "echo" and not self.got_eof:
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.source is not None:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.emit(ev="lost", id=self.id, bytes=self.received, sha256=self.digest.hexdigest(),
                  error=type(exc).__name__ if exc else "")

    # -- helpers
    def _count(self, data: bytes) -> None:
        if data:
            self.received += len(data)
            self.digest.update(data)

    def _pump(self) -> None:
        t = self.transport
        src = self.source
        assert t is not None and src is not None
        while self.source_pos < len(src) and not self.write_paused and not t.is_closing():
            end = min(self.source_pos + _CHUNK, len(src))
            t.write(src[self.source_pos:end])
            self.source_pos = end
        if self.source_pos < len(src) or t.is_closing():
            return
        if self.mode == "source":
            t.close()
        elif not self.sent_eof:
            self.sent_eof = True
            t.write_eof()
            if self.got_eof:
                t.close()

    def _hold(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.is_reading():
            t.pause_reading()

    def _reset(self) -> None:
        t = self.transport
        assert t is not None
        sock = t.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        t.abort()


def dns_address(label: str) -> str:
    """The IPv4 address the ``dns`` backend gives ``LABEL.corp.example``."""
    digest = hashlib.sha256(label.encode()).digest()
    return f"10.{digest[0]}.{digest[1]}.{digest[2] or 1}"


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: set[tuple] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        assert self.transport is not None
        peer = f"{addr[0]}:{addr[1]}"
        if self.mode == "udp-echo":
            if addr not in self.peers:
                self.peers.add(addr)
                _emit({"ev": "udp", "peer": peer, "bytes": len(data)})
            self.transport.sendto(data, addr)
            return
        from dnslib import QTYPE, RCODE, RR, A, DNSRecord

        try:
            query = DNSRecord.parse(data)
        except Exception as exc:  # a test sent garbage on purpose: say so, answer nothing
            _emit({"ev": "dns_error", "peer": peer, "error": str(exc)})
            return
        name = str(query.q.qname).rstrip(".").lower()
        _emit({"ev": "dns", "peer": peer, "name": name})
        reply = query.reply()
        label, _, zone = name.partition(".")
        if zone == "corp.example" and query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(dns_address(label)), ttl=60))
        elif zone != "corp.example":
            reply.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(reply.pack(), addr)


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def serve(mode: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if mode in ("udp-echo", "dns"):
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(mode), local_addr=(host, port))
        sys.stdout.write(f"listening {transport.get_extra_info('sockname')[1]}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()
        return
    server = await loop.create_server(lambda: _Conn(mode), host, port, backlog=1024, reuse_address=True)
    sys.stdout.write(f"listening {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="test backends for Ferryman end-to-end tests")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    import uvloop

    try:
        uvloop.run(serve(args.mode, args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------------------- test side
class Backend:
    """A running backend process: its port and the events it reported."""

    def __init__(self, mode: str, proc: subprocess.Popen[str], port: int) -> None:
        self.mode = mode
        self.proc = proc
        self.port = port
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.events.put(json.loads(line))

    def wait_event(self, ev: str, timeout: float = 10.0, **match: object) -> dict:
        """The first event named ``ev`` (with fields equal to ``match``), waiting for it."""
        for e in self.seen:
            if e["ev"] == ev and all(e.get(k) == v for k, v in match.items()):
                return e
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"backend {self.mode}: no {ev!r} event {match} within {timeout:g}s; "
                                   f"saw {self.seen}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(e)
            if e["ev"] == ev and all(e.get(k) == v for k, v in match.items()):
                return e

    def drain_events(self) -> list[dict]:
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return list(self.seen)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no backend outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_backend(mode: str, port: int = 0, timeout: float = 10.0) -> Backend:
    """Start ``python tests/backends.py MODE`` and return once it listens."""
    if mode not in MODES:
        raise ValueError(f"unknown backend mode {mode!r}")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mode, "--port", str(port)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    # The first line is "listening PORT"; readline blocks, so guard it with a timer.
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    if not line.startswith("listening ") or time.monotonic() > deadline:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"backend {mode} did not start (first line {line!r}, exit {proc.poll()})")
    return Backend(mode, proc, int(line.split()[1]))


if __name__ == "__main__":
    sys.exit(main())
