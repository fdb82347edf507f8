"""A client agent keeps reading its edge whatever happens (edges stop reading a peer that does
not read, dialers never do), so what it answers an edge that floods it without reading would
pile up in its write buffer: PONGs and the refusals of OPENs (edges never open flows toward
clients). While the tunnel's transport is above FERRYMAN_WRITE_BUFFER_HIGH, PINGs go
unanswered, and an OPEN closes the tunnel (``peer_not_reading``).

A real ``Client`` handles a real client-side ``Tunnel`` fed with what an edge's
``TunnelConnection`` sends; only the tunnel's socket is absent (what the tunnel queues is
read back from its connection, and the transport's high-water mark is called by hand).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from dataplane.basics import pki
from dataplane.basics.pki import PeerCertificate
from dataplane.basics.settings import ClientSettings
from dataplane.client.node import Client
from dataplane.transport.credentials import NodeCredentials
from dataplane.transport.tunnel import Tunnel
from dataplane.wire import events as ev
from dataplane.wire.connection import TunnelConnection, WireConfig
from dataplane.wire.frames import FrameType, Open, encode_ping

pytestmark = pytest.mark.timeout(30)


def client_tunnel(pki_dir: str) -> tuple[Tunnel, TunnelConnection]:
    """A signed-in-less client agent's tunnel, up, and the edge's end of it."""
    key, cert = pki.node_paths(pki_dir, "client-1")
    s = ClientSettings(tls_ca=os.path.join(pki_dir, pki.CA_CERT), tls_cert=cert, tls_key=key, edges="127.0.0.1:1")
    client = Client(s, NodeCredentials(s, "client"), [])
    tunnel: Tunnel = Tunnel(client, client._wire, dialer=True, accept_roles=("edge",), keepalive=30.0,
                            handshake_timeout=30.0, write_buffer_high=1 << 20, label="c0")
    tunnel.peer_certificate = PeerCertificate(role="edge", name="edge-1", serial=1, not_after=0.0, fingerprint="")
    tunnel.conn.initiate()
    edge = TunnelConnection(WireConfig(role="edge", node="edge-1"), dialer=False)
    edge.initiate()
    tunnel.data_received(edge.data_to_send())
    edge.receive_data(queued(tunnel))
    assert tunnel.up
    return tunnel, edge


def queued(tunnel: Tunnel) -> bytes:
    assert isinstance(tunnel.conn, TunnelConnection)
    return tunnel.conn.data_to_send()


def test_pings_go_unanswered_while_the_edge_does_not_read(pki_cache: str) -> None:
    async def run() -> None:
        tunnel, _edge = client_tunnel(pki_cache)
        tunnel.pause_writing()  # what the transport calls above the mark
        tunnel.data_received(b"".join(encode_ping(FrameType.PING, float(i)) for i in range(500)))
        assert queued(tunnel) == b""
        tunnel.resume_writing()
        tunnel.data_received(encode_ping(FrameType.PING, 3.0))
        assert queued(tunnel) == encode_ping(FrameType.PONG, 3.0)
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


def test_an_edge_opening_flows_toward_the_client_without_reading_loses_the_tunnel(pki_cache: str) -> None:
    async def run() -> None:
        tunnel, edge = client_tunnel(pki_cache)
        edge.open_flow(Open(host="10.0.0.1", port=22))
        tunnel.data_received(edge.data_to_send())
        answers = edge.receive_data(queued(tunnel))
        assert [e.code for e in answers if isinstance(e, ev.FlowRejected)] == ["not_allowed"]  # read: refused
        assert not tunnel.closed
        tunnel.pause_writing()
        edge.open_flow(Open(host="10.0.0.1", port=22))
        tunnel.data_received(edge.data_to_send())
        assert tunnel.closed and tunnel.close_code == "peer_not_reading"

    asyncio.run(run())
