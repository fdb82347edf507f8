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

import os
import time

import pytest

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
    assert xfer.sha256_hex(down) == xfer.sha256_hex(source_bytes(3 << 20, seed))

    out = xfer.metric(xfer.scrape(edge1), "ferryman_relayed_flows_total", direction="out")
    assert out >= 2  # the readiness probes of the client were relayed too
    assert xfer.metric(xfer.scrape(edge2), "ferryman_relayed_flows_total", direction="in") == out
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
    xfer.wait_for(lambda: _relays(fab, xfer), 10, "a relayed flow after the connector came back")
    assert xfer.metric(xfer.scrape(edge1), "ferryman_config_version") == version
    assert xfer.metric(xfer.scrape(edge2), "ferryman_config_version") == version


def _relays(fab, xfer) -> bool:
    data = os.urandom(65536)
    try:
        return xfer.upload_sha(fab.forward_ports[0], data, timeout=5) == xfer.sha256_hex(data)
    except OSError:
        time.sleep(0.1)
        return False


def source_bytes(n: int, seed: bytes) -> bytes:
    from backends import source_bytes as make

    return make(n, seed)
