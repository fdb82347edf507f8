"""The shared part of the client agent and the connector: a tunnel's flow events routed to the
local flow bound to each flow id (a ``socketflow.LocalFlow``: a ``SocketFlow`` for TCP, a
``udpflow.UdpFlow`` for UDP and DNS; the wire carries DATA only on the first and DATAGRAM only
on the second)."""

from __future__ import annotations

from typing import TypeVar

from ..basics.metrics import Stats
from ..wire import events as ev
from .socketflow import BufferBudget, LocalFlow
from .tunnel import TunnelBase, TunnelHandler

S = TypeVar("S")


class EndpointNode(TunnelHandler[LocalFlow, S]):
    """Routes flow events of a tunnel to the local flow bound to each flow id."""

    stats: Stats
    socket_buffer: int = 262144
    udp_backlog: int = 32768  # FERRYMAN_UDP_BACKLOG (the node sets it from its settings)
    buffer_budget: BufferBudget  # FERRYMAN_FLOW_BUFFER_BUDGET (the node makes it from its settings)

    def data_received(self, tunnel: TunnelBase[LocalFlow, S], event: ev.DataReceived) -> None:
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.on_data(event.data)

    def credit_available(self, tunnel: TunnelBase[LocalFlow, S], event: ev.CreditAvailable) -> None:
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.on_credit()

    def flow_ended(self, tunnel: TunnelBase[LocalFlow, S], event: ev.FlowEnded) -> None:
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.on_fin()

    def flow_closed(self, tunnel: TunnelBase[LocalFlow, S], event: ev.FlowClosed) -> None:
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.on_closed()

    def flow_reset(self, tunnel: TunnelBase[LocalFlow, S], event: ev.FlowReset) -> None:
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.on_reset(event.code, event.reason)

    def open_refused(self, tunnel: TunnelBase[LocalFlow, S], event: ev.OpenRefused) -> None:
        self.stats.count(self.stats.open_failures, event.code)

    def datagram_received(self, tunnel: TunnelBase[LocalFlow, S], event: ev.DatagramReceived) -> None:
        flow = tunnel.routes.get(event.flow_id)
        if flow is not None:
            flow.on_datagram(event.data)
        else:  # the flow is ending here and its RST is on the way
            self.stats.count(self.stats.datagrams_dropped, "flow_closed")

    def reset_all(self, tunnel: TunnelBase[LocalFlow, S], code: str, reason: str) -> None:
        """The tunnel is gone: reset every local socket that rode on it."""
        for flow in list(tunnel.routes.values()):
            flow.on_reset(code, reason)
        tunnel.routes.clear()
