"""Micro-benchmark of the Python between an edge's tunnel read and the write it causes (pytest-benchmark).

One 64-byte DATA frame is read by a real ``transport.tunnel.Tunnel`` (the client's), parsed,
dispatched to a splicing node that hands the payload to a flow of a second ``Tunnel`` (the
connector's) and acknowledges it, and written by that tunnel at the end of the read: frame
parsing, dispatch, framing and the flush, without TLS or sockets (each tunnel writes into
a byte counter instead of its socket). Run: ``python -m pytest bench/test_splice_bench.py
--benchmark-enable``; under the default ``--benchmark-disable`` it runs once and checks
that the connector side receives exactly the frames that went in.
"""

from __future__ import annotations

import asyncio

import pytest

from dataplane.basics.metrics import Stats
from dataplane.basics.pki import PeerCertificate
from dataplane.transport.tunnel import Tunnel, TunnelHandler
from dataplane.wire import events as ev
from dataplane.wire.connection import TunnelConnection, WireConfig
from dataplane.wire.frames import MAX_WINDOW, Open

pytestmark = pytest.mark.timeout(60)

REQ = Open(host="db.corp", port=5432)


class Counted:
    """Where a tunnel's writes go here: their bytes are kept for the check, then dropped."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.keep = True

    def write(self, data: bytes | memoryview) -> None:
        if self.keep:
            self.data += data

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return False


class Splice(TunnelHandler[object, None]):
    def __init__(self) -> None:
        self.stats = Stats("edge", "e")
        self.to: dict[int, tuple[Tunnel, int]] = {}

    def data_received(self, tunnel, event: ev.DataReceived) -> None:  # type: ignore[no-untyped-def]
        out, ofid = self.to[event.flow_id]
        data = event.data
        self.stats.bytes_rx += len(data)
        sent = out.send_data(ofid, data)
        if sent:
            tunnel.acknowledge(event.flow_id, sent)


def tunnel_with_peer(node: Splice, role: str) -> tuple[Tunnel, TunnelConnection]:
    wire = WireConfig(role="edge", node="e", window=MAX_WINDOW)
    tunnel: Tunnel = Tunnel(node, wire, dialer=False, accept_roles=(role,), keepalive=30.0, handshake_timeout=30.0,
                            write_buffer_high=1 << 20, label=role)
    tunnel.peer_certificate = PeerCertificate(role=role, name=role, serial=1, not_after=0.0, fingerprint="")
    tunnel.conn.initiate()
    peer = TunnelConnection(WireConfig(role=role, node=role, window=MAX_WINDOW), dialer=True)
    peer.initiate()
    tunnel.data_received(peer.data_to_send())
    peer.receive_data(tunnel.conn.data_to_send())
    fid = peer.open_flow(REQ)
    tunnel.data_received(peer.data_to_send())
    tunnel.accept(fid)
    peer.receive_data(tunnel.conn.data_to_send())
    return tunnel, peer


@pytest.mark.benchmark(group="splice")
def test_splice_one_64_byte_frame(benchmark) -> None:
    async def run() -> None:
        node = Splice()
        client, client_peer = tunnel_with_peer(node, "client")
        connector, connector_peer = tunnel_with_peer(node, "connector")
        kfid = connector_peer.open_flow(REQ)
        connector.data_received(connector_peer.data_to_send())
        connector.accept(kfid)
        connector_peer.receive_data(connector.conn.data_to_send())
        cfid = next(iter(client.conn.flows))
        node.to[cfid] = (connector, kfid)
        await asyncio.sleep(0)  # the flushes the set-up scheduled run (nothing left to write)
        client.transport, connector.transport = Counted(), Counted()  # type: ignore[assignment]
        client_peer.send_data(cfid, bytes(range(64)))
        frame = client_peer.data_to_send()
        flow_in, flow_out = client.conn.flows[cfid], connector.conn.flows[kfid]

        def one() -> None:
            flow_in.recv_credit = MAX_WINDOW  # credit topped up without WINDOW round trips
            flow_out.send_credit = MAX_WINDOW
            client.data_received(frame)

        one()
        got = connector_peer.receive_data(bytes(connector.transport.data))  # type: ignore[union-attr]
        assert [(type(e), e.flow_id, bytes(e.data)) for e in got] == [(ev.DataReceived, kfid, bytes(range(64)))]
        connector.transport.keep = False  # type: ignore[union-attr]
        benchmark(one)
        client.transport = connector.transport = None
        client.close("shutdown", "benchmark over")
        connector.close("shutdown", "benchmark over")

    asyncio.run(run())
