"""The QUIC engine interface: what Ferryman needs of a sans-I/O QUIC implementation.

``QuicTunnelConnection`` (``quic.py``) and the QUIC transport run on a ``QuicEngine``, never on
a QUIC library directly; everything library-specific (configuration objects, connection
internals, packet headers, event classes) stays in the engine's module. There are two:
``qh3_engine.QH3`` (qh3: aioquic's API lineage with a native packet core, several times
faster) and ``aioquic_engine.AIOQUIC`` (aioquic, the reference implementation).
``select_engine(name)`` picks one for ``FERRYMAN_QUIC_ENGINE`` (``auto``: qh3 when it can be
imported, else aioquic). An engine provides:

- ``configuration(...)``: one side's settings (client or server, packet size, connection id
  length, idle timeout, the server name to check, our certificate, chain and key, the CA),
  as an object of the engine's own, and ``is_client`` / ``max_datagram_size`` of one;
- ``connection(configuration, ...)``: an ``EngineConnection`` with Ferryman's limits (streams,
  stream and connection windows, ALPN, DATAGRAM frames) and, for a server, the client's
  original destination connection id;
- ``events``: the classes of the events ``EngineConnection.next_event`` returns (``EventKinds``:
  the names and attributes of aioquic's events);
- ``parse_header`` / ``version_negotiation`` / ``retry``: what a server needs to route
  datagrams by connection id, to answer a client speaking a version it does not, and to
  validate a client's address with a Retry packet before keeping any state for it.

TLS alert numbers (RFC 8446) used to refuse a peer's certificate are here too, library-free.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Protocol

log = logging.getLogger("ferryman.quic")

Address = Any  # what the engine takes as a peer address (a (host, port) tuple for UDP)

# TLS alerts (RFC 8446 §6), sent when a peer's certificate is refused.
ALERT_BAD_CERTIFICATE = 42
ALERT_CERTIFICATE_REVOKED = 44
ALERT_CERTIFICATE_EXPIRED = 45
ALERT_UNKNOWN_CA = 48
ALERT_CERTIFICATE_REQUIRED = 116


class Header(NamedTuple):
    """What a server reads off a datagram before it knows the connection: an Initial packet
    (a new client), the QUIC version, the connection ids."""

    initial: bool
    version_negotiation: bool
    version: int | None
    destination_cid: bytes
    source_cid: bytes
    token: bytes = b""  # an Initial's address-validation token (from our Retry), else empty


class EventKinds(Protocol):
    """The event classes of an engine (compared by identity on the hot path)."""

    StreamDataReceived: type  # .stream_id, .data, .end_stream
    DatagramFrameReceived: type  # .data
    HandshakeCompleted: type
    ConnectionTerminated: type  # .error_code, .reason_phrase
    ConnectionIdIssued: type  # .connection_id
    ConnectionIdRetired: type  # .connection_id
    StreamReset: type  # .stream_id
    StopSendingReceived: type  # .stream_id


def event_kinds(library: str, events_module: Any) -> EventKinds:
    """The ``EventKinds`` of an engine whose library names its event classes as aioquic does
    (``events_module``: the library's events module, e.g. ``aioquic.quic.events``)."""
    return type(f"{library}Events", (), {
        "__doc__": f"{library}'s event classes, under the names ``quic_engine.EventKinds`` gives them.",
        **{name: getattr(events_module, name) for name in EventKinds.__annotations__},
    })


class EngineConnection(Protocol):
    """One QUIC connection, sans-I/O: datagrams in and out, timers, streams, DATAGRAM frames."""

    host_cid: bytes

    def connect(self, addr: Address, now: float) -> None: ...

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...

    def receive_segments(self, buffer: bytes, segment: int, addr: Address, now: float) -> None:
        """Datagrams of ``segment`` bytes each (the last may be shorter) from one peer, back to back."""

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> Any: ...

    def send(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        """Queue stream data (and the stream's end)."""

    def received(self, stream_id: int, size: int) -> None:
        """``size`` bytes of the stream were handed to the application (its windows may slide)."""

    def backlog(self) -> int:
        """Bytes waiting to be sent once: stream data not yet sent plus queued DATAGRAM frames
        (counted at the packet size). The transport's back-pressure point."""

    def hold(self, on: bool) -> None:
        """Stop (on) or resume handing received stream data to the application. While held the
        engine gives the peer no new stream or connection credit (and may drop DATAGRAM frames,
        counting them in ``dropped_datagrams``); packets are still processed (ACKs, credit)."""

    def ending(self) -> bool:
        """The connection is closing or over (what it holds may be handed out: credit no longer matters)."""

    def pending_datagrams(self) -> int:
        """DATAGRAM frames queued and not yet sent."""

    def send_datagram_frame(self, data: bytes | memoryview) -> None: ...

    def peer_certificates(self) -> tuple[bytes | None, list[bytes]]:
        """The peer's certificate (DER; None if it sent none) and the intermediates it sent."""

    def close(self, error_code: int, frame_type: int | None, reason: str) -> None:
        """CONNECTION_CLOSE with ``error_code`` (``frame_type``: a transport error's frame)."""

    def close_with_alert(self, alert: int, reason: str) -> None:
        """CONNECTION_CLOSE for TLS alert ``alert`` (refusing the peer's certificate)."""


class QuicEngine(Protocol):
    name: str
    events: EventKinds

    def configuration(self, *, client: bool, packet_size: int, cid_length: int, idle_timeout: float,
                      server_name: str | None, certificate: Any, chain: list[Any], private_key: Any,
                      ca_pem: bytes) -> Any: ...

    def is_client(self, configuration: Any) -> bool: ...

    def max_datagram_size(self, configuration: Any) -> int: ...

    def supported_versions(self, configuration: Any) -> list[int]: ...

    def connection(self, configuration: Any, *, alpn: str, max_streams: int, stream_window: int,
                   connection_window: int, original_destination_connection_id: bytes | None = None,
                   retry_source_connection_id: bytes | None = None) -> EngineConnection:
        """A connection; a server passes the client's original destination connection id and,
        after a Retry, the connection id the Retry chose."""

    def parse_header(self, data: bytes, cid_length: int) -> Header | None:
        """The long header of ``data`` (None: not a QUIC packet)."""

    def version_negotiation(self, header: Header, versions: list[int]) -> bytes: ...

    def retry(self, header: Header, new_cid: bytes, token: bytes) -> bytes:
        """A Retry packet answering the Initial ``header`` with ``token``, from connection id ``new_cid``."""


class EngineFailure(Exception):
    """The engine failed inside one connection (an internal error of the QUIC library); the
    connection is unusable and the tunnel ends with it."""


ENGINES = ("qh3", "aioquic")


class EngineUnavailable(RuntimeError):
    """The QUIC engine asked for cannot be used here (its library is missing)."""


def select_engine(name: str = "auto") -> QuicEngine:
    """The engine named ``name`` (``qh3``, ``aioquic``), or for ``auto`` qh3 when it can be
    imported, else aioquic (logged once). ``EngineUnavailable`` when the named one cannot."""
    if name not in ("auto", *ENGINES):
        raise ValueError(f"unknown QUIC engine {name!r} (auto, {', '.join(ENGINES)})")
    if name in ("auto", "qh3"):
        try:
            from .qh3_engine import QH3
        except ImportError as exc:
            if name == "qh3":
                raise EngineUnavailable(f"QUIC engine qh3 is not available: {exc}") from None
            global _FALLBACK_LOGGED
            if not _FALLBACK_LOGGED:
                _FALLBACK_LOGGED = True
                log.warning("QUIC engine qh3 is not available, using aioquic", extra={"reason": str(exc)})
        else:
            return QH3
    try:
        from .aioquic_engine import AIOQUIC
    except ImportError as exc:
        raise EngineUnavailable(f"QUIC engine aioquic is not available: {exc}") from None
    return AIOQUIC


_FALLBACK_LOGGED = False
