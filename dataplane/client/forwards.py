"""Fixed port forwards of the client agent: ``--forward [LISTEN_HOST:]LISTEN_PORT=HOST:PORT[/udp]``.

A TCP forward's listener makes one ``ClientFlow`` per accepted connection, opened through the
tunnel to the forward's destination (a forward always tunnels; a refusal resets the app's
connection). A UDP forward (``UdpForward``) makes one UDP flow per source address, created
by its first datagram and ended after FERRYMAN_UDP_IDLE_TIMEOUT without traffic; answers go
back to that address.
"""

from __future__ import annotations

import asyncio

import msgspec

from ..basics.hostport import parse_hostport
from ..transport.udpflow import UdpFlow
from ..transport.udpio import UdpEndpoint
from .capture import local_user_refusal
from .opener import ClientFlow, FlowOpener


class Forward(msgspec.Struct, frozen=True):
    listen_host: str
    listen_port: int
    host: str
    port: int
    protocol: str = "tcp"

    @classmethod
    def parse(cls, spec: str) -> Forward:
        """``[LISTEN_HOST:]LISTEN_PORT=HOST:PORT[/tcp|/udp]``."""
        if "=" not in spec:
            raise ValueError(f"--forward {spec!r}: expected [LISTEN_HOST:]LISTEN_PORT=HOST:PORT[/udp]")
        listen, dest = spec.split("=", 1)
        protocol = "tcp"
        if "/" in dest:
            dest, protocol = dest.rsplit("/", 1)
            if protocol not in ("tcp", "udp"):
                raise ValueError(f"--forward {spec!r}: protocol {protocol!r} is not tcp or udp")
        if ":" not in listen or listen.startswith("["):
            listen = listen if ":" in listen else f"127.0.0.1:{listen}"
        lhost, lport = parse_hostport(listen, f"--forward {spec!r} listen address", allow_zero=True)
        host, port = parse_hostport(dest, f"--forward {spec!r} destination")
        return cls(lhost, lport, host, port, protocol)

    def __str__(self) -> str:
        suffix = "/udp" if self.protocol == "udp" else ""
        return f"{self.listen_host}:{self.listen_port}={self.host}:{self.port}{suffix}"


def forward_flow(opener: FlowOpener, forward: Forward) -> ClientFlow:
    """The protocol of one connection accepted by a TCP forward's listener."""

    def opened(flow: ClientFlow, code: str, reason: str) -> None:
        if code:
            flow.abort(code, reason)

    def connected(flow: ClientFlow) -> None:
        if flow.transport is not None and local_user_refusal(opener, flow.transport):
            flow.transport.abort()  # another local account: nothing is opened
            return
        opener.open(flow)

    return ClientFlow(opener, (forward.host, forward.port), opened, on_connect=connected)


class UdpForward(asyncio.DatagramProtocol):
    """A UDP port forward: one UDP flow per source address, created by its first datagram and
    ended after FERRYMAN_UDP_IDLE_TIMEOUT without traffic; answers go back to that address."""

    def __init__(self, client: FlowOpener, forward: Forward) -> None:
        self.client = client
        self.forward = forward
        self.transport: UdpEndpoint | None = None
        self.flows: dict[tuple, UdpFlow] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            client = self.client
            settings = client.settings
            if len(self.flows) >= settings.max_udp_flows:
                client.stats.count(client.stats.datagrams_dropped, "too_many_udp_flows")
                return
            transport = self.transport
            assert transport is not None
            if local_user_refusal(client, transport, "udp", addr):  # another local account's socket
                client.stats.count(client.stats.datagrams_dropped, "local_user_refused")
                return
            flow = UdpFlow(client, lambda d, a=addr: transport.sendto(d, a), self._closed,
                           idle=settings.udp_idle_timeout, queue=settings.udp_queue,
                           dest=(self.forward.host, self.forward.port), peer=f"{addr[0]}:{addr[1]}",
                           send_batch=lambda parts, a=addr: transport.send_all(parts, a))
            flow.on_opened = self._opened
            self.flows[addr] = flow
            flow.from_local(data)  # queued until OPEN_OK
            client.open(flow)
            return
        flow.from_local(data)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable for an answer sent to an app that has closed its socket
        self.client.stats.count(self.client.stats.datagrams_dropped, "local_error")

    def _opened(self, flow: UdpFlow, code: str, reason: str) -> None:
        """A refused UDP flow: its queued datagrams are dropped (counted); the next datagram from the
        same address tries again."""
        if code:
            stats = self.client.stats
            stats.count(stats.datagrams_dropped, "flow_refused", len(flow.queue))

    def _closed(self, flow: UdpFlow) -> None:
        for addr, known in list(self.flows.items()):
            if known is flow:
                del self.flows[addr]
                break
