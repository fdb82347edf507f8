"""Datagrams that one tunnel read brings for a UDP flow leave the node together.

Two real tunnel ends over loopback TLS (``test_udp_backlog.udp_flow_over_tunnels``). The connector's UDP flow
sends into a real connected UDP socket (``udpio.UdpEndpoint``, GSO where the kernel has it) to
a receiving socket: a burst of datagrams from the edge reaches the receiver whole and in
order in far fewer sends than datagrams, datagrams followed by the flow's end still go out,
and a local socket that fails a batch costs exactly that batch, counted.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from dataplane.transport.endpoint import EndpointNode
from dataplane.transport.udpflow import UdpFlow
from dataplane.transport.udpio import UdpEndpoint, udp_socket

from test_udp_backlog import Connector, _until, udp_flow_over_tunnels
from test_udpio import Collect

pytestmark = pytest.mark.timeout(60)


class Node(Connector, EndpointNode):
    """The backlog test's connector end, with the node's routing of DATAGRAM and RST to the flow."""


def _backend(flow: UdpFlow, batches: list[int]) -> tuple[UdpEndpoint, UdpEndpoint, Collect]:
    """A receiving socket and a connected endpoint to it, as the connector dials a UDP backend."""
    loop = asyncio.get_running_loop()
    rx = Collect()
    receiver = UdpEndpoint(loop, udp_socket(socket.AF_INET, bind=("127.0.0.1", 0), buffer=1 << 22), rx, gro=False)
    sender = UdpEndpoint(loop, udp_socket(socket.AF_INET, connect=receiver.get_extra_info("sockname")), Collect(),
                         gro=False)

    def send_all(parts: list[bytes]) -> None:
        batches.append(len(parts))
        sender.send_all(parts)

    flow.send = sender.sendto
    flow.send_batch = send_all
    return sender, receiver, rx


def test_a_burst_from_the_tunnel_leaves_in_batches_whole_and_in_order(pki_cache: str) -> None:
    async def scenario() -> None:
        connector = Node()
        edge, etunnel, ctunnel, server, fid, flow = await udp_flow_over_tunnels(
            pki_cache, connector, connector_buffer_high=1 << 20)
        batches: list[int] = []
        sender, receiver, rx = _backend(flow, batches)

        burst = [os.urandom(64) for _ in range(300)] + [os.urandom(1200) for _ in range(100)] + [b"short"]
        for data in burst:
            assert etunnel.send_datagram(fid, data)
        await _until(lambda: len(rx.got) == len(burst))
        assert rx.got == burst
        assert sum(batches) == len(burst) and len(batches) < len(burst) // 10, batches
        assert connector.stats.datagrams_rx == len(burst) and connector.stats.datagrams_dropped == {}
        assert sender.send_drops == 0 and rx.errors == []

        # datagrams and then the flow's end in one read: what came first is still delivered
        tail = [os.urandom(64) for _ in range(20)]
        for data in tail:
            etunnel.send_datagram(fid, data)
        etunnel.reset(fid, "idle_timeout", "test ends the flow")
        await _until(lambda: flow.done)
        await _until(lambda: len(rx.got) == len(burst) + len(tail))
        assert rx.got[len(burst):] == tail and flow.outbox == []
        for end in (sender, receiver):
            end.close()
        ctunnel.close("shutdown", "test over")
        etunnel.close("shutdown", "test over")
        server.close()

    asyncio.run(scenario())


def test_a_failing_local_socket_costs_its_batch_counted(pki_cache: str) -> None:
    async def scenario() -> None:
        connector = Node()
        edge, etunnel, ctunnel, server, fid, flow = await udp_flow_over_tunnels(
            pki_cache, connector, connector_buffer_high=1 << 20)
        failures: list[int] = []

        def broken(parts: list[bytes]) -> None:
            failures.append(len(parts))
            raise OSError(9, "Bad file descriptor")

        flow.send_batch = broken
        for _ in range(50):
            etunnel.send_datagram(fid, b"x" * 64)
        await _until(lambda: sum(failures) == 50)
        assert connector.stats.datagrams_dropped == {"local_error": 50}
        assert not flow.done  # the flow's trouble: counted, the flow and the tunnel go on
        batches: list[int] = []
        _sender, _receiver, rx = _backend(flow, batches)
        etunnel.send_datagram(fid, b"after")
        await _until(lambda: rx.got == [b"after"])
        ctunnel.close("shutdown", "test over")
        etunnel.close("shutdown", "test over")
        server.close()

    asyncio.run(scenario())
