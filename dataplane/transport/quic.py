"""Asyncio adapter that runs Ferryman tunnels over QUIC (a ``wire.quic_engine``), mutually authenticated.

``QuicTunnel`` is the QUIC counterpart of ``transport.tunnel.Tunnel``: the same
``TunnelBase`` flow API and attributes the nodes use (``open_flow``, ``accept``, ``send_data``,
... ``routes``, ``state``, ``peer_certificate``, ``up_waiter``/``done_waiter``, ``writable``,
``close``/``goaway``/``terminate``), the same ``TunnelHandler`` callbacks and the same checks of the
peer: its certificate must chain to our CA (a client certificate is demanded by the
server and checked here, with ``cryptography``'s X.509 verifier), name a role we accept,
not be refused by ``handler.refuse_peer`` (revoked), and its HELLO must repeat the
certificate's role and name. It owns the tunnel's timers: the QUIC engine's (loss recovery,
pacing, idle), the handshake deadline (QUIC + HELLO) and keepalive PINGs.

Sends are coalesced: whatever the node queued in one loop iteration goes out in one
``datagrams_to_send`` pass, as UDP datagrams of ``quic_packet_size``. ``writable`` turns
False when more than ``write_buffer_high`` bytes wait in the engine (congestion-limited) and
True again below a quarter of it, exactly when ``Tunnel`` would pause/resume.

``dial_quic`` opens one tunnel from a connector or client (its own connected UDP
socket); ``serve_quic`` serves many on one UDP socket for an edge, routing datagrams by
connection id. ``load_credentials`` reads the same PEM files as ``pki.server_context``
/``client_context``.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ..basics import pki
from ..basics.caps import Counts, source_key
from ..basics.pki import PeerCertificate, PkiError
from ..basics.settings import DialerSettings, NodeSettings
from ..wire import events as ev
from ..wire.connection import ProtocolError, WireConfig
from ..wire import quic_engine
from ..wire.quic import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    HandshakeCompleted,
    QuicTunnelConnection,
    TunnelTerminated,
)
from ..wire.quic_engine import Address, QuicEngine, select_engine
from .tunnel import F, S, TunnelBase, TunnelHandler
from .udpio import UdpEndpoint, udp_socket

log = logging.getLogger("ferryman.quic")
# The QUIC engine (aioquic) logs each connection's negotiated version and ALPN at INFO; tunnel
# events are logged here.
logging.getLogger("quic").setLevel(logging.WARNING)

CID_LENGTH = 8
SMALLEST_INITIAL = 1200  # a client's Initial datagram is padded to at least this (RFC 9000 §14.1)
# The QUIC engine's clock. Not loop.time(): uvloop's advances in whole milliseconds once per loop
# iteration, so a pacing deadline microseconds away would be re-armed in a busy loop
# until the millisecond ticks over.
_clock = time.monotonic
# uvloop's timers fire on whole milliseconds. A deadline closer than this while data waits to
# be sent (the engine's pacer releasing the next packets microseconds from now, or an ACK
# that keeps a transfer's ACK clock going) is served on the next loop iteration instead, or a
# paced tunnel would send one burst per millisecond. With nothing waiting the deadline is an
# ACK or loss timer (an engine delays its ACKs by 1 ms): it is served by a timer of at least
# the grain, never by polling the engine every iteration until it is due (a busy loop that
# held a CPU for a millisecond after every message).
_TIMER_GRAIN = 0.001


# ---------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class QuicCredentials:
    """A node's certificate, key and trusted CA, loaded once for its QUIC tunnels."""

    certificate: x509.Certificate
    chain: list[x509.Certificate]
    private_key: CertificateIssuerPrivateKeyTypes
    authorities: list[x509.Certificate]
    ca_pem: bytes


def load_credentials(cert: str, key: str, ca: str) -> QuicCredentials:
    """Load ``cert``/``key``/``ca`` (the FERRYMAN_TLS_* files), failing early as ``pki.server_context`` does."""
    certificates = pki.read_certificates(cert)
    authorities = pki.read_certificates(ca, "CA")
    try:
        with open(key, "rb") as fh:
            private_key = serialization.load_pem_private_key(fh.read(), password=None)
    except FileNotFoundError:
        raise PkiError(f"key {key}: file not found") from None
    except OSError as exc:
        raise PkiError(f"key {key}: {exc.strerror}") from None
    except TypeError:
        raise PkiError(f"key {key}: encrypted keys are not supported") from None
    except ValueError:
        raise PkiError(f"key {key}: not a PEM private key") from None
    if private_key.public_key() != certificates[0].public_key():
        raise PkiError(f"key {key} does not match certificate {cert}")
    if not any(pki.issued_by(certificates[0], authority) for authority in authorities):
        raise PkiError(f"certificate {cert} is not signed by the CA in {ca}")
    if certificates[0].not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise PkiError(f"certificate {cert} expired at {certificates[0].not_valid_after_utc.isoformat()}")
    return QuicCredentials(
        certificate=certificates[0], chain=certificates[1:], private_key=private_key,  # type: ignore[arg-type]
        authorities=authorities,
        ca_pem=b"".join(a.public_bytes(serialization.Encoding.PEM) for a in authorities),
    )


def quic_engine_of(settings: NodeSettings) -> QuicEngine:
    """The QUIC engine ``FERRYMAN_QUIC_ENGINE`` names (``quic_engine.EngineUnavailable`` if it cannot be used)."""
    return select_engine(settings.quic_engine)


def quic_configuration(credentials: QuicCredentials, settings: NodeSettings, *, client: bool,
                       server_name: str | None = None, engine: QuicEngine | None = None) -> Any:
    """The QUIC engine's settings of one side: packet size, our certificate, the CA, an idle
    timeout that leaves dead-peer detection to keepalive (as ``Tunnel`` does)."""
    engine = engine if engine is not None else quic_engine_of(settings)
    return engine.configuration(
        client=client, packet_size=settings.quic_packet_size, cid_length=CID_LENGTH,
        idle_timeout=3 * settings.keepalive_interval + 1, server_name=server_name,
        certificate=credentials.certificate, chain=list(credentials.chain), private_key=credentials.private_key,
        ca_pem=credentials.ca_pem,
    )


class PeerRefused(Exception):
    """The peer's certificate is not acceptable: ``code``/``reason`` for logs, ``alert`` for the peer."""

    def __init__(self, code: str, reason: str, alert: int | None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.alert = alert


def verify_peer(credentials: QuicCredentials, certificate: bytes | None, chain: list[bytes],
                server_name: str | None) -> PeerCertificate:
    """Check the peer's certificate against our CA (as a server certificate for
    ``server_name`` when we dialed, else as a client certificate) and read what it says (role, name, serial)."""
    if certificate is None:
        raise PeerRefused("certificate_required", "peer presented no certificate", quic_engine.ALERT_CERTIFICATE_REQUIRED)
    try:
        leaf = x509.load_der_x509_certificate(certificate)
        intermediates = [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError:
        raise PeerRefused("bad_certificate", "peer certificate cannot be parsed",
                          quic_engine.ALERT_BAD_CERTIFICATE) from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise PeerRefused("bad_certificate", f"peer certificate is valid from {leaf.not_valid_before_utc.isoformat()} "
                          f"to {leaf.not_valid_after_utc.isoformat()} only", quic_engine.ALERT_CERTIFICATE_EXPIRED)
    builder = PolicyBuilder().store(Store(credentials.authorities)).time(now)
    try:
        if server_name is None:
            builder.build_client_verifier().verify(leaf, intermediates)
        else:
            builder.build_server_verifier(_subject(server_name)).verify(leaf, intermediates)
    except VerificationError as exc:
        raise PeerRefused("bad_certificate", f"peer certificate not accepted: {exc}",
                          quic_engine.ALERT_UNKNOWN_CA) from None
    try:
        return pki.certificate_identity(leaf, certificate, "peer certificate")
    except PkiError as exc:
        raise PeerRefused("bad_certificate", str(exc), quic_engine.ALERT_BAD_CERTIFICATE) from None


def _subject(name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


# ---------------------------------------------------------------------------- tunnel


class QuicTunnel(TunnelBase[F, S]):
    """One Ferryman tunnel over QUIC, with the interface of ``Tunnel`` (see the module docstring)."""

    conn: QuicTunnelConnection
    transport_name = "quic"

    def __init__(
        self,
        handler: TunnelHandler[F, S],
        config: WireConfig,
        quic: Any,
        credentials: QuicCredentials,
        *,
        transport: UdpEndpoint,
        peer: Address,
        dialer: bool,
        accept_roles: tuple[str, ...],
        keepalive: float,
        handshake_timeout: float,
        write_buffer_high: int,
        label: str = "",
        server_name: str | None = None,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        cid_listener: Callable[[QuicTunnel[Any, Any], bytes, bool], None] | None = None,
        engine: QuicEngine | None = None,
        max_pending_datagrams: int = 512,
    ) -> None:
        self._setup(handler, QuicTunnelConnection(config, quic, dialer=dialer, engine=engine,
                                                  original_destination_connection_id=original_destination_connection_id,
                                                  retry_source_connection_id=retry_source_connection_id,
                                                  max_pending_datagrams=max_pending_datagrams),
                    accept_roles, keepalive, handshake_timeout, write_buffer_high, label)
        self.credentials = credentials
        self.transport: UdpEndpoint | None = transport
        self.peer_addr = f"{peer[0]}:{peer[1]}"
        self._peer = peer
        self._connected = dialer  # a dialer's socket is connected: sendto without an address
        self._server_name = server_name
        self._cid_listener = cid_listener
        self._peer_der: bytes | None = None
        self._window_full = False  # an early datagram send left FERRYMAN_QUIC_MAX_PENDING_DATAGRAMS waiting
        self._timer = self.loop.call_later(handshake_timeout, self._handshake_expired)
        self._quic_timer: asyncio.TimerHandle | None = None
        self._quic_at: float | None = None
        self.handshake_waiter: asyncio.Future[None] = self.loop.create_future()  # QUIC + certificate checks
        # (up_waiter: ... and the HELLO exchange)
        self._dispatch: dict[type, Callable[[Any, Any], None]] = {
            **self._guarded_events(),
            HandshakeCompleted: self._on_handshake,
            TunnelTerminated: self._on_terminated,
            ConnectionIdIssued: self._on_cid,
            ConnectionIdRetired: self._on_cid,
        }

    # ------------------------------------------------------------------ sending datagrams
    def send_datagram(self, flow_id: int, data: bytes | memoryview) -> bool:
        """As ``TunnelBase.send_datagram``. When ``FERRYMAN_QUIC_MAX_PENDING_DATAGRAMS`` already
        wait, they are sent now (as far as the congestion window lets them go) before this one
        is refused: one receive callback at an edge can bring the datagrams of many coalesced
        reads (a connector packs a dozen small ones into each packet), more than the bound, and
        those are a burst to pass on at once, not a queue. What the congestion window holds
        back stays bounded and beyond it datagrams are refused (``datagram_queue_full``)."""
        conn = self.conn
        if conn.quic.pending_datagrams() >= conn.max_pending_datagrams and not self._window_full:
            self._flush()
            # still full: the window holds them; no more early sends (each a full engine pass)
            # until the peer's next packets (ACKs) or a timer may have opened it
            self._window_full = conn.quic.pending_datagrams() >= conn.max_pending_datagrams
        return super().send_datagram(flow_id, data)

    # ------------------------------------------------------------------ properties
    @property
    def sockname(self) -> tuple | None:
        """The local address of the tunnel's UDP socket."""
        return self.transport.get_extra_info("sockname") if self.transport is not None else None

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER) once the handshake has checked it."""
        return self._peer_der

    # ------------------------------------------------------------------ input
    def start(self) -> None:
        """Dialer: send the first QUIC flight."""
        self.conn.connect(self._peer, _clock())
        self._flush()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.closed:
            return
        conn = self.conn
        dropped = conn.dropped_packets
        try:
            events = conn.receive_datagram(data, addr, _clock())
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if conn.dropped_packets == dropped:  # (a packet dropped unread is no sign of life)
            self._last_rx = self.loop.time()
        self.flush_soon()  # (first: what the node queues while answering joins this flush)
        self._process(events)

    def segments_received(self, buffer: bytes, segment: int, addr: Address) -> None:
        """Datagrams coalesced by the kernel (GRO), handed to the engine in one call."""
        if self.closed:
            return
        conn = self.conn
        dropped = conn.dropped_packets
        try:
            events = conn.receive_segments(buffer, segment, addr, _clock())
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if conn.dropped_packets == dropped:
            self._last_rx = self.loop.time()
        self.flush_soon()
        self._process(events)

    def error_received(self, exc: OSError) -> None:
        """An ICMP error on a dialer's socket. Before the handshake any error means the edge
        cannot be reached; after it, "port unreachable" means the edge's process is gone (as
        a TCP reset would say) while other errors (a route flapping) are left to keepalive."""
        if not self.handshake_waiter.done():
            self.close("unreachable", f"UDP to {self.peer_addr}: {exc.strerror or exc}", abort=True)
        elif isinstance(exc, ConnectionRefusedError):
            self.close("connection_lost", f"UDP to {self.peer_addr}: port unreachable (nothing listens there now)",
                       abort=True)
        else:
            log.debug("UDP error on a tunnel", extra={"tunnel": self.label, "reason": exc.strerror or str(exc)})

    def transport_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed:
            self.close("connection_lost", f"UDP socket lost: {exc}" if exc else "UDP socket closed", abort=True)

    def _process(self, events: list[ev.Event]) -> None:
        self._window_full = False  # (see send_datagram)
        dispatch = self._dispatch
        for event in events:
            dispatch[type(event)](self, event)
            if self.closed:
                return

    def _protocol_error(self, exc: ProtocolError) -> None:
        stats = self.handler.stats
        stats.count(stats.protocol_errors, exc.code)
        self.close(exc.code, exc.message, error=True)

    # ------------------------------------------------------------------ sending
    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        conn = self.conn
        try:
            datagrams = conn.datagrams_to_send(_clock())
        except ProtocolError as exc:  # the engine failed: nothing more can be sent
            self._protocol_error(exc)
            return
        if datagrams:
            transport.send_batch(datagrams)
        backlog = conn.backlog
        if self.writable:
            if backlog > self.write_buffer_high:
                self.writable = False
                if self.up:
                    conn.pause_reading()  # a peer that does not take what we send is not read either
                self.handler.tunnel_writable(self, False)
        elif backlog <= self.write_buffer_high // 4:
            self.writable = True
            self.handler.tunnel_writable(self, True)
            if not conn.reading and not self.closed:
                self._resume_reading()
        self._arm()

    def _resume_reading(self) -> None:
        try:
            events = self.conn.resume_reading()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self.flush_soon()
        self._process(events)

    def _arm(self) -> None:
        at = self.conn.get_timer()
        if at == self._quic_at:
            return
        if self._quic_timer is not None:
            self._quic_timer.cancel()
            self._quic_timer = None
        self._quic_at = at
        if at is not None and not self.closed:
            delay = at - _clock()
            if delay <= 0 or (delay < _TIMER_GRAIN and self.conn.backlog):
                # due, or a pacing deadline within the loop's timer grain: the next iteration
                self._quic_timer = self.loop.call_soon(self._on_quic_timer)  # type: ignore[assignment]
            else:
                self._quic_timer = self.loop.call_later(max(delay, _TIMER_GRAIN), self._on_quic_timer)

    def _on_quic_timer(self) -> None:
        self._quic_timer = None
        self._quic_at = None
        if self.closed:
            return
        try:
            events = self.conn.handle_timer(_clock())
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._process(events)
        if not self.closed:
            self._flush()

    # ------------------------------------------------------------------ control
    def close(self, code: str, reason: str, *, error: bool = False, abort: bool = False) -> None:
        """Close the tunnel: a CONNECTION_CLOSE naming ``code: reason`` (not sent with ``abort``)."""
        if not self._closing(code, reason, error):
            return
        if not abort:
            if self.conn.has_output and self.conn.dead is None:
                self._flush()  # frames queued before the close (a GOAWAY) go out ahead of CONNECTION_CLOSE
            self.conn.close(code, reason, error=error)
            self._flush()
        if self._connected and self.transport is not None:
            self.transport.close()
        self._finish()

    def terminate(self, code: str, reason: str) -> None:
        """End the tunnel now for ``reason``; the peer reads ``code: reason`` in the CONNECTION_CLOSE."""
        self.close(code, reason, error=True)

    def _refuse(self, code: str, reason: str, alert: int | None = None) -> None:
        self.conn.refuse(code, reason, alert)
        self.close(code, reason, error=True)

    def _finish(self) -> None:
        for timer in (self._timer, self._quic_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._quic_timer = None
        failure = ConnectionError(f"{self.close_code}: {self.close_reason}")
        for waiter in (self.handshake_waiter, self.up_waiter):
            if not waiter.done():
                waiter.set_exception(failure)
                waiter.exception()  # retrieved: nobody may be waiting
        if self._cid_listener is not None:
            self._cid_listener(self, b"", False)
        if not self._down_sent:
            self._down_sent = True
            self.handler.tunnel_down(self)
            self.done_waiter.set_result(None)

    # ------------------------------------------------------------------ internal events
    def _on_handshake(self, tunnel: QuicTunnel, event: HandshakeCompleted) -> None:
        try:
            peer = verify_peer(self.credentials, event.certificate, event.chain, self._server_name)
        except PeerRefused as exc:
            self._refuse(exc.code, exc.reason, exc.alert)
            return
        if peer.role not in self.accept_roles:
            self._refuse("role_refused", f"peer certificate role {peer.role!r} not accepted here "
                                         f"(expected {'/'.join(self.accept_roles)})")
            return
        refusal = self.handler.refuse_peer(peer)
        if refusal is not None:
            self._refuse("certificate_revoked", refusal, quic_engine.ALERT_CERTIFICATE_REVOKED)
            return
        self.peer_certificate = peer
        self._peer_der = event.certificate
        self.conn.initiate()
        self.handshake_waiter.set_result(None)
        try:
            events = self.conn.events()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._process(events)
        self.flush_soon()

    def _on_terminated(self, tunnel: QuicTunnel, event: TunnelTerminated) -> None:
        if event.error_code == 0 and event.code != "idle_timeout":
            self.close("peer_closed", f"peer closed the tunnel ({event.code}: {event.reason})", abort=True)
        else:
            self.close(event.code, event.reason, error=True, abort=True)

    def _on_cid(self, tunnel: QuicTunnel, event: ConnectionIdIssued | ConnectionIdRetired) -> None:
        if self._cid_listener is not None:
            self._cid_listener(self, event.cid, isinstance(event, ConnectionIdIssued))

    def _handshake_expired(self) -> None:
        self._timer = None
        if not self.up:
            self.close("handshake_timeout", f"no QUIC handshake and HELLO within {self.handshake_timeout:g}s")

    def _keepalive_expired(self, silent: float) -> None:
        self.close("keepalive_timeout", f"no packet from peer for {silent:.1f}s")

# ---------------------------------------------------------------------------- dialing


class _DialEndpoint(asyncio.DatagramProtocol):
    """The connected UDP socket of one dialed tunnel."""

    def __init__(self) -> None:
        self.tunnel: QuicTunnel | None = None

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.tunnel is not None:
            self.tunnel.datagram_received(data, addr)

    def segments_received(self, buffer: bytes, segment: int, addr: Address) -> None:
        if self.tunnel is not None:
            self.tunnel.segments_received(buffer, segment, addr)

    def error_received(self, exc: Exception) -> None:
        if self.tunnel is not None and isinstance(exc, OSError):
            self.tunnel.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.transport_lost(exc)


async def dial_quic(
    handler: TunnelHandler,
    config: WireConfig,
    host: str,
    port: int,
    settings: DialerSettings,
    credentials: QuicCredentials,
    *,
    label: str = "",
    accept_roles: tuple[str, ...] = ("edge",),
) -> QuicTunnel:
    """Dial an edge over QUIC; returns once QUIC is up and the edge's certificate is checked.

    Raises ``asyncio.TimeoutError`` after ``settings.quic_timeout`` without a handshake (UDP
    blocked: time to fall back to TLS/TCP), ``ConnectionError`` when the handshake or the
    certificate checks fail (the message says why) and ``OSError`` for socket errors. Await
    ``tunnel.up_waiter`` for the HELLO exchange, as with ``Tunnel``.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _type, _proto, _name, addr = infos[0]
    endpoint = _DialEndpoint()
    offload = settings.quic_offload == "on"
    transport = UdpEndpoint(loop, udp_socket(family, connect=addr, buffer=settings.quic_socket_buffer), endpoint,
                            gso=offload, gro=offload)
    peer = transport.get_extra_info("peername") or addr
    engine = quic_engine_of(settings)
    tunnel = QuicTunnel(
        handler, config, quic_configuration(credentials, settings, client=True, server_name=host, engine=engine),
        credentials, transport=transport, peer=peer, dialer=True, accept_roles=accept_roles,  # type: ignore[arg-type]
        keepalive=settings.keepalive_interval, handshake_timeout=settings.handshake_timeout,
        write_buffer_high=settings.write_buffer_high, label=label or f"{host}:{port}", server_name=host,
        engine=engine, max_pending_datagrams=settings.quic_max_pending_datagrams,
    )
    endpoint.tunnel = tunnel
    tunnel.start()
    try:
        await asyncio.wait_for(asyncio.shield(tunnel.handshake_waiter), settings.quic_timeout)
    except asyncio.TimeoutError:
        tunnel.close("quic_timeout", f"no QUIC handshake with {host}:{port} within {settings.quic_timeout:g}s",
                     abort=True)
        raise
    return tunnel


# ---------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class HandshakeLimits:
    """How many QUIC handshakes an edge lets be in progress (accepted, not yet up: QUIC, the
    certificate checks and the HELLO exchange), in all and from one source address, and from
    how many on a new client must first prove its address with a QUIC Retry (RFC 9000 §8.1)."""

    max_handshakes: int = 1024
    max_per_source: int = 128
    retry_threshold: int = 64

    @classmethod
    def of(cls, settings: Any) -> HandshakeLimits:
        """From an edge's settings (``FERRYMAN_MAX_HANDSHAKES``, ``..._PER_SOURCE``, ``FERRYMAN_QUIC_RETRY_THRESHOLD``)."""
        return cls(settings.max_handshakes, settings.max_handshakes_per_source, settings.quic_retry_threshold)


RETRY_TOKEN_LIFETIME = 10.0  # seconds a Retry token is accepted (the client answers at once)
_TOKEN_HEAD = struct.Struct("!dB")  # issued at (time.time()), length of the original destination cid
_TOKEN_MAC = 16


class RetryTokens:
    """Stateless address-validation tokens: the client's address, the connection ids of the
    exchange and the time, under an HMAC key of this listener (RFC 9000 §8.1.2)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or os.urandom(32)

    def _mac(self, addr: Address, body: bytes, retry_cid: bytes) -> bytes:
        where = f"{addr[0]}|{addr[1]}|".encode()
        return hmac.new(self._key, where + body + retry_cid, hashlib.sha256).digest()[:_TOKEN_MAC]

    def issue(self, addr: Address, original_cid: bytes, retry_cid: bytes) -> bytes:
        body = _TOKEN_HEAD.pack(time.time(), len(original_cid)) + original_cid
        return body + self._mac(addr, body, retry_cid)

    def check(self, addr: Address, token: bytes, retry_cid: bytes) -> bytes | None:
        """The original destination connection id the token carries, or None when it is not ours,
        names another address or connection id, or has expired."""
        if len(token) < _TOKEN_HEAD.size + _TOKEN_MAC:
            return None
        issued, length = _TOKEN_HEAD.unpack_from(token)
        body = token[:_TOKEN_HEAD.size + length]
        if len(token) != len(body) + _TOKEN_MAC or not hmac.compare_digest(token[len(body):],
                                                                            self._mac(addr, body, retry_cid)):
            return None
        if not 0 <= time.time() - issued <= RETRY_TOKEN_LIFETIME:
            return None
        return body[_TOKEN_HEAD.size:]


class QuicServer(asyncio.DatagramProtocol):
    """An edge's QUIC listener: one UDP socket, tunnels told apart by connection id.

    ``credentials`` and ``wire`` may be replaced (a renewed certificate, new limits);
    tunnels accepted from then on use them. New clients are admitted within ``limits``:
    beyond ``retry_threshold`` handshakes in progress a client's first Initial is answered
    with a Retry and only an Initial carrying a valid token (proof that the client receives
    at its address) gets a connection; beyond ``max_handshakes`` in all, or
    ``max_per_source`` from its source (``caps.source_key``: an IPv4 address, an IPv6 /64),
    it is refused (its Initials dropped, counted in ``refused_handshakes`` and as
    ``too_many_handshakes`` tunnel closes, logged within the node's log-line limits). QUIC
    handshakes are counted here, apart from the TLS/TCP ones (``FERRYMAN_MAX_HANDSHAKES``
    applies to each transport).
    """

    def __init__(self, handler: TunnelHandler, wire: WireConfig, settings: NodeSettings, credentials: QuicCredentials,
                 *, accept_roles: tuple[str, ...], label: str, limits: HandshakeLimits | None = None) -> None:
        self.handler = handler
        self.wire = wire
        self.settings = settings
        self.credentials = credentials
        self.accept_roles = accept_roles
        self.label = label
        self.limits = limits or HandshakeLimits()
        self.transport: UdpEndpoint | None = None
        self.tunnels: set[QuicTunnel] = set()
        self.stray_datagrams = 0  # datagrams for no tunnel we know (late, or not QUIC)
        self.retries_sent = 0
        self.bad_tokens = 0  # Initials whose token is not a valid Retry token of ours (dropped)
        self.refused_handshakes = 0
        self._by_cid: dict[bytes, QuicTunnel] = {}
        self._cids: dict[QuicTunnel, set[bytes]] = {}
        self._handshaking: dict[QuicTunnel, str] = {}  # tunnels not yet up -> source key
        self._counts = Counts(per_key=self.limits.max_per_source, total=self.limits.max_handshakes)
        self._tokens = RetryTokens()
        self.engine: QuicEngine = quic_engine_of(settings)
        self._quic: tuple[QuicCredentials, Any] | None = None

    @property
    def sockname(self) -> tuple | None:
        return self.transport.get_extra_info("sockname") if self.transport is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for tunnel in list(self.tunnels):
            tunnel.transport_lost(exc)
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error on the QUIC listener", extra={"reason": str(exc)})

    def close(self) -> None:
        """Close every tunnel (CONNECTION_CLOSE "shutdown") and the socket."""
        for tunnel in list(self.tunnels):
            tunnel.close("shutdown", "edge stopped")
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if data and not data[0] & 0x80:  # a short header (1-RTT): our connection id follows the first byte
            tunnel = self._by_cid.get(data[1:1 + CID_LENGTH])
            if tunnel is None:
                self.stray_datagrams += 1
                return
            tunnel.datagram_received(data, addr)
            return
        header = self.engine.parse_header(data, CID_LENGTH)
        if header is None:
            self.stray_datagrams += 1
            return
        tunnel = self._by_cid.get(header.destination_cid)
        if tunnel is None:
            tunnel = self._accept(header, data, addr)
            if tunnel is None:
                return
        tunnel.datagram_received(data, addr)

    def segments_received(self, buffer: bytes, segment: int, addr: Address) -> None:
        """Datagrams coalesced by the kernel (GRO): one engine call when they are all short-header
        packets of one tunnel (the usual case: one peer's stream of 1-RTT packets), else one by one."""
        cid = buffer[1:1 + CID_LENGTH]
        same = True
        for start in range(0, len(buffer), segment):
            if buffer[start] & 0x80 or buffer[start + 1:start + 1 + CID_LENGTH] != cid:
                same = False
                break
        tunnel = self._by_cid.get(cid) if same else None
        if tunnel is not None:
            tunnel.segments_received(buffer, segment, addr)
            return
        view = memoryview(buffer)
        for start in range(0, len(buffer), segment):
            self.datagram_received(bytes(view[start:start + segment]), addr)

    def _accept(self, header: quic_engine.Header, data: bytes, addr: Address) -> QuicTunnel | None:
        assert self.transport is not None
        config = self._configuration()
        versions = self.engine.supported_versions(config)
        if not header.version_negotiation and header.version is not None and header.version not in versions:
            self.transport.sendto(self.engine.version_negotiation(header, versions), addr)
            return None
        if not header.initial or len(data) < SMALLEST_INITIAL:
            self.stray_datagrams += 1
            return None
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            original = self._tokens.check(addr, header.token, header.destination_cid)
            if original is None:
                self.bad_tokens += 1
                return None
            original_cid, retry_cid = original, header.destination_cid
        in_progress = self._in_progress()
        if retry_cid is None and in_progress >= self.limits.retry_threshold:
            new_cid = os.urandom(CID_LENGTH)
            self.transport.sendto(self.engine.retry(header, new_cid, self._tokens.issue(addr, original_cid, new_cid)),
                                  addr)
            self.retries_sent += 1
            return None
        source = source_key(addr[0])
        full = self._counts.take(source)
        if full is not None:
            self._refuse_handshake(addr, source, full)
            return None
        s = self.settings
        tunnel = QuicTunnel(
            self.handler, self.wire, config, self.credentials, transport=self.transport, peer=addr, dialer=False,
            accept_roles=self.accept_roles, keepalive=s.keepalive_interval, handshake_timeout=s.handshake_timeout,
            write_buffer_high=s.write_buffer_high, label=self.label,
            original_destination_connection_id=original_cid, retry_source_connection_id=retry_cid,
            cid_listener=self._cid_changed, engine=self.engine, max_pending_datagrams=s.quic_max_pending_datagrams,
        )
        self._handshaking[tunnel] = source
        self.tunnels.add(tunnel)
        self._cids[tunnel] = set()
        self._cid_changed(tunnel, header.destination_cid, True)
        self._cid_changed(tunnel, tunnel.conn.host_cid, True)
        return tunnel

    def _in_progress(self) -> int:
        """Handshakes in progress, forgetting the tunnels that are up or closed since the last call."""
        done = [t for t in self._handshaking if t.up or t.closed]
        for tunnel in done:
            self._handshake_over(tunnel)
        return len(self._handshaking)

    def _handshake_over(self, tunnel: QuicTunnel) -> None:
        source = self._handshaking.pop(tunnel, None)
        if source is not None:
            self._counts.give(source)

    def _refuse_handshake(self, addr: Address, source: str, full: str) -> None:
        """Drop a new client's Initial: too many QUIC handshakes in progress (``full``: ``total``
        or ``key``, from its source); counted, and logged within the node's log-line limits."""
        self.refused_handshakes += 1
        stats = self.handler.stats
        stats.count(stats.tunnels_closed, "too_many_handshakes")
        limits = self.limits
        reason = (f"{limits.max_handshakes} QUIC handshakes in progress on this edge" if full == "total" else
                  f"{limits.max_per_source} QUIC handshakes in progress from {source}")
        stats.log_limit.log(log, logging.WARNING, source, "tunnel refused", {
            "peer_addr": f"{addr[0]}:{addr[1]}", "transport": "quic", "code": "too_many_handshakes",
            "reason": reason})

    def _configuration(self) -> Any:
        if self._quic is None or self._quic[0] is not self.credentials:
            self._quic = (self.credentials, quic_configuration(self.credentials, self.settings, client=False,
                                                               engine=self.engine))
        return self._quic[1]

    def _cid_changed(self, tunnel: QuicTunnel, cid: bytes, issued: bool) -> None:
        """Route ``cid`` to ``tunnel`` (issued), stop routing it (retired), or forget a closed tunnel (empty cid)."""
        cids = self._cids.get(tunnel)
        if cids is None:
            return
        if not cid:
            for old in cids:
                if self._by_cid.get(old) is tunnel:
                    del self._by_cid[old]
            del self._cids[tunnel]
            self.tunnels.discard(tunnel)
            self._handshake_over(tunnel)
        elif issued:
            cids.add(cid)
            self._by_cid[cid] = tunnel
        else:
            cids.discard(cid)
            if self._by_cid.get(cid) is tunnel:
                del self._by_cid[cid]


async def serve_quic(
    handler: TunnelHandler,
    wire: WireConfig,
    host: str,
    port: int,
    settings: NodeSettings,
    credentials: QuicCredentials,
    *,
    accept_roles: tuple[str, ...] = ("client", "connector"),
    label: str = "in",
    reuse_port: bool = False,
    limits: HandshakeLimits | None = None,
    sock: socket.socket | None = None,
) -> QuicServer:
    """Serve QUIC tunnels on UDP ``host:port`` (port 0: any; read ``server.sockname``), or on the
    bound UDP socket ``sock`` (an edge worker's, made by its supervisor)."""
    loop = asyncio.get_running_loop()
    server = QuicServer(handler, wire, settings, credentials, accept_roles=accept_roles, label=label, limits=limits)
    offload = settings.quic_offload == "on"
    if sock is None:
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        family, _type, _proto, _name, addr = infos[0]
        sock = udp_socket(family, bind=addr, reuse_port=reuse_port, buffer=settings.quic_socket_buffer)
    else:
        sock.setblocking(False)
    UdpEndpoint(loop, sock, server, gso=offload, gro=offload)
    return server
