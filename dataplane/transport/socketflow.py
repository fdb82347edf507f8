"""One local TCP connection bridged to one tunnel flow, for the client agent and the connector.

``SocketFlow`` is the asyncio Protocol of the local socket (the app's connection at the
client, the backend connection at the connector). Bytes read from the socket go out as
DATA within the flow's credit; when credit runs out the socket stops being read. Bytes
from the tunnel are written to the socket and acknowledged (credit returned) only while
the socket's write buffer is below its high-water mark, so a reader that stops holds at
most one window of its own data and never slows the other flows of the tunnel.
Half-close maps to FIN both ways; a reset maps to RST and to a TCP reset of the socket.

One flow holds at most its socket's high-water mark plus one window; a node's flows together
hold at most ``BufferBudget`` (FERRYMAN_FLOW_BUFFER_BUDGET): a peer that opens many flows
toward local sockets that read nothing (a backend that accepts and waits) would otherwise
park a window in each of thousands of flows. Past the budget the flows that have held bytes
the longest are reset (``buffer_budget``), so a socket that drains keeps its flow.

``FlowNode`` is what such a flow needs of the node it belongs to (its ``Stats`` and the
socket buffer size); ``endpoint.EndpointNode`` routes a tunnel's events to the flows.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol, Self

from ..basics.caps import LogLimiter
from ..basics.metrics import Stats
from ..wire.connection import FlowError
from .tunnel import TunnelBase

log = logging.getLogger("ferryman.flow")
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.Transport | None) -> None:
    """End a TCP connection with a reset (SO_LINGER 0, then abort), so the peer sees ECONNRESET."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


class BufferBudget:
    """Bytes that the tunnel's flows have written to local sockets and the sockets have not taken
    yet (their transports' write buffers), for one node, at most ``limit`` in all.

    A flow's share is observed when the tunnel hands it data and when its socket drains to the
    low-water mark (``SocketFlow._observe``); a buffer that drained in between only makes the
    total look larger, so before shedding the total is recounted from the transports. Past the
    limit the flows whose sockets have gone the longest without taking a byte are reset with
    ``buffer_budget`` until the rest fits: ``_holding`` is in that order, a flow moving to its
    end whenever its socket is seen to have taken bytes, so a socket that reads nothing stays at
    the front and one that drains, however slowly, keeps moving back."""

    __slots__ = ("limit", "total", "_holding", "shed_flows", "_log_limit")

    def __init__(self, limit: int, stats: Stats | None = None) -> None:
        self.limit = limit
        self._log_limit = stats.log_limit if stats is not None else LogLimiter()
        self.total = 0
        self._holding: dict[SocketFlow, int] = {}  # flow -> bytes it holds, as last seen
        self.shed_flows = 0

    def gauge(self) -> tuple[str, Callable[[], float]]:
        """The node's ``ferryman_flow_buffer_bytes`` gauge (``Stats.extra``)."""
        return ("Bytes the flows hold for local sockets that have not taken them yet, as last seen "
                "(at most FERRYMAN_FLOW_BUFFER_BUDGET)", lambda: self.total)

    def observe(self, flow: SocketFlow, held: int, drained: bool) -> None:
        """``flow`` holds ``held`` bytes now; ``drained``: its socket took bytes since it was last
        seen. Sheds flows if the total passes the limit."""
        self.total += held - self._place(flow, held, drained)
        if self.total > self.limit:
            self._shed()

    def _place(self, flow: SocketFlow, held: int, drained: bool) -> int:
        """Note ``flow``'s ``held`` bytes in the shedding order; what it held before."""
        holding = self._holding
        before = holding.pop(flow, 0) if drained or not held else holding.get(flow, 0)
        if held:
            holding[flow] = held  # a flow that drained goes to the back; one that did not keeps its place
        return before

    def forget(self, flow: SocketFlow) -> None:
        self.total -= self._holding.pop(flow, 0)

    def _shed(self) -> None:
        holding = self._holding
        for flow in list(holding):  # recounted: buffers drained since they were last seen
            transport = flow.transport
            self._place(flow, *flow.seen(transport.get_write_buffer_size() if transport is not None else 0, 0))
        self.total = sum(holding.values())
        shed = 0
        while self.total > self.limit and holding:
            flow = next(iter(holding))
            self.forget(flow)
            shed += 1
            try:
                flow.abort("buffer_budget", f"the node holds more than {self.limit} bytes for local sockets that "
                                            "are not reading; this flow's socket has gone the longest without "
                                            "taking a byte")
            except Exception:  # noqa: BLE001 - one flow's failure must not stop the shedding or its caller
                log.exception("resetting a flow over the buffer budget failed")
        if not shed:
            return
        self.shed_flows += shed
        self._log_limit.log(log, logging.WARNING, "buffer_budget",
                            f"flow buffer budget of {self.limit} bytes passed: reset {shed} flow(s) whose local "
                            "sockets stopped reading", {"code": "buffer_budget", "flows": shed})


class FlowNode(Protocol):
    """The node a local flow belongs to: its counters, the local sockets' write buffer and the
    budget of bytes all its flows may hold for local sockets."""

    stats: Stats
    socket_buffer: int
    buffer_budget: BufferBudget
    udp_backlog: int  # FERRYMAN_UDP_BACKLOG: a datagram is dropped rather than queued behind more


class LocalFlow:
    """A tunnel flow's local end, as ``endpoint.EndpointNode`` hands it the flow's events. The wire
    carries stream events (DATA, credit, FIN) on TCP flows only and datagrams on UDP flows only,
    so each kind implements its own; getting the other kind's is a bug here."""

    __slots__ = ()

    def on_data(self, data: memoryview) -> None:
        raise TypeError(f"{type(self).__name__} carries no stream data")

    def on_credit(self) -> None:
        raise TypeError(f"{type(self).__name__} has no credit")

    def on_fin(self) -> None:
        raise TypeError(f"{type(self).__name__} has no half-close")

    def on_closed(self) -> None:
        raise TypeError(f"{type(self).__name__} has no half-close")

    def on_datagram(self, data: memoryview) -> None:
        raise TypeError(f"{type(self).__name__} carries no datagrams")

    def on_reset(self, code: str, reason: str) -> None:
        raise NotImplementedError


class SocketFlow(asyncio.Protocol, LocalFlow):
    __slots__ = (
        "node", "tunnel", "flow_id", "transport", "active", "pending", "fin_pending",
        "sent_fin", "got_fin", "write_paused", "unacked", "done", "on_connect", "peer", "dialing",
        "buffered", "pinned",
    )

    def __init__(self, node: FlowNode, on_connect: Callable[[Self], None] | None = None) -> None:
        self.node = node
        self.tunnel: TunnelBase[Any, Any] | None = None
        self.flow_id = 0
        self.transport: asyncio.Transport | None = None
        self.active = False
        self.pending: memoryview | None = None
        self.fin_pending = False
        self.sent_fin = False
        self.got_fin = False
        self.write_paused = False
        self.unacked = 0
        self.done = False
        self.on_connect = on_connect
        self.peer = ""
        # The connector's task opening the backend socket: a flow that ends first cancels it, so a
        # reset OPEN stops resolving and connecting at once (its socket closed).
        self.dialing: asyncio.Task[None] | None = None
        # The transport's write buffer as last seen, and the size of a tunnel read buffer that a
        # view left in it keeps alive (the event loop holds views, not copies): the flow's share
        # of the node's ``BufferBudget`` is their sum.
        self.buffered = 0
        self.pinned = 0

    # ------------------------------------------------------------------ binding
    def bind(self, tunnel: TunnelBase[Any, Any], flow_id: int) -> None:
        self.tunnel = tunnel
        self.flow_id = flow_id
        tunnel.routes[flow_id] = self

    def activate(self) -> None:
        """The flow is open on the tunnel and the socket is connected: start relaying."""
        self.active = True
        self.node.stats.flows_active += 1
        self.node.stats.flows_opened += 1
        if self.pending is not None:
            self.on_credit()  # early bytes first; then FIN or reading resumes
        elif self.fin_pending:
            self._send_fin()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # ------------------------------------------------------------------ local socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        high = self.node.socket_buffer
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if not self.active:
            transport.pause_reading()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        if self.on_connect is not None:
            self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # uvloop starts reading right after connection_made even if it paused: keep
            # what arrives before OPEN_OK (one read at most) and stop reading.
            self.pending = memoryview(bytes(self.pending) + data) if self.pending is not None else memoryview(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        tunnel = self.tunnel
        if tunnel is None or self.done:
            return
        try:
            n = tunnel.send_data(self.flow_id, data)
        except FlowError:
            self.abort()
            return
        self.node.stats.bytes_tx += n
        if n < len(data):
            self.pending = memoryview(data)[n:]
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if self.pending is not None or not self.active:
            self.fin_pending = True
        else:
            self._send_fin()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        transport = self.transport
        if transport is None or self.done:
            return
        self._observe(transport.get_write_buffer_size(), 0)
        if self.unacked and self.tunnel is not None and not self.done:
            self.tunnel.acknowledge(self.flow_id, self.unacked)
            self.unacked = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.node.buffer_budget.forget(self)  # also a flow that ended with bytes still to write
        if self.done:
            return
        tunnel = self.tunnel
        if tunnel is not None and tunnel.has_flow(self.flow_id):
            reason = f"local connection reset: {exc}" if exc else "local connection closed"
            tunnel.reset(self.flow_id, "reset", reason)
        self._finish("reset" if exc or not (self.sent_fin and self.got_fin) else "fin")

    # ------------------------------------------------------------------ tunnel side
    def on_data(self, data: memoryview) -> None:
        n = len(data)
        self.node.stats.bytes_rx += n
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        before = transport.get_write_buffer_size()
        # Behind bytes already waiting, the frame waits too: give the loop a copy, so that it keeps
        # no view into (and so alive) the tunnel's whole read buffer.
        transport.write(bytes(data) if before else data)
        after = transport.get_write_buffer_size()
        if after and not before:  # the socket took part of the view: the rest keeps its buffer alive
            self.pinned = len(data.obj) if isinstance(data.obj, (bytes, bytearray)) else n
        if after or self.buffered:
            self._observe(after, n)
            if self.done:  # shed by the budget
                return
        if self.write_paused:
            self.unacked += n
        else:
            self.tunnel.acknowledge(self.flow_id, n)  # type: ignore[union-attr]

    def on_credit(self) -> None:
        pending = self.pending
        if pending is None or self.done:
            return
        n = self.tunnel.send_data(self.flow_id, pending)  # type: ignore[union-attr]
        self.node.stats.bytes_tx += n
        if n < len(pending):
            self.pending = pending[n:]
            return
        self.pending = None
        if self.fin_pending:
            self._send_fin()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def on_fin(self) -> None:
        self.got_fin = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def on_closed(self) -> None:
        """FIN went both ways: the flow is finished cleanly."""
        self._finish("fin")
        transport = self.transport
        if transport is not None:
            transport.close()
            size = transport.get_write_buffer_size()
            if size:  # still counted until the socket takes it (connection_lost) or the budget resets it
                self._observe(size, 0)

    def on_reset(self, code: str, reason: str) -> None:
        log.info("flow reset", extra={"flow": self.flow_id, "peer": self.peer, "code": code, "reason": reason})
        self._finish(code)
        self._reset_socket()

    # ------------------------------------------------------------------ helpers
    def seen(self, size: int, written: int) -> tuple[int, bool]:
        """The transport holds ``size`` bytes after ``written`` more were handed to it since it was
        last seen: the flow's share of the budget now, and whether the socket took bytes meanwhile."""
        drained = self.buffered + written > size
        self.buffered = size
        if not size:
            self.pinned = 0
        return (size + self.pinned if size else 0), drained

    def _observe(self, size: int, written: int) -> None:
        """Tell the budget what the transport holds now (``seen``)."""
        self.node.buffer_budget.observe(self, *self.seen(size, written))

    def abort(self, code: str = "reset", reason: str = "aborted") -> None:
        """Reset both the flow and the socket (local decision)."""
        if self.tunnel is not None and self.tunnel.has_flow(self.flow_id):
            self.tunnel.reset(self.flow_id, code, reason)
        self._finish(code)
        self._reset_socket()

    def _send_fin(self) -> None:
        self.fin_pending = False
        tunnel = self.tunnel
        if tunnel is None or self.sent_fin or not tunnel.has_flow(self.flow_id):
            return
        self.sent_fin = True
        if tunnel.send_fin(self.flow_id):
            self.on_closed()

    def _reset_socket(self) -> None:
        reset_transport(self.transport)

    def _finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.node.buffer_budget.forget(self)
        if self.dialing is not None:
            self.dialing.cancel()
        if self.tunnel is not None:
            self.tunnel.routes.pop(self.flow_id, None)
        stats = self.node.stats
        if self.active:
            stats.flows_active -= 1
            stats.count(stats.flows_closed, reason)
