"""The QUIC engine interface: what Ferryman needs of a sans-I/O QUIC implementation.

``QuicTunnelConnection`` (``quic.py``) and the QUIC transport run on a ``QuicEngine``, never on
a QUIC library directly; everything library-specific (configuration objects, connection
internals, packet headers, event classes) stays in the engine's module. Today there is one,
``aioquic_engine.AIOQUIC``; a faster one from the same API lineage (qh3) can be added beside
it. An engine provides:

- ``configuration(...)``: one side's settings (client or server, packet size, connection id
  length, idle timeout, the server name to check, our certificate, chain and key, the CA),
  as an object of the engine's own, and ``is_client`` / ``max_datagram_size`` of one;
- ``connection(configuration, ...)``: an ``EngineConnection`` with Ferryman's limits (streams,
  stream and connection windows, ALPN, DATAGRAM frames) and, for a server, the client's
  original destination connection id;
- ``events``: the classes of the events ``EngineConnection.next_event`` returns (``EventKinds``:
  the names and attributes of aioquic's events);
- ``parse_header`` / ``version_negotiation``: what a server needs to route datagrams by
  connection id and to answer a client speaking a version it does not.

TLS alert numbers (RFC 8446) used to refuse a peer's certificate are here too, library-free.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

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


class EngineConnection(Protocol):
    """One QUIC connection, sans-I/O: datagrams in and out, timers, streams, DATAGRAM frames."""

    host_cid: bytes

    def connect(self, addr: Address, now: float) -> None: ...

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> Any: ...

    def send(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        """Queue stream data (and the stream's end)."""

    def received(self, stream_id: int, size: int) -> None:
        """``size`` bytes of the stream were handed to the application (its windows may slide)."""

    def sent_offset(self, stream_id: int) -> int | None:
        """How far the stream's data was sent at least once; None once the stream is discarded."""

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
                   connection_window: int, original_destination_connection_id: bytes | None = None
                   ) -> EngineConnection: ...

    def parse_header(self, data: bytes, cid_length: int) -> Header | None:
        """The long header of ``data`` (None: not a QUIC packet)."""

    def version_negotiation(self, header: Header, versions: list[int]) -> bytes: ...
