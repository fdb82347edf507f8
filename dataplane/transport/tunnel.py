"""Asyncio adapter that runs one ``TunnelConnection`` over a mutually authenticated TLS stream,
and what every tunnel offers its node whatever carries it (``TunnelBase``).

A node drives a tunnel only through ``TunnelBase``'s methods (``open_flow``, ``accept``,
``reject``, ``reset``, ``send_data``, ``send_fin``, ``send_datagram``, ``acknowledge``,
``send_auth``, ``goaway``, ...): each queues its frames in the sans-I/O connection and the
tunnel flushes itself, once per loop iteration, or at the end of the read that the node is
answering (so nothing the node queues while handling an event costs a flush of its own). A node's per-flow objects live in ``routes`` and its per-tunnel state in
``state``, typed by the node (``TunnelBase[F, S]``).

``Tunnel`` is an ``asyncio.Protocol``: it feeds received bytes to the sans-I/O connection,
dispatches the resulting events to its node (``TunnelHandler``), writes what the
connection queued (coalesced into one write per loop iteration, which over TLS means
as few records as possible), and owns the tunnel's timers: the handshake deadline
(TLS + HELLO) and keepalive (PING every interval, dead after three silent intervals).
It checks that the peer certificate's role matches the role announced in HELLO, and asks
the node whether the tunnel may come up (``refuse_tunnel``: e.g. too many of that identity).
A tunnel that closes before it came up is logged at most ``stats.log_limit`` lines per
source address.

One flow's trouble stays in that flow: the wire core answers calls about a flow that has
just ended with a "flow gone" result instead of an error, and an unexpected exception
while the node handles one flow's event resets that flow (RST, and the node's own reset
path for its other half), is logged with its traceback and counted
(``ferryman_handler_errors_total``), and never closes the tunnel. The accepting side of a
TLS/TCP tunnel (the edge) stops reading its peer while its write buffer to that peer is
above ``write_buffer_high`` (``ferryman_tunnel_read_pauses_total``): what a peer makes us
write (PONGs, OPEN_FAILs, any answer) can then never grow without bound when it does not
read. Only one side of a tunnel pauses: the dialing side (connector, client) always reads,
so two peers can never each wait for the other to read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..basics.caps import source_key
from ..basics.metrics import Stats
from ..basics.pki import PeerCertificate, PkiError, peer_certificate
from ..wire import events as ev
from ..wire.connection import ProtocolError, TunnelConnection, WireConfig
from ..wire.frames import Hello, Open
from ..wire.quic import QuicTunnelConnection

log = logging.getLogger("ferryman.tunnel")
HANDLER_ERRORS_LOGGED = 5  # per tunnel: tracebacks logged for unexpected handler errors (the rest are counted)

F = TypeVar("F")  # what a node keeps per flow (``routes`` values)
S = TypeVar("S")  # what a node keeps per tunnel (``state``)


class TunnelHandler(Generic[F, S]):
    """What a node implements to receive a tunnel's life cycle and flow events."""

    stats: Stats
    # While one of this node's TLS/TCP tunnels dispatches a read: the other tunnels that were given
    # frames to send meanwhile, flushed at the end of that read (None: no read under way).
    flush_batch: list[TunnelBase[F, S]] | None = None

    def tunnel_up(self, tunnel: TunnelBase[F, S]) -> None: ...

    def tunnel_down(self, tunnel: TunnelBase[F, S]) -> None: ...

    def tunnel_writable(self, tunnel: TunnelBase[F, S], writable: bool) -> None: ...

    def flow_requested(self, tunnel: TunnelBase[F, S], event: ev.FlowRequested) -> None: ...

    def open_refused(self, tunnel: TunnelBase[F, S], event: ev.OpenRefused) -> None: ...

    def flow_accepted(self, tunnel: TunnelBase[F, S], event: ev.FlowAccepted) -> None: ...

    def flow_rejected(self, tunnel: TunnelBase[F, S], event: ev.FlowRejected) -> None: ...

    def data_received(self, tunnel: TunnelBase[F, S], event: ev.DataReceived) -> None: ...

    def flow_ended(self, tunnel: TunnelBase[F, S], event: ev.FlowEnded) -> None: ...

    def flow_closed(self, tunnel: TunnelBase[F, S], event: ev.FlowClosed) -> None: ...

    def flow_reset(self, tunnel: TunnelBase[F, S], event: ev.FlowReset) -> None: ...

    def credit_available(self, tunnel: TunnelBase[F, S], event: ev.CreditAvailable) -> None: ...

    def datagram_received(self, tunnel: TunnelBase[F, S], event: ev.DatagramReceived) -> None: ...

    def goaway_received(self, tunnel: TunnelBase[F, S], event: ev.GoAwayReceived) -> None: ...

    def auth_received(self, tunnel: TunnelBase[F, S], event: ev.AuthReceived) -> None:
        """A client sent a new access token (only edges act on it)."""

    def refuse_peer(self, peer: PeerCertificate) -> str | None:
        """Why a peer with this (CA-verified) certificate must not connect (e.g. revoked), or None."""
        return None

    def refuse_tunnel(self, tunnel: TunnelBase[F, S]) -> tuple[str, str] | None:
        """Why this tunnel, whose peer's HELLO checked out, must not come up (e.g. its identity
        holds its maximum of tunnels): (code, reason) for the GOAWAY, or None."""
        return None


# Close codes of tunnels that end as planned (logged at info, not as a warning): the peer or this node
# closed it, a drain, a transport upgrade, a move to another edge or to a renewed certificate.
PLANNED_CLOSES = frozenset({"peer_closed", "shutdown", "goaway", "edge_draining", "transport_upgrade", "moved",
                            "renewed", "edge_renewed"})


class TunnelBase(Generic[F, S]):
    """What the TLS/TCP ``Tunnel`` and the QUIC ``transport.quic.QuicTunnel`` share: the node's
    flow API (each call flushes itself), the node-facing properties, the dispatch of wire
    events to the handler, the checks of the peer's HELLO against its certificate, RTT from
    PONGs, draining on GOAWAY and the keepalive timer.

    A subclass calls ``_setup`` and provides ``close``, ``_refuse(code, reason)``, ``_flush``
    and ``_keepalive_expired(silent)``, and names its transport in ``transport_name``."""

    transport_name = ""  # "tcp" or "quic": what the tunnel runs over (for logs, status and metrics)
    dialed: tuple[str, int] | None = None  # the edge (host, port) ``supervisor.keep_tunnel`` dialed for it
    server_context: Any = None  # the TLS context an accepting node handshook it with (its certificate then)

    handler: TunnelHandler[F, S]
    conn: TunnelConnection | QuicTunnelConnection
    routes: dict[int, F]  # flow id -> the node's per-flow object
    state: S | None  # the node's per-tunnel state (e.g. an edge: who the client is)
    peer_certificate: PeerCertificate | None
    peer_addr: str
    label: str
    loop: asyncio.AbstractEventLoop
    keepalive: float
    up: bool
    closed: bool
    close_code: str
    close_reason: str
    rtt: float | None
    writable: bool
    up_waiter: asyncio.Future[None]
    done_waiter: asyncio.Future[None]
    goaway_waiter: asyncio.Future[str]  # the code of the peer's GOAWAY, once one arrived
    _timer: asyncio.TimerHandle | None
    _last_rx: float
    _last_ping: float
    _flush_scheduled: bool
    _down_sent: bool
    # ``acknowledge(flow_id, size)``: ``size`` received bytes of the flow were consumed, credit goes back
    # to the peer. It is the connection's own method (the per-frame path pays no extra call); the
    # WINDOW frames it queues now and then are flushed through ``conn.on_window``.
    acknowledge: Callable[[int, int], bool]

    def _setup(self, handler: TunnelHandler[F, S], conn: TunnelConnection | QuicTunnelConnection,
               accept_roles: tuple[str, ...], keepalive: float, handshake_timeout: float, write_buffer_high: int,
               label: str) -> None:
        self.handler = handler
        self.conn = conn
        self.accept_roles = accept_roles
        self.keepalive = keepalive
        self.handshake_timeout = handshake_timeout
        self.write_buffer_high = write_buffer_high
        self.label = label
        self.loop = asyncio.get_running_loop()
        self.peer_certificate = None
        self.peer_addr = ""
        self.up = False
        self.closed = False
        self.close_code = ""
        self.close_reason = ""
        self.rtt = None
        self.writable = True
        self.routes = {}
        self.state = None
        self.id = os.urandom(8).hex()  # names the tunnel in logs (a client tunnel's traffic-log transaction id)
        self._last_rx = self.loop.time()
        self._last_ping = 0.0
        self._flush_scheduled = False
        self._timer = None
        self._down_sent = False
        self._handler_errors = 0
        self.up_waiter = self.loop.create_future()
        self.done_waiter = self.loop.create_future()
        self.goaway_waiter = self.loop.create_future()
        self.acknowledge = conn.acknowledge
        conn.on_window = self.flush_soon

    def _events(self) -> dict[type, Callable[[Any, Any], None]]:
        """Wire event type -> who handles it (the node, or this tunnel itself). Whatever a handler
        raises must stay with the event's flow (``_handler_failed``): call them through
        ``_guarded_events``, or inside the same try."""
        handler = self.handler
        table: dict[type, Callable[[Any, Any], None]] = {
            ev.DataReceived: handler.data_received,
            ev.CreditAvailable: handler.credit_available,
            ev.FlowRequested: handler.flow_requested,
            ev.FlowAccepted: handler.flow_accepted,
            ev.FlowRejected: handler.flow_rejected,
            ev.FlowEnded: handler.flow_ended,
            ev.FlowClosed: handler.flow_closed,
            ev.FlowReset: handler.flow_reset,
            ev.OpenRefused: handler.open_refused,
            ev.DatagramReceived: handler.datagram_received,
            ev.GoAwayReceived: self._on_goaway,
            ev.PongReceived: self._on_pong,
            ev.HelloReceived: self._on_hello,
            ev.AuthReceived: handler.auth_received,
        }
        return table

    def _guarded_events(self) -> dict[type, Callable[[Any, Any], None]]:
        """``_events``, each handler wrapped by ``_guarded``."""
        return {kind: self._guarded(fn) for kind, fn in self._events().items()}

    def _guarded(self, fn: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """``fn`` such that an exception it raises is handled by ``_handler_failed`` (the tunnel goes on)."""
        def guarded(tunnel: Any, event: Any) -> None:
            try:
                fn(tunnel, event)
            except Exception as exc:
                self._handler_failed(event, exc)
        guarded.__wrapped__ = fn  # type: ignore[attr-defined]
        return guarded

    def _handler_failed(self, event: ev.Event, exc: Exception) -> None:
        """A handler raised while handling ``event``: a bug, or a race no handler foresaw. It must
        cost at most the event's own flow: count it, log it (with its traceback, the first
        ``HANDLER_ERRORS_LOGGED`` times on this tunnel), reset that flow on the wire and let the
        node clean up its side of it through its own reset path. The tunnel and every other
        flow carry on."""
        kind = type(event).__name__
        stats = self.handler.stats
        stats.count(stats.handler_errors, kind)
        self._handler_errors += 1
        flow_id = getattr(event, "flow_id", None)
        if self._handler_errors <= HANDLER_ERRORS_LOGGED:
            log.error("unexpected error handling a flow event; %s", "that flow is reset, the tunnel goes on"
                      if flow_id is not None else "the tunnel goes on",
                      exc_info=exc, extra={"tunnel": self.label, "peer": self.peer_name, "event": kind,
                                           "flow": flow_id, "reason": f"{type(exc).__name__}: {exc}",
                                           "suppressed_after": HANDLER_ERRORS_LOGGED})
        if flow_id is None or self.closed:
            return
        reason = f"internal error handling {kind}"
        flow_gone = flow_id not in self.conn.flows
        self.conn.reset_flow(flow_id, "internal_error", reason)
        self.flush_soon()
        if flow_gone and flow_id not in self.routes:
            return
        try:  # the node's own cleanup: its other half of the flow (a socket, a spliced flow) is reset too
            self.handler.flow_reset(self, ev.FlowReset(flow_id, "internal_error", reason))
        except Exception:
            log.exception("unexpected error resetting a flow after a handler error",
                          extra={"tunnel": self.label, "flow": flow_id})
        self.routes.pop(flow_id, None)

    # ------------------------------------------------------------------ flows (the node's API)
    def has_flow(self, flow_id: int) -> bool:
        """Whether ``flow_id`` is still a flow of this tunnel (not ended, reset or refused)."""
        return flow_id in self.conn.flows

    def open_flow(self, request: Open) -> int:
        """Send OPEN; returns the new flow's id (``FlowError`` when the tunnel cannot take one)."""
        flow_id = self.conn.open_flow(request)
        self.flush_soon()
        return flow_id

    def accept(self, flow_id: int, bound: str = "", remote: str = "") -> bool:
        """Answer the peer's OPEN with OPEN_OK; False when the peer cancelled it already."""
        done = self.conn.accept_flow(flow_id, bound, remote)
        self.flush_soon()
        return done

    def reject(self, flow_id: int, code: str, reason: str) -> bool:
        """Answer the peer's OPEN with OPEN_FAIL ``code``/``reason``; the flow is gone (False: it
        was already, the peer cancelled it)."""
        done = self.conn.reject_flow(flow_id, code, reason)
        self.flush_soon()
        return done

    def reset(self, flow_id: int, code: str, reason: str = "") -> None:
        """Abort a flow both ways (RST); a flow that is already gone is ignored."""
        self.conn.reset_flow(flow_id, code, reason)
        self.flush_soon()

    def send_data(self, flow_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the flow's credit allows; returns the bytes taken (0 when the
        flow is gone: its own end event follows)."""
        taken = self.conn.send_data(flow_id, data)
        if taken and not self._flush_scheduled:
            self._schedule_flush()
        return taken

    def send_fin(self, flow_id: int) -> bool:
        """Half-close our direction; True when the flow is now fully closed (False when it is gone)."""
        closed = self.conn.send_fin(flow_id)
        self.flush_soon()
        return closed

    def send_datagram(self, flow_id: int, data: bytes | memoryview) -> bool:
        """Send one datagram of an open UDP flow; False when the flow is gone (``FlowError`` when
        it cannot be carried)."""
        if not self.conn.send_datagram(flow_id, data):
            return False
        if not self._flush_scheduled:
            self._schedule_flush()
        return True

    def send_auth(self, token: str) -> None:
        """Hand the edge a new access token (AUTH) for the flows opened from now on."""
        self.conn.send_auth(token)
        self.flush_soon()

    def goaway(self, code: str, reason: str) -> None:
        """Drain: the peer opens no new flows on this tunnel; existing ones continue."""
        self.conn.goaway(code, reason)
        self.flush_soon()

    def takes_datagram(self, backlog: int) -> bool:
        """Whether a datagram may be queued now: the tunnel is writable and (a byte stream)
        fewer than ``backlog`` bytes (``FERRYMAN_UDP_BACKLOG``) wait to be written before it, so
        a datagram never waits behind more than that; the caller drops and counts it otherwise."""
        return self.writable

    def flush_soon(self) -> None:
        """Send what the connection queued at the end of this loop iteration (or, while a tunnel
        of this node dispatches a read, at the end of that read)."""
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        batch = self.handler.flush_batch
        if batch is not None:  # a read of another tunnel is being dispatched: it flushes this one when done
            batch.append(self)
        else:
            self.loop.call_soon(self._flush)

    # ------------------------------------------------------------------ properties
    @property
    def hello(self) -> Hello | None:
        """The peer's HELLO (role, node, group, limits, a client's first token), once received."""
        return self.conn.peer

    @property
    def peer_name(self) -> str:
        if self.conn.peer is not None:
            return self.conn.peer.node
        return self.peer_certificate.name if self.peer_certificate else self.peer_addr

    @property
    def draining(self) -> bool:
        return self.conn.goaway_received or self.conn.goaway_sent

    @property
    def load(self) -> int:
        return len(self.conn.flows)

    # ------------------------------------------------------------------ internal events
    def _on_hello(self, tunnel: Any, event: ev.HelloReceived) -> None:
        hello = event.hello
        assert self.peer_certificate is not None
        if hello.role != self.peer_certificate.role:
            self._refuse("role_mismatch",
                         f"HELLO says role {hello.role!r} but the certificate says {self.peer_certificate.role!r}")
            return
        if hello.node != self.peer_certificate.name:
            self._refuse("name_mismatch",
                         f"HELLO says node {hello.node!r} but the certificate names {self.peer_certificate.name!r}")
            return
        refusal = self.handler.refuse_peer(self.peer_certificate)  # revoked while the HELLO was on its way
        if refusal is not None:
            self._refuse("certificate_revoked", refusal)
            return
        refused = self.handler.refuse_tunnel(self)
        if refused is not None:
            self._refuse(*refused)
            return
        self.up = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.keepalive / 4, self._keepalive)
        self.up_waiter.set_result(None)
        self.handler.tunnel_up(self)

    def _on_pong(self, tunnel: Any, event: ev.PongReceived) -> None:
        self.rtt = max(0.0, self.loop.time() - event.sent_at)
        self.handler.stats.rtt[self.label] = self.rtt

    def _on_goaway(self, tunnel: Any, event: ev.GoAwayReceived) -> None:
        log.info("peer draining", extra={"tunnel": self.label, "peer": self.peer_name,
                                         "code": event.code, "reason": event.reason})
        if not self.goaway_waiter.done():
            self.goaway_waiter.set_result(event.code)
        self.handler.goaway_received(self, event)

    def _keepalive(self) -> None:
        """Runs every quarter interval: PING once per interval; a peer silent for
        2.75 intervals is dead, so a dead tunnel is detected within 3 intervals."""
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        silent = now - self._last_rx
        if silent > 2.75 * self.keepalive:
            self._keepalive_expired(silent)
            return
        if now - self._last_ping >= self.keepalive * 0.99:
            self._last_ping = now
            self.conn.ping(now)
            self._flush()
        self._timer = self.loop.call_later(self.keepalive / 4, self._keepalive)

    def _closing(self, code: str, reason: str, error: bool) -> bool:
        """Mark the tunnel closed for ``code``/``reason`` and log it; False when it already was."""
        if self.closed:
            return False
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        level = logging.WARNING if error or code not in PLANNED_CLOSES else logging.INFO
        extra = {"tunnel": self.label, "peer": self.peer_name, "peer_addr": self.peer_addr, "code": code,
                 "reason": reason}
        if self.up:
            log.log(level, "tunnel closed", extra=extra)
        else:  # refused before it came up (handshake, certificate, HELLO): a peer may repeat that at will
            self.handler.stats.log_limit.log(log, level, source_key(self.peer_addr.rsplit(":", 1)[0]),
                                             "tunnel closed", extra)
        return True

    # provided by the transport
    def close(self, code: str, reason: str, *, error: bool = False, abort: bool = False) -> None:
        raise NotImplementedError

    def _refuse(self, code: str, reason: str) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _keepalive_expired(self, silent: float) -> None:
        raise NotImplementedError


class Tunnel(TunnelBase[F, S], asyncio.Protocol):
    transport_name = "tcp"

    def __init__(
        self,
        handler: TunnelHandler[F, S],
        config: WireConfig,
        *,
        dialer: bool,
        accept_roles: tuple[str, ...],
        keepalive: float,
        handshake_timeout: float,
        write_buffer_high: int,
        label: str = "",
    ) -> None:
        self._setup(handler, TunnelConnection(config, dialer=dialer), accept_roles, keepalive, handshake_timeout,
                    write_buffer_high, label)
        self.transport: asyncio.Transport | None = None
        # The accepting side stops reading a peer that does not read (see the module docstring).
        self.pauses_reading = not dialer
        self.reading_paused = False
        self._dispatch = self._events()  # called inside data_received's own guard

    # ------------------------------------------------------------------ properties
    @property
    def sockname(self) -> tuple | None:
        """The local address of the tunnel's TCP socket."""
        return self.transport.get_extra_info("sockname") if self.transport is not None else None

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER), as the TLS handshake checked it."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        transport.set_write_buffer_limits(high=self.write_buffer_high, low=self.write_buffer_high // 4)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            self.close("tls_required", "tunnel is not TLS")
            return
        try:
            self.peer_certificate = peer_certificate(ssl_object)
        except PkiError as exc:
            self.close("bad_certificate", str(exc))
            return
        if self.peer_certificate.role not in self.accept_roles:
            self.close(
                "role_refused",
                f"peer certificate role {self.peer_certificate.role!r} not accepted here (expected {'/'.join(self.accept_roles)})",
            )
            return
        refusal = self.handler.refuse_peer(self.peer_certificate)
        if refusal is not None:
            self.close("certificate_revoked", refusal, error=True)
            return
        self._last_rx = self.loop.time()
        self._timer = self.loop.call_later(self.handshake_timeout, self._handshake_expired)
        self.conn.initiate()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            stats = self.handler.stats
            stats.count(stats.protocol_errors, exc.code)
            self.close(exc.code, exc.message, error=True)
            return
        dispatch = self._dispatch
        scheduled = self._flush_scheduled
        self._flush_scheduled = True  # what the node queues here while answering goes out at the end of this read
        # ... and so does what it queues on its other tunnels (an edge splicing this read's DATA):
        # one write each at the end of the read, not one more pass of the loop first.
        handler = self.handler
        outer = handler.flush_batch
        batch: list[TunnelBase[Any, Any]] = [] if outer is None else outer
        handler.flush_batch = batch
        try:
            for event in events:
                try:
                    dispatch[type(event)](self, event)
                except Exception as exc:
                    self._handler_failed(event, exc)
                if self.closed:
                    return
        finally:
            self._flush_scheduled = scheduled
            if outer is None:
                handler.flush_batch = None
                for tunnel in batch:
                    tunnel._flush()
        if self.conn.has_output:
            self._flush()

    def eof_received(self) -> bool:
        if not self.closed:
            self.close("peer_closed", "peer closed the tunnel")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = "connection_lost"
            self.close_reason = f"connection lost: {exc}" if exc else "connection closed"
        self._finish()

    def pause_writing(self) -> None:
        self.writable = False
        self.conn.answer_pings = False  # a side that keeps reading (a dialer) would pile PONGs up
        if self.pauses_reading and not self.reading_paused and self.transport is not None \
                and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()
            stats = self.handler.stats
            stats.read_pauses += 1
            log.debug("tunnel not read until the peer reads", extra={"tunnel": self.label, "peer": self.peer_name})
        self.handler.tunnel_writable(self, False)

    def resume_writing(self) -> None:
        self.writable = True
        self.conn.answer_pings = True
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        self.handler.tunnel_writable(self, True)

    # ------------------------------------------------------------------ sending
    def takes_datagram(self, backlog: int) -> bool:
        transport = self.transport
        return self.writable and transport is not None and transport.get_write_buffer_size() < backlog

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is not None and not self.transport.is_closing():
            chunks = self.conn.chunks_to_send()
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            elif chunks:  # large DATA payloads go to TLS as they are, not copied into one buffer first
                self.transport.writelines(chunks)

    # ------------------------------------------------------------------ control
    def close(self, code: str, reason: str, *, error: bool = False, abort: bool = False) -> None:
        """Close the tunnel, sending whatever is queued (incl. a GOAWAY explaining an error)."""
        if not self._closing(code, reason, error):
            return
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self._flush()
                self.transport.close()
        self._finish()

    def terminate(self, code: str, reason: str) -> None:
        """End the tunnel now for ``reason`` (e.g. its certificate was revoked), telling the peer in a GOAWAY."""
        self._refuse(code, reason)

    def _refuse(self, code: str, reason: str) -> None:
        """Close the tunnel for an error after a GOAWAY naming it, so that the peer can log why."""
        self.conn.goaway(code, reason)
        self.close(code, reason, error=True)

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.up_waiter.done():
            self.up_waiter.set_exception(ConnectionError(f"{self.close_code}: {self.close_reason}"))
            self.up_waiter.exception()  # retrieved: nobody may be waiting
        if not self._down_sent:
            self._down_sent = True
            self.handler.tunnel_down(self)
            self.done_waiter.set_result(None)

    # ------------------------------------------------------------------ timers
    def _handshake_expired(self) -> None:
        self._timer = None
        if not self.up:
            self.close("handshake_timeout", f"no HELLO within {self.handshake_timeout:g}s", abort=True)

    def _keepalive_expired(self, silent: float) -> None:
        self.close("keepalive_timeout", f"no frame from peer for {silent:.1f}s", abort=True)


def close_when_idle(tunnel: TunnelBase[Any, Any], code: str, reason: str, grace: float | None = None,
                    keep: set[asyncio.Task[None]] | None = None) -> asyncio.Task[None]:
    """Close a draining ``tunnel`` (``code``, ``reason``) once it carries no flow, or after ``grace``
    seconds (None: however long its flows run). ``keep``: a set that holds the task while it runs."""

    async def close() -> None:
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        while tunnel.routes and not tunnel.closed and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(1.0 if deadline is None else 0.1)
        tunnel.close(code, reason)

    task = asyncio.get_running_loop().create_task(close())
    if keep is not None:
        keep.add(task)
        task.add_done_callback(keep.discard)
    return task


def ssl_handshake_error(exc: BaseException) -> str:
    """A short, specific description of a failed TLS/TCP dial for logs and status."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__
