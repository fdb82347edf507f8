"""The aioquic QUIC engine: every use of aioquic in Ferryman, and every reach into its internals.

``AIOQUIC`` implements ``quic_engine.QuicEngine`` on aioquic's sans-I/O ``QuicConnection``.
Ferryman needs a few things aioquic has no switch for, done here in ``_Quic`` (a subclass):
a server requests the client's certificate (``tls._request_client_certificate``; the chain
is checked by the transport at ``HandshakeCompleted``), reads the peer's certificates off its
TLS state, the bidirectional stream limit follows the flow limit and unidirectional streams
are refused, the stream and connection windows slide a fixed distance ahead of the
delivered bytes instead of doubling without bound, and packets are built from the streams
that may need a frame only. Nothing outside this module imports aioquic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events as qev
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionState,
    QuicNetworkPath,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography.hazmat.primitives.serialization import Encoding

from .quic_engine import Header, event_kinds


class _Quic(QuicConnection):
    """aioquic's connection plus what Ferryman needs and aioquic has no switch for.

    Every use of aioquic internals is here: a server requests the client's certificate
    (``tls._request_client_certificate``; the chain is checked by the transport at
    ``HandshakeCompleted``), the bidirectional stream limit follows the flow limit and
    unidirectional streams are refused, and the stream and connection windows slide a
    fixed distance ahead of the bytes delivered to the application (``received``), not of
    those aioquic queued as events, instead of doubling without bound: while the tunnel
    holds its events (``hold``) the peer gets no credit.

    aioquic visits every open stream for every packet it builds, so a tunnel with many
    idle flows would pay for all of them on each packet. Packets are built here from the
    streams that may need a frame (``_active``: data or FIN to send or still unacknowledged,
    a window update, a lost MAX_STREAM_DATA, a finished stream to discard); a stream
    leaves that set once it has nothing in flight and joins it again when it is written
    to or receives data.
    """

    def __init__(
        self,
        configuration: QuicConfiguration,
        *,
        max_streams: int,
        stream_window: int,
        connection_window: int,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration, original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self._stream_window = stream_window
        self._connection_window = connection_window
        self.delivered = 0  # stream bytes handed to the application, all streams
        self._delivered: dict[int, int] = {}  # ... per stream
        self._active: dict[int, QuicStream] = {}
        self._unsent: set[int] = set()  # streams written to since their data was last all sent
        self.held = False
        self.dropped_datagrams = 0  # DATAGRAM frames received while held
        bidi, uni = self._local_max_streams_bidi, self._local_max_streams_uni
        bidi.value = bidi.sent = max_streams
        uni.value = uni.sent = 0

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True

    def peer_certificates(self) -> tuple[bytes | None, list[bytes]]:
        tls = self.tls
        cert = tls._peer_certificate
        if cert is None:
            return None, []
        return cert.public_bytes(Encoding.DER), [c.public_bytes(Encoding.DER) for c in tls._peer_certificate_chain]

    def send(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        self.send_stream_data(stream_id, data, end_stream)  # type: ignore[arg-type]
        self._active[stream_id] = self._streams[stream_id]
        self._unsent.add(stream_id)

    def receive_segments(self, buffer: bytes, segment: int, addr: Any, now: float) -> None:
        for start in range(0, len(buffer), segment):
            self.receive_datagram(buffer[start:start + segment], addr, now)

    def close_with_alert(self, alert: int, reason: str) -> None:
        self.close(QuicErrorCode.CRYPTO_ERROR + alert, QuicFrameType.CRYPTO, reason)

    def received(self, stream_id: int, size: int) -> None:
        """Stream data was delivered: its window may need raising (or the stream discarding)."""
        self.delivered += size
        self._delivered[stream_id] = self._delivered.get(stream_id, 0) + size
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._active[stream_id] = stream

    def ending(self) -> bool:
        return self._state not in (QuicConnectionState.FIRSTFLIGHT, QuicConnectionState.CONNECTED)

    def hold(self, on: bool) -> None:
        """While held, events wait here and ``delivered`` stands still, so the connection
        window stops sliding; DATAGRAM frames are dropped and counted."""
        self.held = on

    def _handle_datagram_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        super()._handle_datagram_frame(context, frame_type, buf)
        if self.held and self._events and isinstance(self._events[-1], qev.DatagramFrameReceived):
            self._events.pop()
            self.dropped_datagrams += 1

    def backlog(self) -> int:
        """Stream bytes not yet sent once, plus queued DATAGRAM frames at the packet size."""
        total = len(self._datagrams_pending) * self._max_datagram_size
        if self._unsent:
            streams = self._streams
            done = []
            for stream_id in self._unsent:
                stream = streams.get(stream_id)
                waiting = stream.sender._buffer_stop - stream.sender.highest_offset if stream is not None else 0
                if waiting > 0:
                    total += waiting
                else:
                    done.append(stream_id)
            self._unsent.difference_update(done)
        return total

    def pending_datagrams(self) -> int:
        return len(self._datagrams_pending)

    def _write_application(self, builder: QuicPacketBuilder, network_path: QuicNetworkPath, now: float) -> None:
        streams, active = self._streams, self._active
        for stream in self._streams_queue:  # created since the last call
            active[stream.stream_id] = stream
        served = list(active.values())
        control = active.get(0)
        if control is not None and served[0] is not control:  # control frames (AUTH, GOAWAY) ahead of flow frames
            served.remove(control)
            served.insert(0, control)
        self._streams, self._streams_queue = active, served
        try:
            super()._write_application(builder, network_path, now)
        finally:
            order = self._streams_queue  # aioquic's next service order, without discarded streams
            self._streams, self._streams_queue = streams, []
            for stream in served:
                if stream.stream_id not in active:  # aioquic discarded it: finished both ways
                    streams.pop(stream.stream_id, None)
                    self._delivered.pop(stream.stream_id, None)
            self._active = {stream.stream_id: stream for stream in order if self._needs_service(stream)}

    def _needs_service(self, stream: QuicStream) -> bool:
        sender = stream.sender
        return (
            not sender.buffer_is_empty
            or sender._buffer_start != sender._buffer_stop  # unacknowledged data may be lost
            or (sender._buffer_fin is not None and not sender._acked_fin)
            or sender.reset_pending
            or stream.receiver.stop_pending
            or stream.is_finished
            or stream.max_stream_data_local_sent != stream.max_stream_data_local
            or (stream.max_stream_data_local != 0 and self._delivered.get(stream.stream_id, 0) + self._stream_window
                - stream.max_stream_data_local >= self._stream_window // 2)
        )

    def _on_max_stream_data_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if delivery != QuicDeliveryState.ACKED and stream.stream_id in self._streams:
            self._active[stream.stream_id] = stream

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        window = self._connection_window
        max_data = self._local_max_data
        if self.delivered + window - max_data.value >= window // 2:
            max_data.value = self.delivered + window
        for limit in (max_data, self._local_max_streams_bidi):
            if limit is not max_data and limit.sent - limit.used >= limit.value - limit.sent:
                continue  # batch MAX_STREAMS as aioquic does
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type, capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                    handler=self._on_connection_limit_delivery, handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> None:
        if not stream.max_stream_data_local:
            return  # a local unidirectional stream (never used here)
        window = self._stream_window
        target = self._delivered.get(stream.stream_id, 0) + window
        if target - stream.max_stream_data_local >= window // 2:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA, capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery, handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


_EVENTS = event_kinds("aioquic", qev)


class AioquicEngine:
    """``quic_engine.QuicEngine`` on aioquic."""

    name = "aioquic"
    events = _EVENTS

    def configuration(self, *, client: bool, packet_size: int, cid_length: int, idle_timeout: float,
                      server_name: str | None, certificate: Any, chain: list[Any], private_key: Any,
                      ca_pem: bytes) -> QuicConfiguration:
        config = QuicConfiguration(is_client=client, max_datagram_size=packet_size, connection_id_length=cid_length,
                                   idle_timeout=idle_timeout, server_name=server_name)
        config.certificate = certificate
        config.certificate_chain = list(chain)
        config.private_key = private_key
        config.cadata = ca_pem  # aioquic checks the server's chain and name too
        return config

    def is_client(self, configuration: QuicConfiguration) -> bool:
        return configuration.is_client

    def max_datagram_size(self, configuration: QuicConfiguration) -> int:
        return configuration.max_datagram_size

    def supported_versions(self, configuration: QuicConfiguration) -> list[int]:
        return list(configuration.supported_versions)

    def connection(self, configuration: QuicConfiguration, *, alpn: str, max_streams: int, stream_window: int,
                   connection_window: int, original_destination_connection_id: bytes | None = None,
                   retry_source_connection_id: bytes | None = None) -> _Quic:
        configuration = dataclasses.replace(configuration, max_stream_data=stream_window, max_data=connection_window,
                                            max_datagram_frame_size=65535, alpn_protocols=[alpn])
        return _Quic(configuration, max_streams=max_streams, stream_window=stream_window,
                     connection_window=connection_window,
                     original_destination_connection_id=original_destination_connection_id,
                     retry_source_connection_id=retry_source_connection_id)

    def parse_header(self, data: bytes, cid_length: int) -> Header | None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
        except ValueError:
            return None
        return Header(initial=header.packet_type == QuicPacketType.INITIAL,
                      version_negotiation=header.packet_type == QuicPacketType.VERSION_NEGOTIATION,
                      version=header.version, destination_cid=header.destination_cid, source_cid=header.source_cid,
                      token=header.token or b"")

    def version_negotiation(self, header: Header, versions: list[int]) -> bytes:
        return encode_quic_version_negotiation(source_cid=header.destination_cid, destination_cid=header.source_cid,
                                               supported_versions=versions)

    def retry(self, header: Header, new_cid: bytes, token: bytes) -> bytes:
        assert header.version is not None
        return encode_quic_retry(version=header.version, source_cid=new_cid, destination_cid=header.source_cid,
                                 original_destination_cid=header.destination_cid, retry_token=token)


AIOQUIC = AioquicEngine()
