"""A tunnel flow the edge opens itself for its HTTPS front door: a ``ByteStream`` to a web
app's backend through a connector.

The edge files a ``WebFlow`` in the connector tunnel's ``routes`` under the flow id, like a
``Splice``, and hands it the tunnel's events for that flow (``accepted``, ``refused``,
``data``, ``ended``, ``credit``, ``closed``, ``reset``). The front door reads and writes
it through the ``ByteStream`` methods. Credit goes back to the connector only for bytes
the front door has read (``read``), so a slow browser holds the backend back through the
tunnel's per-flow window instead of filling the edge's memory; writes beyond the flow's
credit wait in ``pending`` and ``drain`` waits while more than ``HIGH_WATER`` bytes do.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from ..transport.tunnel import TunnelBase
from ..wire.connection import FlowError

HIGH_WATER = 262144  # bytes written and not yet taken by the flow before drain() waits


class WebFlow:
    __slots__ = ("connector", "kfid", "peer", "relay_edge", "app", "connection", "opened", "remote", "_chunks", "_eof",
                 "_reset", "_reader", "_pending", "_pending_bytes", "_fin_pending", "_drainer", "closed",
                 "sent", "received", "_loop", "_sink", "_held")

    def __init__(self, connector: TunnelBase[Any, Any], kfid: int, app: str, connection: str,
                 relay_to: str = "") -> None:
        """``connector``: the tunnel carrying the flow, a connector's or, with ``relay_to`` (the
        connector's name), a relay tunnel to the sibling worker or peer edge that holds it."""
        self.connector = connector
        self.kfid = kfid
        self.peer = relay_to or connector.peer_name  # the connector's name
        self.relay_edge = connector.peer_name if relay_to else ""
        self.app = app
        self.connection = connection
        # kept: asyncio.get_running_loop() costs a getpid() system call per call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self.remote = ""
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._reset = ""
        self._reader: asyncio.Future[None] | None = None
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        self._fin_pending = False
        self._drainer: asyncio.Future[None] | None = None
        self.closed = False
        self.sent = 0  # bytes towards the backend
        self.received = 0
        self._sink: Any = None  # ``attach``: data handed on as it arrives
        self._held = 0  # bytes the sink took but asked to hold the credit of (``release``)

    # ------------------------------------------------------------------ tunnel events (from the edge)
    def accepted(self, remote: str) -> None:
        self.remote = remote
        if not self.opened.done():
            self.opened.set_result(None)

    def refused(self, code: str, reason: str) -> None:
        self._gone(code, reason)

    def data(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        sink = self._sink
        if sink is not None:
            if sink.flow_data(bytes(data)):
                self._acknowledge(len(data))
            else:
                self._held += len(data)
            return
        self._chunks.append(bytes(data))
        self._wake_reader()

    def ended(self) -> None:
        self._eof = True
        self._wake_reader()
        if self._sink is not None:
            self._sink.flow_ended()

    def credit(self) -> None:
        tunnel, fid = self.connector, self.kfid
        pending = self._pending
        while pending:
            chunk = pending[0]
            try:
                sent = tunnel.send_data(fid, chunk)
            except FlowError:
                return
            self._pending_bytes -= sent
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                break
            pending.popleft()
        if not pending:
            if self._fin_pending:
                self._fin_pending = False
                self._send_fin()
        self._wake_drainer()

    def reset(self, code: str, reason: str) -> None:
        self._gone(code, reason)

    def _gone(self, code: str, reason: str) -> None:
        """The flow is over (refused, reset, tunnel lost): readers see the end, writers stop."""
        self.closed = True
        self._reset = f"{code}: {reason}" if reason else code
        self._eof = True
        self._pending.clear()
        self._pending_bytes = 0
        if not self.opened.done():
            self.opened.set_exception(FlowRefused(code, reason))
            self.opened.exception()  # retrieved here: nobody may be waiting any more
        self._wake_reader()
        self._wake_drainer()
        if self._sink is not None:
            self._sink.flow_ended()

    def _wake_reader(self) -> None:
        waiter = self._reader
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drainer(self) -> None:
        waiter = self._drainer
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def eof(self) -> bool:
        """The connector ended the flow (or it is over): nothing more will arrive."""
        return self._eof

    @property
    def draining(self) -> bool:
        """The tunnel carrying the flow takes no new flows (its connector or this edge moves or
        drains it): a pooled backend connection on it is not used again, so the tunnel empties."""
        return self.connector.draining

    # ------------------------------------------------------------------ ByteStream (the front door)
    async def read(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        chunks = self._chunks
        chunk = chunks.popleft()
        if len(chunk) > max_bytes:
            chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        elif chunks and len(chunk) + len(chunks[0]) <= max_bytes:
            # several pieces arrived together: one read takes as many whole ones as fit
            parts = [chunk]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                piece = chunks.popleft()
                parts.append(piece)
                size += len(piece)
            chunk = b"".join(parts)
        self._acknowledge(len(chunk))
        return chunk

    def _acknowledge(self, size: int) -> None:
        if not self.closed and self.connector.has_flow(self.kfid):
            self.connector.acknowledge(self.kfid, size)

    def attach(self, sink: Any) -> None:
        """Hand the flow's bytes to ``sink`` as they arrive instead of ``read`` (``None``: back to
        ``read``): ``sink.flow_data(data)`` returns False to hold the credit of what it took until
        ``release`` (the connector stops once the window is spent), ``sink.flow_ended()`` when
        the flow ends. What arrived before is handed over first."""
        self._sink = sink
        if sink is None:
            self.release()
            return
        chunks = self._chunks
        while chunks and self._sink is sink:
            data = chunks.popleft()
            if sink.flow_data(data):
                self._acknowledge(len(data))
            else:
                self._held += len(data)
        if self._eof and not chunks and self._sink is sink:
            sink.flow_ended()

    def release(self) -> None:
        """The sink takes bytes again: the credit it held goes back to the connector."""
        held, self._held = self._held, 0
        if held:
            self._acknowledge(held)

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        size = len(data)
        self.sent += size
        if self._pending:
            self._pending.append(memoryview(data))
            self._pending_bytes += size
            return
        try:
            sent = self.connector.send_data(self.kfid, data)
        except FlowError:
            return
        if sent < size:
            self._pending.append(memoryview(data)[sent:])
            self._pending_bytes += size - sent

    async def drain(self) -> None:
        while self._pending_bytes > HIGH_WATER and not self.closed:
            self._drainer = self._loop.create_future()
            try:
                await self._drainer
            finally:
                self._drainer = None
        if self.closed and self._reset and self._pending_bytes:
            raise ConnectionResetError(f"the flow to the backend ended ({self._reset})")

    def write_eof(self) -> None:
        if self.closed:
            return
        if self._pending:
            self._fin_pending = True
        else:
            self._send_fin()

    def _send_fin(self) -> None:
        tunnel = self.connector
        if tunnel.has_flow(self.kfid):
            try:
                if tunnel.send_fin(self.kfid):
                    tunnel.routes.pop(self.kfid, None)
            except FlowError:
                pass

    def close(self) -> None:
        """Abort the flow (RST to the connector) unless it is over already."""
        if self.closed:
            return
        self.closed = True
        self._eof = True
        tunnel = self.connector
        tunnel.routes.pop(self.kfid, None)
        if tunnel.has_flow(self.kfid):
            tunnel.reset(self.kfid, "cancelled", "the edge closed the web backend connection")
        if not self.opened.done():
            self.opened.cancel()
        self._wake_reader()
        self._wake_drainer()


class FlowRefused(Exception):
    """The connector refused the flow, or it was reset before it opened."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason
