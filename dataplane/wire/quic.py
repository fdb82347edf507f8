"""Sans-I/O Ferryman tunnel over QUIC: the ``TunnelConnection`` API and events on aioquic.

``QuicTunnelConnection`` carries the Ferryman protocol (``frames.py``) over one aioquic
``QuicConnection`` and offers nodes the same local API (open_flow, accept_flow,
send_data, credit, acknowledge, ...) and the same events as ``TunnelConnection``:

- stream 0 (opened by the dialer, the QUIC client) is the control stream: in each
  direction the preamble, HELLO, then PING/PONG, GOAWAY and AUTH frames;
- every flow is one bidirectional QUIC stream opened by the side that opens the flow,
  starting with its OPEN and carrying that flow's frames (OPEN_OK/OPEN_FAIL, DATA,
  WINDOW, FIN, RST) in the usual frame format. The flow id is a function of the stream
  id (dialer flows 1, 3, 5 ... on streams 4, 8, 12 ...; acceptor flows 2, 4, 6 ... on
  streams 1, 5, 9 ...), and a frame naming another flow is a protocol error. A side
  ends its half of the stream as soon as the flow is gone for it (FIN both ways, RST,
  OPEN_FAIL), so aioquic discards finished streams promptly;
- a UDP flow's payloads are QUIC DATAGRAM frames (RFC 9221): a u32 flow id, then the
  payload, never split.

Ferryman's per-flow credit is kept on top of QUIC: ``send_data`` takes what the peer's
credit allows, WINDOW frames return credit, a peer that exceeds it is cut off. QUIC's
own stream and connection windows slide with what aioquic has delivered (not with what
nodes have consumed), so they only bound reordering memory and bytes in flight and are
sized not to be the bottleneck. aioquic's send buffers and datagram queue are bounded
here: ``backlog`` is what waits to be sent (the adapter turns it into ``writable``) and
``send_datagram`` refuses beyond ``MAX_PENDING_DATAGRAMS``.

The I/O entry points mirror aioquic: ``connect``, ``receive_datagram``,
``datagrams_to_send``, ``get_timer``, ``handle_timer``. Besides the wire events, the
transport gets ``HandshakeCompleted`` (the peer's certificates, to check before anything
else happens: events after it are held until ``initiate()`` or ``refuse()``),
``TunnelTerminated`` and connection id changes (for a server routing datagrams).
"""

from __future__ import annotations

import dataclasses
import re
import struct

import msgspec
from aioquic.quic import events as qev
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicNetworkPath,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography.hazmat.primitives.serialization import Encoding

from . import events as ev
from .connection import (
    _DATA,
    _FIN,
    _OPEN,
    _OPEN_OK,
    _OPEN_FAIL,
    _WINDOW,
    _RST,
    _PING,
    _PONG,
    _GOAWAY,
    _HELLO,
    _AUTH,
    _FIXED_LENGTH,
    _unpack_header,
    OPEN,
    OPENING,
    FlowError,
    ProtocolError,
    WireConfig,
    _FlowCore,
    check_preamble,
)
from .frames import (
    DECODERS,
    HEADER_SIZE,
    MAX_CONTROL_BODY,
    PREAMBLE_SIZE,
    FrameType,
    Open,
    encode_control,
    encode_header,
    encode_preamble,
    encode_window,
)

ALPN = "ferryman/1"
CONTROL_STREAM = 0
# Application error codes of CONNECTION_CLOSE; the reason phrase is "<code>: <message>".
CLOSE_NORMAL = 0x0
CLOSE_ERROR = 0x1
# A DATAGRAM frame must fit one packet: short header with the longest connection id (1 + 20),
# packet number (2), AEAD tag (16), frame type (1), length (2), then our u32 flow id.
DATAGRAM_OVERHEAD = 1 + 20 + 2 + 16 + 1 + 2 + 4
MAX_PENDING_DATAGRAMS = 512
# Stream bytes held for flow streams that arrive before the peer's HELLO (QUIC may reorder
# the control stream behind the first OPENs); beyond this the peer is not waiting for HELLO.
MAX_EARLY_BYTES = 262144
MAX_REASON = 1000

_FLOW_TAG = struct.Struct("!I")
_CONTROL_FRAMES = frozenset((_HELLO, _PING, _PONG, _GOAWAY, _AUTH))
_FLOW_FRAMES = frozenset((_OPEN, _OPEN_OK, _OPEN_FAIL, _DATA, _WINDOW, _FIN, _RST))
_KNOWN_FRAMES = frozenset(int(t) for t in FrameType)
_unpack_tag = _FLOW_TAG.unpack_from
_REASON_RE = re.compile(r"([a-z][a-z0-9_]{0,63}): (.*)", re.S)


# ---------------------------------------------------------------------------- events


class HandshakeCompleted(ev.Event):
    """QUIC + TLS are up. ``certificate`` is the peer's DER certificate (None if it sent
    none), ``chain`` the intermediates it sent. Check them, then ``initiate()`` or ``refuse()``."""

    __slots__ = ("certificate", "chain")

    def __init__(self, certificate: bytes | None, chain: list[bytes]) -> None:
        self.certificate = certificate
        self.chain = chain


class TunnelTerminated(ev.Event):
    """The QUIC connection is over. ``code``/``reason`` come from a CONNECTION_CLOSE
    ("<code>: <message>") or describe another end (idle timeout, TLS failure);
    ``error_code`` is the QUIC error code (0: a normal close)."""

    __slots__ = ("code", "reason", "error_code")

    def __init__(self, code: str, reason: str, error_code: int) -> None:
        self.code = code
        self.reason = reason
        self.error_code = error_code


class ConnectionIdIssued(ev.Event):
    """A new local connection id the peer may address datagrams to."""

    __slots__ = ("cid",)

    def __init__(self, cid: bytes) -> None:
        self.cid = cid


class ConnectionIdRetired(ev.Event):
    """A local connection id the peer no longer uses."""

    __slots__ = ("cid",)

    def __init__(self, cid: bytes) -> None:
        self.cid = cid


# ---------------------------------------------------------------------------- aioquic


class _Quic(QuicConnection):
    """aioquic's connection plus what Ferryman needs and aioquic has no switch for.

    Every use of aioquic internals is here: a server requests the client's certificate
    (``tls._request_client_certificate``; the chain is checked by the transport at
    ``HandshakeCompleted``), the bidirectional stream limit follows the flow limit and
    unidirectional streams are refused, and the stream and connection windows slide a
    fixed distance ahead of the delivered bytes instead of doubling without bound.

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
    ) -> None:
        super().__init__(
            configuration=configuration, original_destination_connection_id=original_destination_connection_id
        )
        self._stream_window = stream_window
        self._connection_window = connection_window
        self.delivered = 0  # stream bytes handed to the application, all streams
        self._active: dict[int, QuicStream] = {}
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

    def received(self, stream_id: int, size: int) -> None:
        """Stream data was delivered: its window may need raising (or the stream discarding)."""
        self.delivered += size
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._active[stream_id] = stream

    def sent_offset(self, stream_id: int) -> int | None:
        """How far a stream's data has been sent at least once; None once aioquic discarded it."""
        stream = self._streams.get(stream_id)
        return stream.sender.highest_offset if stream is not None else None

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
            or (stream.max_stream_data_local != 0 and stream.receiver.starting_offset() + self._stream_window
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
        target = stream.receiver.starting_offset() + window
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


# ---------------------------------------------------------------------------- streams


def stream_of(flow_id: int) -> int:
    """The QUIC stream of a flow: dialer (odd) flows on client streams, acceptor (even) on server ones."""
    return 2 * flow_id + 2 if flow_id % 2 else 2 * flow_id - 3


def flow_of(stream_id: int) -> int:
    return stream_id // 2 - 1 if stream_id % 4 == 0 else (stream_id + 3) // 2


class _Stream:
    """Receive-side parse state of one QUIC stream, and what we wrote to it."""

    __slots__ = ("id", "flow_id", "buf", "left", "opened", "preamble", "written", "ended", "peer_ended")

    def __init__(self, stream_id: int, flow_id: int, *, preamble: bool = False, opened: bool = False) -> None:
        self.id = stream_id
        self.flow_id = flow_id
        self.buf = bytearray()  # an incomplete header or control body
        self.left = 0  # bytes still to come of a DATA payload whose header was read
        self.opened = opened  # a peer stream's OPEN was read (local streams: True)
        self.preamble = preamble  # the control stream still expects the peer's preamble
        self.written = 0  # bytes handed to aioquic
        self.ended = False  # our half is finished (or queued to finish)
        self.peer_ended = False


class QuicTunnelConnection(_FlowCore):
    """One Ferryman tunnel over one QUIC connection; see the module docstring."""

    def __init__(
        self,
        config: WireConfig,
        quic: QuicConfiguration,
        *,
        dialer: bool,
        original_destination_connection_id: bytes | None = None,
        connection_window: int = 16 * 1024 * 1024,
    ) -> None:
        if quic.is_client != dialer:
            raise ValueError("the dialer of a QUIC tunnel is the QUIC client")
        stream_window = 4 * max(config.window, config.max_frame) + 65536
        window = max(connection_window, 2 * stream_window)
        quic = dataclasses.replace(quic, max_stream_data=stream_window, max_data=window,
                                   max_datagram_frame_size=65535, alpn_protocols=[ALPN])
        super().__init__(config, dialer)
        self.early_datagrams = 0  # datagrams of our UDP flows that overtook their OPEN_OK (dropped)
        self.backlog = 0  # bytes queued in aioquic not yet sent once (plus pending datagrams)
        self.max_datagram = quic.max_datagram_size - DATAGRAM_OVERHEAD
        self.quic = _Quic(
            quic, max_streams=2 * config.max_flows + 1, stream_window=stream_window,
            connection_window=window, original_destination_connection_id=original_destination_connection_id,
        )
        self._terminated = False
        self._held = False  # HandshakeCompleted returned; events wait for initiate()/refuse()
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[_Stream, list[bytes | memoryview]] = {}
        self._backlogged: set[_Stream] = set()
        self._early: list[tuple[int, bytes, bool]] = []
        # The acceptor may write to the control stream only once the dialer opened it.
        self._control_open = dialer
        self._control_early: list[bytes | memoryview] = []
        self._early_bytes = 0

    # ------------------------------------------------------------------ I/O
    def connect(self, addr: NetworkAddress, now: float) -> None:
        """Dialer: start the QUIC handshake towards ``addr``."""
        self.quic.connect(addr, now)

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> list[ev.Event]:
        """Feed one UDP datagram; returns the events it caused. Raises ProtocolError on a violation."""
        self.quic.receive_datagram(data, addr, now)
        return self.events()

    def handle_timer(self, now: float) -> list[ev.Event]:
        self.quic.handle_timer(now)
        return self.events()

    def get_timer(self) -> float | None:
        return self.quic.get_timer()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """Hand queued frames to aioquic and return the UDP datagrams to send now."""
        quic = self.quic
        pending = self._pending
        if pending:
            for st, chunks in pending.items():
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                st.written += len(data)
                quic.send(st.id, data, st.ended)
                self._backlogged.add(st)
            pending.clear()
        datagrams = quic.datagrams_to_send(now)
        backlog = quic.pending_datagrams() * self.max_datagram
        if self._backlogged:
            done = []
            for st in self._backlogged:
                sent = quic.sent_offset(st.id)
                if sent is None or sent >= st.written:
                    done.append(st)
                else:
                    backlog += st.written - sent
            self._backlogged.difference_update(done)
        self.backlog = backlog
        return datagrams

    @property
    def has_output(self) -> bool:
        return bool(self._pending)

    @property
    def host_cid(self) -> bytes:
        return self.quic.host_cid

    def events(self) -> list[ev.Event]:
        """Turn what aioquic queued into events (stopping after a HandshakeCompleted)."""
        events: list[ev.Event] = []
        if self._held or self._terminated:
            return events
        if self._dead is not None:
            raise self._dead
        quic = self.quic
        try:
            while True:
                qe = quic.next_event()
                if qe is None:
                    break
                kind = type(qe)
                if kind is qev.StreamDataReceived:
                    quic.received(qe.stream_id, len(qe.data))
                    self._stream_data(qe.stream_id, qe.data, qe.end_stream, events)
                elif kind is qev.DatagramFrameReceived:
                    self._datagram(qe.data, events)
                elif kind is qev.HandshakeCompleted:
                    certificate, chain = quic.peer_certificates()
                    events.append(HandshakeCompleted(certificate, chain))
                    self._held = True
                    break
                elif kind is qev.ConnectionTerminated:
                    self._terminated = True
                    events.append(self._terminated_event(qe))
                    break
                elif kind is qev.ConnectionIdIssued:
                    events.append(ConnectionIdIssued(qe.connection_id))
                elif kind is qev.ConnectionIdRetired:
                    events.append(ConnectionIdRetired(qe.connection_id))
                elif kind is qev.StreamReset or kind is qev.StopSendingReceived:
                    raise ProtocolError("stream_state", f"QUIC stream {qe.stream_id} reset by the peer; "
                                                        "flows end with RST frames")
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            err = ProtocolError("bad_frame", f"undecodable control frame: {exc}")
            self._fail(err)
            raise err from None
        return events

    @staticmethod
    def _terminated_event(qe: qev.ConnectionTerminated) -> TunnelTerminated:
        phrase = qe.reason_phrase or ""
        match = _REASON_RE.fullmatch(phrase)
        if match:
            return TunnelTerminated(match.group(1), match.group(2), qe.error_code)
        if phrase == "Idle timeout":
            return TunnelTerminated("idle_timeout", "QUIC idle timeout: no packet from the peer", qe.error_code)
        if 0x100 <= qe.error_code < 0x200:
            return TunnelTerminated("tls_error", f"TLS alert {qe.error_code - 0x100}: {phrase or 'handshake failed'}",
                                    qe.error_code)
        if qe.error_code:
            return TunnelTerminated("quic_error", f"QUIC error 0x{qe.error_code:x}: {phrase}", qe.error_code)
        return TunnelTerminated("closed", phrase or "QUIC connection closed", 0)

    # ------------------------------------------------------------------ handshake / close
    def initiate(self) -> None:
        """The peer's certificate is accepted: send our preamble + HELLO and release held events."""
        self._held = False
        self._initiated = True
        control = self._control()
        chunks = self._pending.setdefault(control, []) if self._control_open else self._control_early
        chunks.insert(0, encode_preamble() + encode_control(0, self._hello()))  # before a GOAWAY queued ahead of it

    def refuse(self, code: str, reason: str, tls_alert: int | None = None) -> None:
        """Refuse the peer after HandshakeCompleted: CONNECTION_CLOSE with a TLS alert
        (a certificate problem) or an application error, naming ``code`` and ``reason``."""
        self._held = True
        phrase = f"{code}: {reason}"[:MAX_REASON]
        if tls_alert is not None:
            self.quic.close(QuicErrorCode.CRYPTO_ERROR + tls_alert, QuicFrameType.CRYPTO, phrase)
        else:
            self.quic.close(CLOSE_ERROR, None, phrase)

    def close(self, code: str, reason: str, *, error: bool = False) -> None:
        """Close the QUIC connection with ``code: reason`` as its reason phrase."""
        self.quic.close(CLOSE_ERROR if error else CLOSE_NORMAL, None, f"{code}: {reason}"[:MAX_REASON])

    def _fail(self, exc: ProtocolError) -> None:
        self._dead = exc
        self._pending.clear()
        self.close(exc.code, exc.message, error=True)

    # ------------------------------------------------------------------ local API
    def send_data(self, flow_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the flow's credit allows; returns the bytes taken."""
        flow = self.flows.get(flow_id)
        if flow is None:
            raise FlowError("no_flow", f"flow {flow_id} does not exist")
        if flow.state != OPEN or flow.sent_fin or flow.udp:
            raise FlowError("flow_state", f"flow {flow_id} cannot send data now")
        size = len(data)
        n = size if size <= flow.send_credit else flow.send_credit
        if n <= 0:
            return 0
        flow.send_credit -= n
        max_frame = self.peer.max_frame  # type: ignore[union-attr]
        st = self._streams[stream_of(flow_id)]
        out = self._pending.get(st)
        if out is None:
            out = self._pending[st] = []
        if n <= max_frame:
            out.append(encode_header(_DATA, flow_id, n))
            out.append(data if n == size else memoryview(data)[:n])
            return n
        view = memoryview(data)
        for start in range(0, n, max_frame):
            chunk = view[start:min(start + max_frame, n)]
            out.append(encode_header(_DATA, flow_id, len(chunk)))
            out.append(chunk)
        return n

    def acknowledge(self, flow_id: int, size: int) -> bool:
        """Tell the connection ``size`` received bytes were consumed; grants credit back.
        Returns whether a WINDOW frame was queued (credit goes back in steps of a quarter window)."""
        flow = self.flows.get(flow_id)
        if flow is None or flow.got_fin:
            return False
        unacked = flow.unacked + size
        if unacked >= self._ack_threshold:
            flow.recv_credit += unacked
            flow.unacked = 0
            self._queue(self._streams[stream_of(flow_id)], encode_window(flow_id, unacked))
            if self.on_window is not None:
                self.on_window()
            return True
        flow.unacked = unacked
        return False

    def send_datagram(self, flow_id: int, data: bytes | memoryview) -> None:
        """Queue one datagram of an open UDP flow as one QUIC DATAGRAM frame."""
        self._datagram_flow(flow_id)
        limit = min(self.max_datagram, self.peer.max_frame)  # type: ignore[union-attr]
        if len(data) > limit:
            raise FlowError("datagram_too_large", f"datagram of {len(data)} bytes exceeds the {limit} bytes "
                                                  "a QUIC datagram of this tunnel carries")
        if self.quic.pending_datagrams() >= MAX_PENDING_DATAGRAMS:
            raise FlowError("datagram_queue_full", f"{MAX_PENDING_DATAGRAMS} datagrams already wait to be sent")
        self.quic.send_datagram_frame(_FLOW_TAG.pack(flow_id) + data)

    # ------------------------------------------------------------------ output helpers
    def _control(self) -> _Stream:
        st = self._streams.get(CONTROL_STREAM)
        if st is None:
            st = self._streams[CONTROL_STREAM] = _Stream(CONTROL_STREAM, 0, preamble=True, opened=True)
        return st

    def _queue(self, st: _Stream, chunk: bytes | memoryview) -> None:
        if not self._control_open and st.id == CONTROL_STREAM:
            self._control_early.append(chunk)
            return
        out = self._pending.get(st)
        if out is None:
            self._pending[st] = [chunk]
        else:
            out.append(chunk)

    def _send_flow(self, flow_id: int, chunk: bytes | memoryview) -> None:
        self._queue(self._streams[stream_of(flow_id)], chunk)

    def _start_flow(self, flow_id: int, chunk: bytes) -> None:
        sid = stream_of(flow_id)
        st = self._streams[sid] = _Stream(sid, flow_id, opened=True)
        self._queue(st, chunk)

    def _send_control(self, chunk: bytes | memoryview) -> None:
        self._queue(self._control(), chunk)

    def _forget(self, flow_id: int) -> None:
        """The flow is gone for us: drop it and finish our half of its stream."""
        self.flows.pop(flow_id, None)
        st = self._streams.get(stream_of(flow_id))
        if st is None or st.ended:
            return
        st.ended = True
        if st not in self._pending:
            self._pending[st] = []
        if st.peer_ended:
            del self._streams[st.id]

    # ------------------------------------------------------------------ input: streams
    def _stream_data(self, sid: int, data: bytes, end: bool, events: list[ev.Event]) -> None:
        if sid == CONTROL_STREAM and not self._control_open:
            self._control_open = True
            if self._control_early:
                self._pending[self._control()] = self._control_early
                self._control_early = []
        st = self._streams.get(sid)
        if st is None:
            if sid % 4 >= 2:
                raise ProtocolError("bad_stream", f"unidirectional QUIC stream {sid}")
            if self.peer is None:
                self._hold_early(sid, data, end)
                return
            st = self._new_peer_stream(sid)
        elif st.peer_ended:
            raise ProtocolError("stream_state", f"data on QUIC stream {sid} after its end")
        if data:
            self._parse(st, data, events)
        if end:
            self._peer_end(st)

    def _hold_early(self, sid: int, data: bytes, end: bool) -> None:
        self._early_bytes += len(data)
        if self._early_bytes > MAX_EARLY_BYTES:
            raise ProtocolError("hello_required", f"over {MAX_EARLY_BYTES} bytes of flow streams before HELLO")
        self._early.append((sid, data, end))

    def _new_peer_stream(self, sid: int) -> _Stream:
        if sid == CONTROL_STREAM:
            raise ProtocolError("bad_stream", "the control stream is opened by the dialer")
        flow_id = flow_of(sid)
        if flow_id % 2 != self._peer_parity:
            raise ProtocolError("bad_flow_id", f"QUIC stream {sid} was not opened by the peer")
        st = self._streams[sid] = _Stream(sid, flow_id)
        return st

    def _peer_end(self, st: _Stream) -> None:
        if st.buf or st.left or st.preamble:
            raise ProtocolError("bad_frame", f"QUIC stream {st.id} ended inside a frame")
        if st.id == CONTROL_STREAM:
            raise ProtocolError("stream_state", "peer ended the control stream")
        if st.flow_id in self.flows:
            raise ProtocolError("stream_state", f"flow {st.flow_id}: stream ended without FIN, RST or OPEN_FAIL")
        st.peer_ended = True
        if st.ended:
            del self._streams[st.id]

    def _parse(self, st: _Stream, data: bytes, events: list[ev.Event]) -> None:
        n = len(data)
        view = memoryview(data)
        pos = 0
        if st.left:
            pos = self._payload(st, view, 0, n, events)
            if st.left:
                return
        buf = st.buf
        if buf:
            # Complete the header (or control body) an earlier chunk left unfinished.
            while True:
                need = self._wanted(st, buf)
                if len(buf) >= need:
                    break
                if len(buf) >= HEADER_SIZE and buf[0] == _DATA:
                    _t, _f, flow_id, length = _unpack_header(buf, 0)
                    buf.clear()
                    if flow_id != st.flow_id:
                        self._wrong_flow(st, "DATA", flow_id)
                    self._data_start(flow_id, length)
                    st.left = length
                    pos = self._payload(st, view, pos, n, events)
                    if st.left:
                        return
                    break
                take = min(need - len(buf), n - pos)
                if take == 0:
                    return
                buf += view[pos:pos + take]
                pos += take
            if buf:
                whole = bytes(buf)
                buf.clear()
                if st.preamble:
                    self._preamble(st, whole, 0)
                else:
                    ftype, _flags, flow_id, _length = _unpack_header(whole, 0)
                    if ftype == _DATA:  # an empty DATA frame
                        if flow_id != st.flow_id:
                            self._wrong_flow(st, "DATA", flow_id)
                        self._data_start(flow_id, 0)
                    else:
                        self._stream_frame(st, ftype, flow_id, memoryview(whole)[HEADER_SIZE:], events)
        while pos < n:
            remaining = n - pos
            if st.preamble:
                if remaining < PREAMBLE_SIZE:
                    break
                self._preamble(st, data, pos)
                pos += PREAMBLE_SIZE
                continue
            if remaining < HEADER_SIZE:
                break
            ftype, _flags, flow_id, length = _unpack_header(data, pos)
            self._check_header(st, ftype, length)
            body = pos + HEADER_SIZE
            end = body + length
            if ftype == _DATA:
                if flow_id != st.flow_id:
                    self._wrong_flow(st, "DATA", flow_id)
                self._data_start(flow_id, length)
                if end > n:
                    st.left = length
                    self._payload(st, view, body, n, events)
                    return
                if length and st.flow_id in self.flows:
                    events.append(ev.DataReceived(flow_id, view[body:end]))
            elif end > n:
                break
            else:
                self._stream_frame(st, ftype, flow_id, view[body:end], events)
            pos = end
        if pos < n:
            buf += view[pos:]

    def _payload(self, st: _Stream, view: memoryview, pos: int, n: int, events: list[ev.Event]) -> int:
        take = min(st.left, n - pos)
        st.left -= take
        if take and st.flow_id in self.flows:
            events.append(ev.DataReceived(st.flow_id, view[pos:pos + take]))
        return pos + take

    def _wanted(self, st: _Stream, buf: bytearray) -> int:
        if st.preamble:
            return PREAMBLE_SIZE
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE
        ftype, _flags, _flow_id, length = _unpack_header(buf, 0)
        self._check_header(st, ftype, length)
        return HEADER_SIZE + length

    def _preamble(self, st: _Stream, data: bytes, pos: int) -> None:
        check_preamble(data, pos)
        st.preamble = False

    def _check_header(self, st: _Stream, ftype: int, length: int) -> None:
        allowed = _CONTROL_FRAMES if st.id == CONTROL_STREAM else _FLOW_FRAMES
        if ftype not in allowed:
            if ftype not in _KNOWN_FRAMES:
                raise ProtocolError("unknown_frame", f"unknown frame type {ftype}")
            where = "the control stream" if st.id == CONTROL_STREAM else f"the stream of flow {st.flow_id}"
            raise ProtocolError("bad_frame", f"{FrameType(ftype).name} frame on {where}")
        if ftype == _DATA:
            if length > self._max_frame:
                raise ProtocolError("frame_too_large", f"frame of {length} bytes exceeds the maximum of {self._max_frame}")
        elif ftype in _FIXED_LENGTH:
            if length != _FIXED_LENGTH[ftype]:
                raise ProtocolError("bad_frame", f"{FrameType(ftype).name} frame with length {length}")
        elif length > MAX_CONTROL_BODY:
            raise ProtocolError("frame_too_large", f"{FrameType(ftype).name} body of {length} bytes exceeds "
                                                   f"{MAX_CONTROL_BODY}")

    @staticmethod
    def _wrong_flow(st: _Stream, what: str, flow_id: int) -> None:
        raise ProtocolError("bad_flow_id", f"{what} for flow {flow_id} on the stream of flow {st.flow_id}")

    def _late_frame(self, flow_id: int, what: str) -> None:
        """A frame on the stream of a flow that is gone: fine once its OPEN was read."""
        st = self._streams.get(stream_of(flow_id))
        if st is not None and not st.opened:
            raise ProtocolError("stream_state", f"{what} before OPEN on the stream of flow {flow_id}")
        self.late_frames += 1

    def _stream_frame(self, st: _Stream, ftype: int, flow_id: int, payload: memoryview,
                      events: list[ev.Event]) -> None:
        if st.id == CONTROL_STREAM:
            self._frame(ftype, flow_id, payload, events)
            return
        if flow_id != st.flow_id:
            self._wrong_flow(st, FrameType(ftype).name, flow_id)
        if not st.opened:
            if ftype != _OPEN:
                raise ProtocolError("stream_state", f"{FrameType(ftype).name} before OPEN on the stream of "
                                                    f"flow {flow_id}")
            st.opened = True
            self._remote_open(flow_id, DECODERS[_OPEN].decode(payload), events)
            return
        if ftype == _OPEN:
            raise ProtocolError("stream_state", f"second OPEN on the stream of flow {flow_id}")
        self._frame(ftype, flow_id, payload, events)

    def _after_hello(self, events: list[ev.Event]) -> None:
        early, self._early = self._early, []
        for sid, data, end in early:
            self._stream_data(sid, data, end, events)

    def _remote_open(self, flow_id: int, request: Open, events: list[ev.Event]) -> None:
        self._peer_last_id = max(self._peer_last_id, flow_id)  # QUIC may reorder OPENs
        self._admit(flow_id, request, events)

    # ------------------------------------------------------------------ input: datagrams
    def _datagram(self, data: bytes, events: list[ev.Event]) -> None:
        if len(data) < 4:
            raise ProtocolError("bad_frame", f"QUIC datagram of {len(data)} bytes has no flow id")
        if len(data) - 4 > self._max_frame:
            raise ProtocolError("frame_too_large", f"datagram of {len(data) - 4} bytes exceeds {self._max_frame}")
        if self.peer is None:
            raise ProtocolError("hello_required", "QUIC datagram before HELLO")
        (flow_id,) = _unpack_tag(data, 0)
        flow = self.flows.get(flow_id)
        if flow is None:
            self._late(flow_id, "DATAGRAM")
            return
        if flow.udp and flow.state == OPENING and flow.local:
            # Datagrams are not ordered with streams: the answer may overtake the OPEN_OK.
            self.early_datagrams += 1
            return
        if not flow.udp or flow.state != OPEN:
            raise ProtocolError("stream_state", f"DATAGRAM on flow {flow_id} "
                                                f"{'before OPEN_OK' if flow.udp else 'of a TCP flow'}")
        events.append(ev.DatagramReceived(flow_id, memoryview(data)[4:]))
