"""A dialer's tunnel (a connector's or a client agent's) up against an edge played by a sans-I/O
``TunnelConnection``: the real ``Tunnel`` and node, no socket. What the tunnel queues is read
back with ``written`` and handed to the edge by the test."""

from __future__ import annotations

from typing import Any

from dataplane.basics.pki import PeerCertificate
from dataplane.transport.tunnel import Tunnel
from dataplane.wire.connection import TunnelConnection, WireConfig


def tunnel_to_edge(node: Any, label: str = "t0") -> tuple[Tunnel, TunnelConnection]:
    """``node``'s dialing tunnel, up, and the edge's end of it."""
    tunnel: Tunnel = Tunnel(node, node._wire, dialer=True, accept_roles=("edge",), keepalive=30.0,
                            handshake_timeout=30.0, write_buffer_high=1 << 20, label=label)
    tunnel.peer_certificate = PeerCertificate(role="edge", name="edge-1", serial=1, not_after=0.0, fingerprint="")
    tunnel.conn.initiate()
    edge = TunnelConnection(WireConfig(role="edge", node="edge-1"), dialer=False)
    edge.initiate()
    tunnel.data_received(edge.data_to_send())
    edge.receive_data(written(tunnel))
    assert tunnel.up
    return tunnel, edge


def written(tunnel: Tunnel) -> bytes:
    """What the tunnel queued for the edge (no socket here: the test carries it)."""
    assert isinstance(tunnel.conn, TunnelConnection)
    return tunnel.conn.data_to_send()
