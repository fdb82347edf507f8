"""An edge drains on SIGTERM, with real processes on loopback: a control plane, two edges, a
connector holding tunnels to both, client-1 on edge-1 (then edge-2).

SIGTERM to edge-1 while an echo flow of client-1 runs through it:
- edge-1 reports not ready at once and takes no new tunnel (its TCP port closes; a HELLO that
  still reaches it is refused with ``draining``), and its next heartbeat offers no connector,
  so peer edges stop relaying to it;
- client-1 dials a replacement tunnel to edge-2 and its new flows, even one opened right after
  the signal, go through edge-2 without a single refusal;
- the running flow goes on through edge-1 to a clean end, sha256-checked, and edge-1 exits as
  soon as it has ended (exit 0), long before FERRYMAN_DRAIN_GRACE, having sent that flow's
  traffic record to the control plane.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from dataplane.fabric import Fabric, free_port
from netns import clients_across, private_network

pytestmark = pytest.mark.timeout(120)

GRACE = 30  # far longer than the test waits: edge-1 must exit because its flows ended, not because time ran out


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def _ready(addr: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{addr}/ready", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _exchange(sock: socket.socket, data: bytes, into: bytearray) -> None:
    sock.sendall(data)
    received = bytearray()
    while len(received) < len(data):
        chunk = sock.recv(len(data) - len(received))
        assert chunk, "the flow ended"
        received += chunk
    into.extend(received)


def test_sigterm_drains_an_edge_without_losing_a_flow(fabric, backend, xfer) -> None:
    echo = backend("echo")
    fab = fabric([echo], managed=True, edges=2, client_edges=["edge-1", "edge-2"], timeout=30,
                 env={"FERRYMAN_DRAIN_GRACE": str(GRACE)})
    _drain(fab, xfer, "127.0.0.1")


@pytest.mark.netns
def test_a_client_in_its_own_network_moves_off_a_draining_edge(backend, xfer, tmp_path) -> None:
    """The same over TLS/TCP, with the client agent in a network namespace of its own, joined to
    the edges' host by a veth pair only: its apps connect to it there, and it reaches the control
    plane and both edges across the pair."""
    transport = "tcp"
    echo = backend("echo")
    with private_network() as (ns, ours, theirs):
        fab = Fabric(str(tmp_path / "fabric"), [(theirs, free_port(), "127.0.0.1", echo.port)], managed=True,
                     edges=2, client_edges=["edge-1", "edge-2"],
                     env={"FERRYMAN_DRAIN_GRACE": str(GRACE), "FERRYMAN_TRANSPORT": transport})
        with clients_across(fab, ns, ours, theirs):
            _drain(fab, xfer, theirs)


def _drain(fab: Fabric, xfer, host: str) -> None:
    """The scenario of the module doc; the client's forward listens on ``host``."""
    def connect(port: int, timeout: float) -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout)

    def echoes(port: int, data: bytes, timeout: float) -> bytes:
        with connect(port, timeout) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return xfer.recv_all(sock)

    edge1, edge2, client = fab.metrics["edge-1"], fab.metrics["edge-2"], fab.metrics["client-1"]
    xfer.wait_metric(edge1, "ferryman_edge_connector_tunnels", 1, timeout=15)  # the connector holds both edges
    xfer.wait_metric(edge2, "ferryman_edge_connector_tunnels", 1, timeout=15)
    xfer.wait_metric(edge2, "ferryman_edge_relay_connectors", 1, timeout=15)  # edge-2 may relay to edge-1
    port = fab.forward_ports[0]
    running = connect(port, timeout=10)
    sent, got = bytearray(), bytearray()
    for _ in range(4):
        chunk = os.urandom(65536)
        sent.extend(chunk)
        _exchange(running, chunk, got)
    assert xfer.metric(xfer.scrape(edge1), "ferryman_flows") >= 1  # the running flow goes through edge-1
    opened_on_2 = xfer.metric(xfer.scrape(edge2), "ferryman_flows_opened_total")
    refused_before = xfer.metric(xfer.scrape(client), "ferryman_open_failures_total")  # e.g. a probe before the connector

    proc = fab.procs["edge-1"]
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    early = echoes(port, b"opened right after the signal", timeout=10)  # waits for the replacement, never refused
    assert early == b"opened right after the signal"
    xfer.wait_for(lambda: _ready(edge1) == 503, 5, "edge-1 to report not ready while it drains")
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge2), "ferryman_edge_relay_connectors") == 0, 10,
                  "the presence map to stop offering edge-1's connector to edge-2")

    for _ in range(10):  # new flows: through edge-2, every one of them
        data = os.urandom(4096)
        assert echoes(port, data, timeout=10) == data
    assert time.monotonic() - signalled < 10
    # (the early flow may have reached edge-1 before its GOAWAY went out: it was then served there)
    assert xfer.metric(xfer.scrape(edge2), "ferryman_flows_opened_total") >= opened_on_2 + 10
    refused = xfer.metric(xfer.scrape(client), "ferryman_open_failures_total") - refused_before
    assert refused == 0, f"client-1 had {refused} flows refused during the drain"

    for _ in range(4):  # the running flow still goes through the draining edge-1
        chunk = os.urandom(65536)
        sent.extend(chunk)
        _exchange(running, chunk, got)
    assert proc.poll() is None, "edge-1 exited while one of its flows was still running"
    with pytest.raises(OSError):  # the tunnel port is closed to new tunnels
        socket.create_connection((fab.edge_host, fab.edge_ports["edge-1"]), timeout=2).close()

    running.shutdown(socket.SHUT_WR)
    assert xfer.recv_all(running) == b""
    running.close()
    assert xfer.sha256_hex(bytes(got)) == xfer.sha256_hex(bytes(sent))
    ended = time.monotonic()
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - ended < 5, "edge-1 did not exit once its last flow ended"
    log = fab.log_tail("edge-1", 60)
    assert "edge draining" in log and "drain grace over" not in log

    def record_of_the_running_flow() -> list[dict]:  # sent by edge-1 before it exited
        rows = fab.admin("GET", "/v1/traffic?limit=200")
        assert isinstance(rows, list)
        return [r for r in rows if r["edge"] == "edge-1" and r["bytes_sent"] == len(sent)]

    (record,) = xfer.wait_for(record_of_the_running_flow, 5, "the running flow's traffic record")
    assert record["bytes_received"] == len(sent) and record["action"] == "allow"

    xfer.wait_for(lambda: xfer.metric(xfer.scrape(client), "ferryman_tunnels") == 1, 10,
                  "client-1 to hold only its tunnel to edge-2")
    data = os.urandom(4096)
    assert echoes(port, data, timeout=10) == data
