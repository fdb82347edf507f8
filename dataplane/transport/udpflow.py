"""One UDP conversation bridged to one tunnel flow, for the client agent and the connector.

A UDP flow is opened like a TCP flow (OPEN with protocol ``udp``, answered OPEN_OK or
OPEN_FAIL) and then carries DATAGRAM frames only: no credit, no FIN. ``UdpFlow`` holds
one side of it: ``send`` hands a datagram from the tunnel to the local socket (the app's
address at the client, the backend's connected socket at the connector), and
``from_local`` takes one the other way. Nothing is queued without bound and nothing is
dropped silently: while the flow opens at most ``FERRYMAN_UDP_QUEUE`` datagrams wait,
and a datagram that cannot be carried (queue full, tunnel write buffer full or holding
``FERRYMAN_UDP_BACKLOG`` bytes already, larger than the tunnel allows, the local socket's
buffer full) is counted in ``ferryman_datagrams_dropped_total`` by reason: a datagram late is
worth less than one lost. A flow given ``send_batch`` collects the datagrams that one pass of
the event loop brings from the tunnel (at most ``MAX_OUTBOX``) and hands them to the local
socket together at the start of the next pass, so a busy flow costs one system call per run of
datagrams (``udpio.UdpEndpoint.send_all``, GSO) instead of one each.
A flow with no datagram either way for ``FERRYMAN_UDP_IDLE_TIMEOUT`` seconds ends with
RST ``idle_timeout``, which the edge passes on to the other side.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from ..wire.connection import FlowError
from .socketflow import FlowNode, LocalFlow
from .tunnel import TunnelBase

log = logging.getLogger("ferryman.udp")

MAX_OUTBOX = 1024  # datagrams a flow collects for one batch before it sends them at once


class UdpFlow(LocalFlow):
    """``send(data)``: deliver a datagram locally; ``on_close(flow)``: the flow ended (release
    the socket or the address). ``dest``/``on_opened`` are the client's (what to open, who
    waits for the answer)."""

    __slots__ = ("node", "send", "send_batch", "outbox", "loop", "on_close", "tunnel", "flow_id", "active",
                 "done", "queue", "last", "timer", "idle", "dest", "peer", "on_opened", "protocol",
                 "too_large_logged", "released", "dialing")

    def __init__(self, node: FlowNode, send: Callable[[bytes | memoryview], None],
                 on_close: Callable[[UdpFlow], None], *, idle: float, queue: int,
                 dest: tuple[str, int] | None = None, peer: str = "",
                 send_batch: Callable[[list[bytes]], None] | None = None) -> None:
        self.node = node
        self.send = send
        self.send_batch = send_batch  # several datagrams at once, in order (None: ``send`` each)
        self.outbox: list[bytes] = []
        self.loop = asyncio.get_running_loop()
        self.on_close = on_close
        self.tunnel: TunnelBase[Any, Any] | None = None
        self.flow_id = 0
        self.active = False
        self.done = False
        self.queue: collections.deque[bytes] = collections.deque(maxlen=queue)
        self.idle = idle
        self.last = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.dest = dest
        self.peer = peer
        self.on_opened: Callable[[UdpFlow, str, str], None] | None = None
        self.protocol = "udp"
        self.too_large_logged = False
        self.released = False  # _finish ran (``done`` may be set earlier by the node)
        # The connector's task opening the backend socket (resolution first): cancelled if the flow ends first.
        self.dialing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, tunnel: TunnelBase[Any, Any], flow_id: int) -> None:
        self.tunnel = tunnel
        self.flow_id = flow_id
        tunnel.routes[flow_id] = self

    def activate(self) -> None:
        """The flow is open: send what waited and start the idle clock."""
        self.active = True
        stats = self.node.stats
        stats.flows_active += 1
        stats.flows_opened += 1
        queued, self.queue = self.queue, collections.deque(maxlen=self.queue.maxlen)
        for data in queued:
            self.from_local(data)
        if self.timer is not None:  # the client's open timeout
            self.timer.cancel()
        self._arm(self.idle)

    def opened(self, code: str, reason: str) -> None:
        """The answer to our OPEN ("" when open); a refusal ends the flow."""
        if self.timer is not None and not self.active:
            self.timer.cancel()
            self.timer = None
        callback, self.on_opened = self.on_opened, None
        if callback is not None:
            callback(self, code, reason)
        if code:
            self._finish(code)

    # ------------------------------------------------------------------ datagrams
    def from_local(self, data: bytes) -> None:
        """A datagram from the local socket, for the other end of the flow."""
        if self.done:
            return
        stats = self.node.stats
        if not self.active:
            if len(self.queue) == self.queue.maxlen:
                stats.count(stats.datagrams_dropped, "queue_full")
                return
            self.queue.append(data)
            return
        self.last = self.loop.time()
        tunnel = self.tunnel
        if tunnel is None or tunnel.closed:
            stats.count(stats.datagrams_dropped, "tunnel_lost")
            return
        if not tunnel.takes_datagram(self.node.udp_backlog):
            stats.count(stats.datagrams_dropped, "tunnel_busy")
            return
        try:
            if not tunnel.send_datagram(self.flow_id, data):
                stats.count(stats.datagrams_dropped, "flow_closed")  # its end is on the way to this flow
                return
        except FlowError as exc:
            stats.count(stats.datagrams_dropped, exc.code)
            if exc.code == "datagram_too_large" and not self.too_large_logged:
                self.too_large_logged = True  # once per flow: the app keeps sending the same size
                log.warning("datagram dropped", extra={"flow": self.flow_id, "peer": self.peer, "code": exc.code,
                                                        "reason": exc.message})
            return
        stats.datagrams_tx += 1
        stats.bytes_tx += len(data)

    def on_datagram(self, data: memoryview) -> None:
        """A datagram from the tunnel, for the local socket."""
        if self.done:
            return
        self.last = self.loop.time()
        stats = self.node.stats
        stats.datagrams_rx += 1
        stats.bytes_rx += len(data)
        if self.send_batch is not None:
            outbox = self.outbox
            outbox.append(bytes(data))  # the tunnel's read buffer is reused: keep a copy until sent
            if len(outbox) == 1:
                self.loop.call_soon(self.deliver)
            elif len(outbox) >= MAX_OUTBOX:
                self.deliver()
            return
        try:
            self.send(data)
        except Exception as exc:  # e.g. the local socket went away under us: never into the tunnel's callback
            stats.count(stats.datagrams_dropped, "local_error")
            log.info("datagram not delivered", extra={"flow": self.flow_id, "peer": self.peer, "reason": str(exc)})

    def deliver(self) -> None:
        """Hand the collected datagrams to the local socket (scheduled by the first of a batch)."""
        parts = self.outbox
        if not parts or self.send_batch is None:
            return
        self.outbox = []
        if self.done:  # ended while they waited: never sent, counted
            stats = self.node.stats
            stats.count(stats.datagrams_dropped, "flow_closed", len(parts))
            return
        try:
            self.send_batch(parts)
        except Exception as exc:  # as in on_datagram: the flow's own trouble, counted and logged
            stats = self.node.stats
            stats.count(stats.datagrams_dropped, "local_error", len(parts))
            log.info("datagrams not delivered", extra={"flow": self.flow_id, "peer": self.peer, "reason": str(exc)})

    # ------------------------------------------------------------------ ending
    def _arm(self, delay: float) -> None:
        self.timer = self.loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        self.timer = None
        if self.done:
            return
        quiet = self.loop.time() - self.last
        if quiet >= self.idle:
            self.close("idle_timeout", f"no datagram for {self.idle:g}s")
        else:
            self._arm(self.idle - quiet)

    def close(self, code: str, reason: str) -> None:
        """End the flow here (idle, local socket gone, shutdown): RST to the other end."""
        tunnel = self.tunnel
        if tunnel is not None and tunnel.has_flow(self.flow_id):
            tunnel.reset(self.flow_id, code, reason)
        self._finish(code)

    abort = close

    def on_reset(self, code: str, reason: str) -> None:
        """The other end (or the lost tunnel) ended the flow."""
        log.info("udp flow ended", extra={"flow": self.flow_id, "peer": self.peer, "code": code, "reason": reason})
        self._finish(code)

    def _finish(self, reason: str) -> None:
        if self.released:
            return
        if self.outbox:
            self.deliver()  # what came before the end still goes out
        self.released = self.done = True
        if self.dialing is not None:
            self.dialing.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        if self.tunnel is not None:
            self.tunnel.routes.pop(self.flow_id, None)
        if self.active:
            stats = self.node.stats
            stats.flows_active -= 1
            stats.count(stats.flows_closed, reason)
        self.on_close(self)

