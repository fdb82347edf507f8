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
from dataplane.basics.settings import ClientSettings
from dataplane.client.node import Client
from dataplane.transport.credentials import NodeCredentials
from dataplane.transport.tunnel import Tunnel
from dataplane.wire import events as ev
from dataplane.wire.connection import TunnelConnection
from dataplane.wire.frames import FrameType, Open, encode_ping

from edge_peer import tunnel_to_edge, written

pytestmark = pytest.mark.timeout(30)


def client_tunnel(pki_dir: str) -> tuple[Tunnel, TunnelConnection]:
    """A client agent's tunnel (signed in with its device certificate only), up, and the edge's end of it."""
    key, cert = pki.node_paths(pki_dir, "client-1")
    s = ClientSettings(tls_ca=os.path.join(pki_dir, pki.CA_CERT), tls_cert=cert, tls_key=key, edges="127.0.0.1:1")
    return tunnel_to_edge(Client(s, NodeCredentials(s, "client"), []), "c0")


def test_pings_go_unanswered_while_the_edge_does_not_read(pki_cache: str) -> None:
    async def run() -> None:
        tunnel, _edge = client_tunnel(pki_cache)
        tunnel.pause_writing()  # what the transport calls above the mark
        tunnel.data_received(b"".join(encode_ping(FrameType.PING, float(i)) for i in range(500)))
        assert written(tunnel) == b""
        tunnel.resume_writing()
        tunnel.data_received(encode_ping(FrameType.PING, 3.0))
        assert written(tunnel) == encode_ping(FrameType.PONG, 3.0)
        tunnel.close("shutdown", "test over")

    asyncio.run(run())


def test_an_edge_opening_flows_toward_the_client_without_reading_loses_the_tunnel(pki_cache: str) -> None:
    async def run() -> None:
        tunnel, edge = client_tunnel(pki_cache)
        edge.open_flow(Open(host="10.0.0.1", port=22))
        tunnel.data_received(edge.data_to_send())
        answers = edge.receive_data(written(tunnel))
        assert [e.code for e in answers if isinstance(e, ev.FlowRejected)] == ["not_allowed"]  # read: refused
        assert not tunnel.closed
        tunnel.pause_writing()
        edge.open_flow(Open(host="10.0.0.1", port=22))
        tunnel.data_received(edge.data_to_send())
        assert tunnel.closed and tunnel.close_code == "peer_not_reading"

    asyncio.run(run())
