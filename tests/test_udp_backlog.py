"""A datagram never waits behind more than ``FERRYMAN_UDP_BACKLOG`` bytes in a TLS/TCP tunnel.

Two real tunnel ends over loopback TLS (an edge and a connector, with the test's
certificates). The edge stops reading, the connector's tunnel fills its write buffer past
the backlog while staying writable (its high-water mark is far above), and a datagram from
the connector's local UDP socket is then dropped and counted (``tunnel_busy``) instead of
queued behind those bytes; once the edge reads again and the buffer drains, datagrams flow.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from dataplane.basics import pki
from dataplane.basics.metrics import Stats
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.transport.udpflow import UdpFlow
from dataplane.wire import events as ev
from dataplane.wire.connection import WireConfig
from dataplane.wire.frames import Open

pytestmark = pytest.mark.timeout(60)

BACKLOG = 65536


class Edge(TunnelHandler):
    def __init__(self) -> None:
        self.stats = Stats("edge", "edge-1")
        self.up: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()
        self.accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.datagrams: list[bytes] = []

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.up.set_result(tunnel)

    def tunnel_down(self, tunnel: Tunnel) -> None:
        pass

    def flow_accepted(self, tunnel: Tunnel, event: ev.FlowAccepted) -> None:
        self.accepted.set_result(event.flow_id)

    def datagram_received(self, tunnel: Tunnel, event: ev.DatagramReceived) -> None:
        self.datagrams.append(bytes(event.data))


class Connector(TunnelHandler):
    """The connector end: accepts the edge's UDP flow and binds it to a ``UdpFlow``."""

    socket_buffer = 262144
    udp_backlog = BACKLOG

    def __init__(self) -> None:
        self.stats = Stats("connector", "connector-1")
        self.up: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()
        self.flow: asyncio.Future[UdpFlow] = asyncio.get_running_loop().create_future()

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.up.set_result(tunnel)

    def tunnel_down(self, tunnel: Tunnel) -> None:
        pass

    def flow_requested(self, tunnel: Tunnel, event: ev.FlowRequested) -> None:
        flow = UdpFlow(self, lambda data: None, lambda flow: None, idle=60, queue=16)
        flow.bind(tunnel, event.flow_id)
        tunnel.accept(event.flow_id)
        flow.activate()
        self.flow.set_result(flow)


async def udp_flow_over_tunnels(pki_cache: str, connector: Connector, *, connector_buffer_high: int
                                ) -> tuple[Edge, Tunnel, Tunnel, asyncio.AbstractServer, int, UdpFlow]:
    """An edge and ``connector`` joined by a real TLS tunnel over loopback, and one UDP flow the
    edge opened on it: (edge, edge's tunnel, connector's tunnel, server, flow id, connector's flow)."""
    files = {name: tuple(os.path.join(pki_cache, f"{name}.{ext}") for ext in ("pem", "key"))
             for name in ("edge-1", "connector-1")}
    ca = os.path.join(pki_cache, "ca.pem")
    loop = asyncio.get_running_loop()
    edge = Edge()
    server = await loop.create_server(
        lambda: Tunnel(edge, WireConfig(role="edge", node="edge-1"), dialer=False, accept_roles=("connector",),
                       keepalive=30, handshake_timeout=10, write_buffer_high=1 << 20),
        "127.0.0.1", 0, ssl=pki.server_context(*files["edge-1"], ca))
    port = server.sockets[0].getsockname()[1]
    await loop.create_connection(
        lambda: Tunnel(connector, WireConfig(role="connector", node="connector-1"), dialer=True,
                       accept_roles=("edge",), keepalive=30, handshake_timeout=10,
                       write_buffer_high=connector_buffer_high),
        "127.0.0.1", port, ssl=pki.client_context(*files["connector-1"], ca), server_hostname="127.0.0.1")
    etunnel, ctunnel = await asyncio.wait_for(edge.up, 10), await asyncio.wait_for(connector.up, 10)
    fid = etunnel.open_flow(Open(host="10.0.0.1", port=53, protocol="udp"))
    etunnel.flush_soon()
    flow = await asyncio.wait_for(connector.flow, 10)
    await asyncio.wait_for(edge.accepted, 10)
    return edge, etunnel, ctunnel, server, fid, flow


def test_a_datagram_is_dropped_rather_than_queued_behind_the_backlog(pki_cache: str) -> None:
    async def scenario() -> None:
        connector = Connector()
        # the connector's tunnel stays writable (high-water mark far above): only the backlog can refuse
        edge, etunnel, ctunnel, server, _fid, flow = await udp_flow_over_tunnels(
            pki_cache, connector, connector_buffer_high=1 << 30)

        flow.from_local(b"first")
        await _until(lambda: edge.datagrams == [b"first"])
        assert connector.stats.datagrams_tx == 1

        # The edge reads nothing more: what the connector sends piles up (kernel buffers first).
        etunnel.transport.pause_reading()
        chunk = os.urandom(60000)
        for _ in range(2000):
            if ctunnel.transport.get_write_buffer_size() >= BACKLOG:
                break
            ctunnel.send_datagram(flow.flow_id, chunk)
            await asyncio.sleep(0)
        waiting = ctunnel.transport.get_write_buffer_size()
        assert waiting >= BACKLOG and ctunnel.writable, waiting
        assert not ctunnel.takes_datagram(BACKLOG) and ctunnel.takes_datagram(waiting + 1)

        flow.from_local(b"late")  # would wait behind `waiting` bytes: dropped and counted instead
        assert connector.stats.datagrams_dropped == {"tunnel_busy": 1}
        assert connector.stats.datagrams_tx == 1

        etunnel.transport.resume_reading()
        await _until(lambda: ctunnel.transport.get_write_buffer_size() < BACKLOG)
        flow.from_local(b"after")
        await _until(lambda: edge.datagrams[-1:] == [b"after"])
        assert b"late" not in edge.datagrams and connector.stats.datagrams_tx == 2
        ctunnel.close("shutdown", "test over")
        etunnel.close("shutdown", "test over")
        server.close()

    asyncio.run(scenario())


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
