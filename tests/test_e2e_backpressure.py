"""Back-pressure on every TLS/TCP tunnel: a peer that sends but never reads stops being read.

An authenticated client (a real TLS connection with the fabric's client certificate,
speaking the wire protocol by hand) sends PINGs as fast as it can and never reads the
PONGs. Every PING makes the edge write a PONG; without back-pressure the edge reads
everything and keeps every PONG in memory (200 MiB of PINGs grew an edge from 51 to
338 MiB). With it, once the edge's write buffer to that peer passes
``FERRYMAN_WRITE_BUFFER_HIGH`` the edge stops reading the peer
(``ferryman_tunnel_read_pauses_total``), the peer's sends stall, and the edge's memory
stays bounded (measured from /proc while sending). The real client agent's flows through
the same edge go on meanwhile.

The same peer can also try to make the edge hold what it does not read: it announces the
largest window the protocol allows (so every byte for it fits its credit), opens a flow to
a backend that sends 192 MiB, and reads nothing. The edge passes on only what its tunnel to
that peer takes, holds the rest unacknowledged (the connector's credit, and the edge's own
window, bound it), and its memory stays bounded.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

import pytest

from dataplane.wire.frames import (
    HEADER, HEADER_SIZE, PREAMBLE_SIZE, FrameType, Hello, Open, encode_control, encode_header, encode_ping,
    encode_preamble,
)
from backends import source_request

TOTAL = 200 * 1024 * 1024  # bytes of PINGs the peer tries to send
BLOCK = encode_ping(FrameType.PING, 1.0) * (1024 * 1024 // 16)  # 1 MiB of PING frames
GROWTH_LIMIT = 48 * 1024 * 1024  # what the edge may grow by (its write buffer limit is 1 MiB)
STALL = 3.0  # seconds without progress: the edge no longer reads us


def client_context(pki_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(pki_dir / "ca.pem"))
    ctx.load_cert_chain(str(pki_dir / "client-1.pem"), str(pki_dir / "client-1.key"))
    return ctx


@pytest.mark.timeout(90)
def test_a_peer_that_never_reads_stops_being_read(fabric, backend, xfer) -> None:  # type: ignore[no-untyped-def]
    echo = backend("echo")
    fab = fabric([echo], env={"FERRYMAN_KEEPALIVE_INTERVAL": "30"})
    edge_pid = fab.pids["edge-1"]
    raw = socket.create_connection(("127.0.0.1", fab.edge_port), timeout=5)
    sock = client_context(Path(fab.workdir) / "pki").wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(encode_preamble() + encode_control(0, Hello(role="client", node="client-1", max_frame=262144,
                                                              window=524288, max_flows=64)))
    time.sleep(0.5)  # the edge has read our HELLO; from now on we never read anything
    before = xfer.rss_bytes(edge_pid)
    peak = before
    sent = 0
    sock.settimeout(STALL)
    started = time.monotonic()
    try:
        while sent < TOTAL:
            try:
                sock.sendall(BLOCK)
            except (TimeoutError, socket.timeout, ssl.SSLWantWriteError):
                break  # no progress for STALL seconds: the edge stopped reading us
            sent += len(BLOCK)
            rss = xfer.rss_bytes(edge_pid)
            peak = max(peak, rss)
            assert rss - before < GROWTH_LIMIT, (
                f"edge grew by {(rss - before) >> 20} MiB after {sent >> 20} MiB of PINGs that were never read")
        elapsed = time.monotonic() - started
        rss = xfer.rss_bytes(edge_pid)
        peak = max(peak, rss)
        print(f"edge RSS {before >> 20} MiB before, peak {peak >> 20} MiB; the peer sent {sent >> 20} MiB of "
              f"PINGs in {elapsed:.1f}s before the edge stopped reading it")
        assert sent < TOTAL, "the edge read 200 MiB of PINGs from a peer that never read a PONG"
        assert peak - before < GROWTH_LIMIT
        samples = xfer.scrape(fab.metrics["edge-1"])
        assert xfer.metric(samples, "ferryman_tunnel_read_pauses_total") >= 1
        # The edge serves everyone else meanwhile: a flow of the real client agent, end to end.
        payload = os.urandom(256 * 1024)
        assert xfer.echo(fab.forward_ports[0], payload, timeout=10) == payload
    finally:
        sock.close()


def _read_until_open_ok(sock: ssl.SSLSocket, flow_id: int) -> None:
    """Read the edge's frames (preamble, HELLO, ...) up to OPEN_OK for ``flow_id``."""
    buf = b""
    sock.settimeout(10)
    while True:
        while len(buf) < PREAMBLE_SIZE + HEADER_SIZE:
            buf += sock.recv(65536)
        pos = PREAMBLE_SIZE
        while pos + HEADER_SIZE <= len(buf):
            ftype, _flags, fid, length = HEADER.unpack_from(buf, pos)
            if ftype == FrameType.OPEN_FAIL and fid == flow_id:
                raise AssertionError(f"the edge refused the flow: {buf[pos + HEADER_SIZE:pos + HEADER_SIZE + length]!r}")
            if ftype == FrameType.OPEN_OK and fid == flow_id:
                return
            pos += HEADER_SIZE + length
        buf += sock.recv(65536)


@pytest.mark.timeout(90)
def test_a_peer_that_announces_a_huge_window_and_never_reads_is_sent_no_more_than_it_takes(
        fabric, backend, xfer) -> None:  # type: ignore[no-untyped-def]
    echo, source = backend("echo"), backend("source")
    fab = fabric([echo, source], env={"FERRYMAN_KEEPALIVE_INTERVAL": "30"})  # both are applications
    edge_pid = fab.pids["edge-1"]
    raw = socket.create_connection(("127.0.0.1", fab.edge_port), timeout=5)
    sock = client_context(Path(fab.workdir) / "pki").wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        sock.sendall(encode_preamble() + encode_control(0, Hello(role="client", node="client-1", max_frame=262144,
                                                                  window=2**31 - 1, max_flows=64)))
        sock.sendall(encode_control(1, Open(host="127.0.0.1", port=source.port)))
        _read_until_open_ok(sock, 1)  # the last bytes we ever read
        request = source_request(192 << 20, b"s" * 32)
        sock.sendall(encode_header(FrameType.DATA, 1, len(request)) + request)
        source.wait_event("open")
        time.sleep(0.5)
        before = peak = xfer.rss_bytes(edge_pid)
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:  # the backend pushes all it can; we read nothing
            peak = max(peak, xfer.rss_bytes(edge_pid))
            assert peak - before < GROWTH_LIMIT, f"edge grew by {(peak - before) >> 20} MiB for a peer that never reads"
            time.sleep(0.2)
        print(f"edge RSS {before >> 20} MiB before, peak {peak >> 20} MiB while a peer that never reads had a flow "
              f"of 192 MiB towards it")
        samples = xfer.scrape(fab.metrics["edge-1"])
        assert xfer.metric(samples, "ferryman_tunnel_read_pauses_total") >= 1  # it filled the edge's buffer to us
        # The edge serves everyone else meanwhile: a flow of the real client agent, end to end.
        payload = os.urandom(256 * 1024)
        assert xfer.echo(fab.forward_ports[0], payload, timeout=10) == payload
    finally:
        sock.close()
