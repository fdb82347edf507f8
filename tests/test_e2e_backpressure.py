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
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

import pytest

from dataplane.wire.frames import FrameType, Hello, encode_control, encode_ping, encode_preamble

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
