"""UDP flows end to end through real processes: client UDP forward → edge → connector → UDP backend.

Covered:
- datagrams of many sizes echoed byte for byte over TLS/TCP and QUIC tunnels (up to what
  each carries; larger ones refused and counted), several senders as separate flows, the
  backend seeing the connector's address (source NAT), and the datagram counters;
- a DNS query for a private name answered by a private resolver through the fabric (and
  NXDOMAIN for a name it does not serve), with the UDP flow's traffic-log record;
- the idle timeout ending a UDP flow at both ends, and the next datagram opening a new one;
- a datagram larger than the tunnel allows dropped and counted, never blocking the flow.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from backends import dns_address

pytestmark = pytest.mark.timeout(90)


def _udp_socket(timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


def _roundtrip(sock: socket.socket, port: int, payload: bytes, tries: int = 20) -> bytes:
    """Send ``payload`` to the forward and return the answer (resending: the first datagrams of a
    flow wait for OPEN_OK, and UDP may lose one)."""
    for _ in range(tries):
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            data, _ = sock.recvfrom(70000)
            return data
        except socket.timeout:
            continue
    raise AssertionError(f"no answer to a {len(payload)}-byte datagram after {tries} tries")


def _udp_forward(backend) -> tuple:
    return ("127.0.0.1", 0, "127.0.0.1", backend.port, "udp")


# The largest datagram each tunnel transport carries: a TLS/TCP DATAGRAM frame (FERRYMAN_MAX_FRAME),
# one QUIC DATAGRAM frame in a 1350-byte packet (FERRYMAN_QUIC_PACKET_SIZE) less its overhead.
LARGEST = {"tcp": 65000, "quic": 1304}


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_udp_echo_through_the_fabric(backend, fabric, xfer, transport):
    echo = backend("udp-echo")
    fab = fabric([_udp_forward(echo)], env={"FERRYMAN_TRANSPORT": transport})
    # The client's tunnel may come up a moment after the fabric reports ready on a busy machine.
    samples = xfer.wait_metric(fab.metrics["edge-1"], "ferryman_tunnels_by_transport", 3, timeout=15.0,
                               transport=transport)
    assert xfer.metric(samples, "ferryman_tunnels_by_transport", transport=transport) == 3
    port = fab.forward_ports[0]
    sock = _udp_socket(2.0)
    for size in (1, 64, 512, 1200, 1304, 1472, 8192, 32768, 65000):
        if size > LARGEST[transport]:
            continue
        payload = os.urandom(size)
        assert _roundtrip(sock, port, payload) == payload, f"{size}-byte datagram"
    if transport == "quic":  # too large for one QUIC packet: refused at the client, counted, the flow goes on
        sock.sendto(os.urandom(LARGEST["quic"] + 1), ("127.0.0.1", port))
        xfer.wait_metric(fab.metrics["client-1"], "ferryman_datagrams_dropped_total", 1, reason="datagram_too_large")
    # A burst on the open flow: every answer is one of ours, byte for byte (loopback loses none here).
    burst = [os.urandom(100) + i.to_bytes(4, "big") for i in range(200)]
    for payload in burst:
        sock.sendto(payload, ("127.0.0.1", port))
    got = set()
    deadline = time.monotonic() + 10
    while len(got) < len(burst) and time.monotonic() < deadline:
        try:
            got.add(sock.recvfrom(70000)[0])
        except socket.timeout:
            break
    assert got <= set(burst) and len(got) >= 190, f"{len(got)} of {len(burst)} answers"

    # A second sender is a second flow; both see only their own answers.
    other = _udp_socket(2.0)
    assert _roundtrip(other, port, b"from the second sender") == b"from the second sender"
    assert _roundtrip(sock, port, b"first again") == b"first again"

    # The backend saw the connector's sockets, not the app's.
    first_peer = echo.wait_event("udp")["peer"]
    app_ports = {sock.getsockname()[1], other.getsockname()[1]}
    assert int(first_peer.rsplit(":", 1)[1]) not in app_ports
    samples = xfer.scrape(fab.metrics["client-1"])
    assert xfer.metric(samples, "ferryman_flows", role="client") >= 2
    sent = sum(1 for size in (1, 64, 512, 1200, 1304, 1472, 8192, 32768, 65000) if size <= LARGEST[transport])
    assert xfer.metric(samples, "ferryman_datagrams_total", direction="tx") >= sent + 190
    edge = xfer.scrape(fab.metrics["edge-1"])
    assert xfer.metric(edge, "ferryman_datagrams_total", direction="rx") >= 2 * (sent + 190)
    sock.close()
    other.close()


def test_private_dns_query_answered_through_the_connector(backend, fabric, xfer):
    dns = backend("dns")
    fab = fabric([_udp_forward(dns)], managed=True)
    sock = _udp_socket(2.0)
    query = DNSRecord.question("rdp.corp.example", "A")
    answer = DNSRecord.parse(_roundtrip(sock, fab.forward_ports[0], query.pack()))
    assert answer.header.id == query.header.id and answer.header.rcode == RCODE.NOERROR
    assert [(str(rr.rname), rr.rtype, str(rr.rdata)) for rr in answer.rr] == [
        ("rdp.corp.example.", QTYPE.A, dns_address("rdp"))]
    outside = DNSRecord.question("www.example.org", "A")
    refused = DNSRecord.parse(_roundtrip(sock, fab.forward_ports[0], outside.pack()))
    assert refused.header.rcode == RCODE.NXDOMAIN and not refused.rr
    event = dns.wait_event("dns", name="rdp.corp.example")
    assert int(event["peer"].rsplit(":", 1)[1]) != sock.getsockname()[1]
    sock.close()

    # The UDP flow's traffic record (written when the flow ends: the client is stopped).
    fab.kill("client-1", 15)

    def record() -> dict | None:
        rows = fab.admin("GET", "/v1/traffic?limit=100")
        return next((r for r in rows if r["transport"] == "udp" and r["action"] == "allow"
                     and r["bytes_sent"] > 0), None)

    row = xfer.wait_for(record, 15.0, "the UDP flow's traffic record", interval=0.2)
    assert row["destination_port"] == dns.port and row["segment"] == f"127.0.0.1:{dns.port}/udp"
    assert row["bytes_sent"] == len(query.pack()) + len(outside.pack())
    assert row["bytes_received"] > row["bytes_sent"]  # answers carry the question and the record
    assert row["upn"] == fab.user and row["connector_name"] == "connector-1"


def test_idle_udp_flows_end_and_the_next_datagram_opens_a_new_one(backend, fabric, xfer):
    echo = backend("udp-echo")
    fab = fabric([_udp_forward(echo)], env={"FERRYMAN_UDP_IDLE_TIMEOUT": "1"})
    sock = _udp_socket(2.0)
    assert _roundtrip(sock, fab.forward_ports[0], b"one") == b"one"
    xfer.wait_metric(fab.metrics["client-1"], "ferryman_flows_closed_total", 1, timeout=6.0, reason="idle_timeout")
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(fab.metrics["connector-1"]), "ferryman_flows") == 0, 5.0,
                  "the connector's side of the flow to end")
    assert xfer.metric(xfer.scrape(fab.metrics["edge-1"]), "ferryman_flows") == 0
    assert _roundtrip(sock, fab.forward_ports[0], b"two") == b"two"
    assert xfer.metric(xfer.scrape(fab.metrics["client-1"]), "ferryman_flows_opened_total") >= 2
    sock.close()

    # Ended flows give their backend sockets back: 20 more flows, idle out, the connector holds no more
    # file descriptors than before them.
    connector_fds = f"/proc/{fab.pids['connector-1']}/fd"
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(fab.metrics["connector-1"]), "ferryman_flows") == 0, 5.0,
                  "the second flow to end")
    before = len(os.listdir(connector_fds))
    senders = [_udp_socket(2.0) for _ in range(20)]
    peak = before
    for i, sender in enumerate(senders):
        assert _roundtrip(sender, fab.forward_ports[0], b"flow %d" % i) == b"flow %d" % i
        peak = max(peak, len(os.listdir(connector_fds)))
    # One backend socket per running flow (the first ones may idle out while the last open).
    assert peak >= before + 10
    for sender in senders:
        sender.close()
    xfer.wait_for(lambda: len(os.listdir(connector_fds)) <= before, 6.0, "the connector to close the 20 sockets")


def test_a_datagram_larger_than_the_tunnel_allows_is_dropped_and_counted(backend, fabric, xfer):
    echo = backend("udp-echo")
    fab = fabric([_udp_forward(echo)], env={"FERRYMAN_MAX_FRAME": "4096", "FERRYMAN_TRANSPORT": "tcp"})
    port = fab.forward_ports[0]
    sock = _udp_socket(0.5)
    assert _roundtrip(sock, port, b"small") == b"small"
    sock.sendto(os.urandom(5000), ("127.0.0.1", port))
    with pytest.raises(socket.timeout):
        sock.recvfrom(70000)
    samples = xfer.wait_metric(fab.metrics["client-1"], "ferryman_datagrams_dropped_total", 1,
                               reason="datagram_too_large")
    assert xfer.metric(samples, "ferryman_datagrams_dropped_total", reason="datagram_too_large") == 1
    payload = os.urandom(4096)
    assert _roundtrip(sock, port, payload) == payload  # the flow goes on
    assert "datagram dropped" in fab.log_tail("client-1", 50)
    sock.close()
