"""Flow routing across edges, with real processes on loopback: a control plane, two edges, a
connector that holds tunnels to edge-2 only, a client agent on edge-1.

- a flow from the client on edge-1 is decided there and relayed over an edge⇄edge tunnel to
  edge-2, which hands it to the connector: bytes are sha256-checked both ways, the relay hop
  shows in both edges' metrics (``ferryman_relayed_flows_total``) and in edge-1's traffic
  record (``relay_edge``), and edge-2 records nothing of its own for it;
- presence is kept apart from the configuration: the connector's tunnels coming and going
  never change the configuration version.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from dataplane.fabric import Fabric, free_port
from netns import clients_across, private_network

pytestmark = pytest.mark.timeout(90)


def test_flow_is_relayed_to_the_edge_holding_the_connector(fabric, backend, xfer) -> None:
    sha, source = backend("sha"), backend("source")
    fab = fabric([sha, source], managed=True, edges=2, connector_edges={"connector-1": ["edge-2"]}, timeout=30)
    edge1, edge2 = fab.metrics["edge-1"], fab.metrics["edge-2"]
    assert xfer.metric(xfer.scrape(edge1), "ferryman_edge_connector_tunnels") == 0  # nothing local on edge-1
    version = xfer.metric(xfer.scrape(edge1), "ferryman_config_version")

    upload = os.urandom(3 << 20)
    assert xfer.upload_sha(fab.forward_ports[0], upload) == xfer.sha256_hex(upload)
    seed = b"relay".ljust(32, b".")
    down = xfer.download(fab.forward_ports[1], 3 << 20, seed)
    assert xfer.sha256_hex(down) == xfer.sha256_hex(xfer.source_bytes(3 << 20, seed))

    out = xfer.metric(xfer.scrape(edge1), "ferryman_relayed_flows_total", direction="out")
    assert out >= 2  # the readiness probes of the client were relayed too
    assert 2 <= xfer.metric(xfer.scrape(edge2), "ferryman_relayed_flows_total", direction="in") <= out
    assert xfer.metric(xfer.scrape(edge1), "ferryman_relayed_flows_total", direction="in") == 0

    def relayed_records() -> list[dict]:
        rows = fab.admin("GET", "/v1/traffic?limit=100")
        assert isinstance(rows, list)
        return [r for r in rows if r["destination_port"] == sha.port and r["bytes_sent"] == len(upload)]

    records = xfer.wait_for(relayed_records, 10, "the traffic record of the relayed upload")
    assert len(records) == 1, records  # recorded once: by the deciding edge
    record = records[0]
    assert (record["edge"], record["relay_edge"], record["connector_name"]) == ("edge-1", "edge-2", "connector-1")
    assert record["action"] == "allow" and record["close_reason"] == "closed"

    # The connector's tunnels flap: presence changes, the configuration version does not.
    fab.kill("connector-1")
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge2), "ferryman_edge_connector_tunnels") == 0, 10,
                  "edge-2 to see the connector gone")
    fab.restart("connector-1")
    xfer.wait_for(lambda: xfer.upload_intact(fab.forward_ports[0]), 10, "a relayed flow after the connector came back")
    assert xfer.metric(xfer.scrape(edge1), "ferryman_config_version") == version
    assert xfer.metric(xfer.scrape(edge2), "ferryman_config_version") == version


def test_an_edge_killed_mid_transfer_loses_only_its_flows(fabric, backend, xfer) -> None:
    """client-1 dials edge-1 (then edge-2), client-2 edge-2; the connector holds tunnels to edge-2
    only. SIGKILL edge-1 while both clients stream through echo flows: client-1's flow ends (its
    agent names the lost tunnel), client-2's flow carries on to a clean, checked end, and client-1's
    new flows go through edge-2 within 5 seconds."""
    echo = backend("echo")
    fab = fabric([echo], managed=True, edges=2, connector_edges={"connector-1": ["edge-2"]},
                 client_edges=["edge-1", "edge-2"], more_clients={"client-2": ["edge-2"]}, timeout=30)
    _edge_killed(fab, xfer, "127.0.0.1")
    # Relay tunnels are accepted only from registered edges that are active: one registered but
    # never started (no heartbeat, not in the presence map) is refused at its HELLO.
    fab._register("edge-3", "edge", ["--address", "127.0.0.1:9"])
    identity = Path(fab.workdir) / "nodes" / "edge-3" / "identity"
    goaway = xfer.run_async(lambda: _relay_hello(fab.edge_ports["edge-2"], identity), 15)
    assert "is not an active edge registered with the control plane" in goaway.reason
    assert xfer.metric(xfer.scrape(fab.metrics["edge-2"]), "ferryman_tunnels_closed_total",
                       reason="relay_refused") == 1


async def _relay_hello(port: int, identity: Path):  # noqa: ANN202
    """Dial an edge with an edge certificate and ask for a relay tunnel; the GOAWAY that refuses it."""
    from test_e2e_resilience import RawPeer, tls_context

    record = json.loads((identity / "node.json").read_text())
    peer = RawPeer()
    await peer.connect(port, tls_context(str(identity / record["cert"]), str(identity / record["key"]),
                                         str(identity / record["ca"])))
    try:
        await peer.handshake(role="edge", node=record["name"])
        return await peer.expect_goaway("relay_refused")
    finally:
        peer.close()


def _echoes(host: str, port: int, xfer) -> bool:
    data = os.urandom(4096)
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return xfer.recv_all(sock) == data
    except OSError:
        time.sleep(0.1)
        return False


def test_a_connector_spreads_its_tunnels_and_moves_when_an_edge_goes(fabric, backend, xfer) -> None:
    """One connector following the control plane's edge list (FERRYMAN_CONNECTOR_EDGES 4, two
    tunnels): it holds a tunnel to each of the two edges; once edge-2 is revoked (it leaves the
    list) that tunnel's slot moves to edge-1, and flows keep working."""
    echo = backend("echo")
    fab = fabric([echo], managed=True, edges=2, env={"FERRYMAN_CONNECTOR_TUNNELS": "2"}, timeout=30)
    edge1, edge2 = fab.metrics["edge-1"], fab.metrics["edge-2"]
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge1), "ferryman_edge_connector_tunnels") == 1
                  and xfer.metric(xfer.scrape(edge2), "ferryman_edge_connector_tunnels") == 1, 10,
                  "a connector tunnel on each edge")
    fab.admin("POST", "/v1/revocations", {"node_type": "edge", "node_id": fab.node_id("edge-2")})
    xfer.wait_for(lambda: xfer.metric(xfer.scrape(edge1), "ferryman_edge_connector_tunnels") == 2
                  and xfer.metric(xfer.scrape(edge2), "ferryman_edge_connector_tunnels") == 0, 10,
                  "both connector tunnels on edge-1")
    assert "edges chosen" in fab.log_tail("connector-1", 40)
    data = os.urandom(65536)
    assert xfer.echo(fab.forward_ports[0], data) == data


def test_a_web_apps_requests_are_relayed_to_the_edge_holding_its_connector(fabric, xfer) -> None:
    """The front door on edge-1, the web app's only connector on edge-2: a signed-in browser's
    requests reach the backend through the edge-1 → edge-2 relay, and a body comes back whole."""
    from tests.test_e2e_webapps import curl, sign_in
    from tests.web_support import Backend

    from dataplane.fabric import WEB_DOMAIN

    wiki = Backend("wiki", internal_host="127.0.0.1")
    try:
        fab = fabric([], managed=True, edges=2, connector_edges={"connector-1": ["edge-2"]}, timeout=30,
                     webapps=[{"name": "wiki", "external_url": f"https://wiki.{WEB_DOMAIN}",
                               "internal_url": wiki.internal_url}])
        edge1, edge2 = fab.metrics["edge-1"], fab.metrics["edge-2"]
        assert xfer.metric(xfer.scrape(edge1), "ferryman_edge_connector_tunnels") == 0
        xfer.wait_metric(edge1, "ferryman_edge_relay_connectors", 1, timeout=10)  # edge-1 knows where it is
        before = xfer.metric(xfer.scrape(edge1), "ferryman_relayed_flows_total", direction="out")
        jar = os.path.join(fab.workdir, "jar")
        page = sign_in(fab, jar, fab.web_url("wiki", "/hello"))
        assert (page.status, page.body) == (200, b"hello from backend wiki")
        for http2 in (False, True):
            big = curl(fab, fab.web_url("wiki", "/big?n=1048576"), jar=jar, http2=http2)
            assert big.status == 200 and len(big.body) == 1048576
        assert xfer.metric(xfer.scrape(edge1), "ferryman_relayed_flows_total", direction="out") > before
        assert xfer.metric(xfer.scrape(edge2), "ferryman_relayed_flows_total", direction="in") >= 1

        def big_records() -> list[dict]:
            rows = fab.admin("GET", "/v1/traffic?limit=100")
            assert isinstance(rows, list)
            return [r for r in rows if r.get("http_path") == "/big" and r["application_kind"] == "web"]

        records = xfer.wait_for(lambda: len(big_records()) == 2 and big_records(), 10,
                                "the traffic records of the two relayed web transactions")
        for record in records:  # recorded by the deciding edge, naming the connector and the relay
            assert (record["edge"], record["relay_edge"], record["connector_name"]) == ("edge-1", "edge-2",
                                                                                         "connector-1"), record
    finally:
        wiki.stop()


@pytest.mark.netns
def test_clients_in_their_own_network_fail_over_when_an_edge_is_killed(backend, xfer, tmp_path) -> None:
    """The same with both client agents in a network namespace of their own, joined to the
    edges' host by a veth pair only (their apps connect to them there; they reach the control
    plane and the edges across the pair): relayed flows, the kill, the failover."""
    echo = backend("echo")
    with private_network() as (ns, ours, theirs):
        fab = Fabric(str(tmp_path / "fabric"), [(theirs, free_port(), "127.0.0.1", echo.port)], managed=True,
                     edges=2, connector_edges={"connector-1": ["edge-2"]}, client_edges=["edge-1", "edge-2"],
                     more_clients={"client-2": ["edge-2"]}, env={"FERRYMAN_DRAIN_GRACE": "1"})
        with clients_across(fab, ns, ours, theirs, ("client-1", "client-2")):
            _edge_killed(fab, xfer, theirs)


def _edge_killed(fab: Fabric, xfer, host: str) -> None:
    """The kill scenario of ``test_an_edge_killed_mid_transfer_loses_only_its_flows``; the client
    agents' forwards listen on ``host``."""
    on_a = socket.create_connection((host, fab.forward_ports[0]), timeout=10)
    on_b = socket.create_connection((host, fab.client_ports["client-2"][0]), timeout=10)
    sent_b = bytearray()
    got_b = bytearray()

    def exchange(sock, data: bytes, into: bytearray | None = None) -> None:
        sock.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = sock.recv(len(data) - len(received))
            assert chunk, "flow ended"
            received += chunk
        assert received == data
        if into is not None:
            into.extend(received)

    for _ in range(4):  # both flows are carrying bytes
        exchange(on_a, os.urandom(65536))
        chunk = os.urandom(65536)
        sent_b.extend(chunk)
        exchange(on_b, chunk, got_b)

    fab.kill("edge-1")
    killed = time.monotonic()

    on_a.settimeout(5)
    try:  # client-1's flow through edge-1 ends promptly
        ended = on_a.recv(1) == b""
    except ConnectionResetError:
        ended = True
    assert ended
    on_a.close()
    xfer.wait_for(lambda: "lost" in fab.log_tail("client-1", 40) and "edge-1" in fab.log_tail("client-1", 40), 5,
                  "client-1 to log its lost tunnel to edge-1")

    for _ in range(4):  # client-2's flow through edge-2 is untouched
        chunk = os.urandom(65536)
        sent_b.extend(chunk)
        exchange(on_b, chunk, got_b)
    on_b.shutdown(socket.SHUT_WR)
    assert xfer.recv_all(on_b) == b""
    on_b.close()
    assert xfer.sha256_hex(bytes(got_b)) == xfer.sha256_hex(bytes(sent_b))

    xfer.wait_for(lambda: _echoes(host, fab.forward_ports[0], xfer), 5, "a new flow of client-1 (through edge-2)")
    assert time.monotonic() - killed < 5
    status = xfer.scrape(fab.metrics["client-1"])
    assert xfer.metric(status, "ferryman_tunnels") == 1

