"""Direct connections of the client agent: what the forwarding profile routes ``"direct"``.

A SOCKS5 or HTTP CONNECT request whose destination the agent routes ``"direct"`` is not
tunnelled: this device dials it itself. ``DirectRelay`` takes over the app's connection
(after the SOCKS / HTTP handshake), dials ``host:port`` (FERRYMAN_DIAL_TIMEOUT), reports
the outcome with the same codes the edge would use (``dial_refused``, ``dial_timeout``,
``dns_error``, ``dial_error``) so the front end answers as for a tunnelled flow, then relays
bytes both ways with back-pressure: a side whose write buffer passes its high-water mark
stops the other side from being read until it drains. Half-close passes through (EOF one
way keeps the other way open); a reset or error on one side aborts the other.

``DirectUdp`` is the UDP counterpart for SOCKS5 UDP ASSOCIATE: one connected UDP socket per
destination, with the same bounded queue while it opens and the same idle timeout as a
tunnelled UDP flow.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable

from ..transport.socketflow import reset_transport
from .opener import FlowOpener

log = logging.getLogger("ferryman.direct")

# on_result(code, reason): "" when connected (the front end writes its success reply, the
# relay then starts), else the failure (the front end answers and the app connection closes).
Result = Callable[[str, str], None]


def dial_failure(exc: BaseException, target: str, timeout: float) -> tuple[str, str]:
    """The edge's code and a reason for a failed local dial."""
    if isinstance(exc, TimeoutError):
        return "dial_timeout", f"{target}: no answer within {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return "dns_error", f"cannot resolve {target.rsplit(':', 1)[0]}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return "dial_refused", f"connection refused by {target}"
    if isinstance(exc, OSError):
        return "dial_error", f"{target}: {exc.strerror or exc}"
    return "dial_error", f"{target}: {exc}"


class _Side(asyncio.Protocol):
    """One of the two connections of a relay; until the relay starts, what it reads waits here
    (one read at most: reading stops)."""

    def __init__(self, relay: "DirectRelay") -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        high = self.relay.client.socket_buffer
        transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[attr-defined]
        if not self.relay.started:
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.relay.started:
            self.buffer += data
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        out = self.other.transport  # type: ignore[union-attr]
        if out is not None and not out.is_closing():
            out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.relay.started:
            self.relay.pass_eof(self)
        return True

    def pause_writing(self) -> None:
        out = self.other.transport if self.other is not None else None
        if out is not None and not out.is_closing():
            out.pause_reading()

    def resume_writing(self) -> None:
        out = self.other.transport if self.other is not None else None
        if out is not None and not out.is_closing() and self.relay.started:
            out.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)

    def reset(self) -> None:
        reset_transport(self.transport)


class DirectRelay:
    """The app's connection ``app_transport`` relayed to ``host:port`` dialed from this device.
    ``early``: bytes the app sent after its request (sent on once connected)."""

    def __init__(self, client: FlowOpener, app_transport: asyncio.Transport, host: str, port: int,
                 early: bytes, on_result: Result) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.target = f"{host}:{port}"
        self.on_result: Result | None = on_result
        self.started = False
        self.closed = False
        self.app = _Side(self)
        self.remote = _Side(self)
        self.app.other, self.remote.other = self.remote, self.app
        self.app.buffer += early
        app_transport.pause_reading()
        app_transport.set_protocol(self.app)
        self.app.connection_made(app_transport)
        self.task = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.client.settings.dial_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._connect(loop)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is answered
            code, reason = dial_failure(exc, self.target, timeout)
            log.warning("direct flow failed", extra={"dest": self.target, "code": code, "reason": reason})
            self._result(code, reason)
            self.closed = True
            if self.app.transport is not None:
                self.app.transport.close()
            return
        if self.app.lost or self.closed:
            self.remote.transport.close()  # type: ignore[union-attr]
            return
        log.info("direct flow", extra={"dest": self.target, "source": self.client_peer()})
        self._result("", "")
        self.started = True
        for side in (self.app, self.remote):
            out = side.other.transport  # type: ignore[union-attr]
            if side.buffer and out is not None and not out.is_closing():
                out.write(bytes(side.buffer))
            side.buffer.clear()
        for side in (self.app, self.remote):
            if side.eof:
                self.pass_eof(side)
            elif side.transport is not None and not side.transport.is_closing():
                side.transport.resume_reading()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dial ``host:port`` with ``self.remote`` as the protocol (transparent capture marks its socket)."""
        await loop.create_connection(lambda: self.remote, self.host, self.port)

    def pass_eof(self, side: _Side) -> None:
        """``side`` read EOF: half-close the other; both done: close."""
        other = side.other
        assert other is not None
        if other.eof:
            self.close()
            return
        out = other.transport
        if out is not None and not out.is_closing() and out.can_write_eof():
            out.write_eof()

    def client_peer(self) -> str:
        peer = self.app.transport.get_extra_info("peername") if self.app.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def _result(self, code: str, reason: str) -> None:
        callback, self.on_result = self.on_result, None
        if callback is not None and self.app.transport is not None and not self.app.transport.is_closing():
            callback(code, reason)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.app and not self.task.done():
            self.task.cancel()  # the app left while we dialed
        other = side.other
        assert other is not None
        if exc is not None:
            other.reset()
        elif other.transport is not None and not other.transport.is_closing():
            other.transport.close()
        self.closed = True

    def close(self) -> None:
        self.closed = True
        for side in (self.app, self.remote):
            if side.transport is not None:
                side.transport.close()


class _DirectSocket(asyncio.DatagramProtocol):
    def __init__(self, flow: "DirectUdp") -> None:
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.flow.on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        stats = self.flow.client.stats
        stats.count(stats.datagrams_dropped, "direct_error")


class DirectUdp:
    """One UDP destination reached from this device: ``from_local`` sends, ``send`` delivers
    answers locally, ``on_close(self)`` when it ends (idle, error, ``close``)."""

    def __init__(self, client: FlowOpener, host: str, port: int, send: Callable[[bytes | memoryview], None],
                 on_close: Callable[[DirectUdp], None]) -> None:
        settings = client.settings
        self.client = client
        self.host = host
        self.port = port
        self.send = send
        self.on_close = on_close
        self.done = False
        self.idle = settings.udp_idle_timeout
        self.queue: collections.deque[bytes] = collections.deque(maxlen=settings.udp_queue)
        self.transport: asyncio.DatagramTransport | None = None
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.task = loop.create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.client.settings.dial_timeout
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_datagram_endpoint(lambda: _DirectSocket(self),
                                                                   remote_addr=(self.host, self.port))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            code, reason = dial_failure(exc, f"{self.host}:{self.port}", timeout)
            log.warning("direct udp flow failed", extra={"dest": f"{self.host}:{self.port}", "code": code,
                                                          "reason": reason})
            stats = self.client.stats
            stats.count(stats.datagrams_dropped, "flow_refused", len(self.queue))
            self.close(code, reason)
            return
        if self.done:
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        queued, self.queue = list(self.queue), collections.deque(maxlen=self.queue.maxlen)
        for data in queued:
            self.from_local(data)
        self.timer = loop.call_later(self.idle, self._idle_check)

    def from_local(self, data: bytes) -> None:
        if self.done:
            return
        stats = self.client.stats
        if self.transport is None:
            if len(self.queue) == self.queue.maxlen:
                stats.count(stats.datagrams_dropped, "queue_full")
            else:
                self.queue.append(data)
            return
        self.last = asyncio.get_running_loop().time()
        try:
            self.transport.sendto(data)
        except OSError:
            stats.count(stats.datagrams_dropped, "direct_error")

    def on_datagram(self, data: bytes) -> None:
        if self.done:
            return
        self.last = asyncio.get_running_loop().time()
        try:
            self.send(data)
        except OSError:
            stats = self.client.stats
            stats.count(stats.datagrams_dropped, "local_error")

    def _idle_check(self) -> None:
        self.timer = None
        if self.done:
            return
        quiet = asyncio.get_running_loop().time() - self.last
        if quiet >= self.idle:
            self.close("idle_timeout", f"no datagram for {self.idle:g}s")
        else:
            self.timer = asyncio.get_running_loop().call_later(self.idle - quiet, self._idle_check)

    def close(self, code: str = "closed", reason: str = "") -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.task.done() and asyncio.current_task() is not self.task:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()
        self.queue.clear()
        self.on_close(self)
