"""Sans-I/O Ferryman tunnel over QUIC: the ``TunnelConnection`` API and events on a QUIC engine.

``QuicTunnelConnection`` carries the Ferryman protocol (``frames.py``) over one QUIC
connection of a ``quic_engine.QuicEngine`` (qh3 or aioquic: ``quic_engine.select_engine``) and
offers nodes the same local API (open_flow, accept_flow, send_data, credit, acknowledge,
...: ``connection.FlowCore``) and the same events as ``TunnelConnection``; each stream is
read by the same ``reader.FrameReader``:

- stream 0 (opened by the dialer, the QUIC client) is the control stream: in each
  direction the preamble, HELLO, then PING/PONG, GOAWAY and AUTH frames;
- every flow is one bidirectional QUIC stream opened by the side that opens the flow,
  starting with its OPEN and carrying that flow's frames (OPEN_OK/OPEN_FAIL, DATA,
  WINDOW, FIN, RST) in the usual frame format. The flow id is a function of the stream
  id (dialer flows 1, 3, 5 ... on streams 4, 8, 12 ...; acceptor flows 2, 4, 6 ... on
  streams 1, 5, 9 ...), and a frame naming another flow is a protocol error. A side
  ends its half of the stream as soon as the flow is gone for it (FIN both ways, RST,
  OPEN_FAIL), so the engine discards finished streams promptly;
- a UDP flow's payloads are QUIC DATAGRAM frames (RFC 9221): a u32 flow id, then the
  payload, never split.

Ferryman's per-flow credit is kept on top of QUIC: ``send_data`` takes what the peer's
credit allows, WINDOW frames return credit, a peer that exceeds it is cut off. QUIC's
own stream and connection windows slide with what the engine has delivered (not with what
nodes have consumed), so they only bound reordering memory and bytes in flight and are
sized not to be the bottleneck. The engine's send buffers and datagram queue are bounded
here: ``backlog`` is what waits to be sent (the adapter turns it into ``writable``, and
past the same mark stops reading the peer: ``pause_reading``) and ``send_datagram`` refuses
beyond ``max_pending_datagrams`` (``FERRYMAN_QUIC_MAX_PENDING_DATAGRAMS``).

The I/O entry points mirror the engine's: ``connect``, ``receive_datagram``,
``datagrams_to_send``, ``get_timer``, ``handle_timer``. Besides the wire events, the
transport gets ``HandshakeCompleted`` (the peer's certificates, to check before anything
else happens: events after it are held until ``initiate()`` or ``refuse()``),
``TunnelTerminated`` and connection id changes (for a server routing datagrams).
"""

from __future__ import annotations

import re
import struct
from typing import Any

import msgspec

from . import events as ev
from .connection import (
    _AUTH,
    _DATA,
    _FIXED_LENGTH,
    _GOAWAY,
    _HELLO,
    _OPEN,
    _OPEN_FAIL,
    _OPEN_OK,
    _PING,
    _PONG,
    _RST,
    _WINDOW,
    _FIN,
    OPEN,
    OPENING,
    Flow,
    FlowCore,
    FlowError,
    ProtocolError,
    WireConfig,
)
from .frames import (
    DECODERS,
    MAX_CONTROL_BODY,
    FrameType,
    Open,
    encode_control,
    encode_preamble,
)
from .quic_engine import Address, EngineConnection, EngineFailure, QuicEngine, select_engine
from .reader import FrameReader

ALPN = "ferryman/1"
CONTROL_STREAM = 0
# Application error codes of CONNECTION_CLOSE; the reason phrase is "<code>: <message>".
CLOSE_NORMAL = 0x0
CLOSE_ERROR = 0x1
# A DATAGRAM frame must fit one packet: short header with the longest connection id (1 + 20),
# packet number (2), AEAD tag (16), frame type (1), length (2), then our u32 flow id.
DATAGRAM_OVERHEAD = 1 + 20 + 2 + 16 + 1 + 2 + 4
MAX_PENDING_DATAGRAMS = 512
# QUIC's connection window: wide (what a peer may send is bounded by Ferryman's per-flow
# credit and by each stream's window, not by this), so that two tunnel ends that both stop
# reading do not block each other on it short of 512 flows with a full window each way.
# (Kept below 2^30: aioquic builds packets wrongly around an 8-byte MAX_DATA.)
CONNECTION_WINDOW = 1 << 28
HELD_BASE = 32 * 1024 * 1024  # packet bytes taken while not reading, beyond the flows' credit
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


# ---------------------------------------------------------------------------- streams


def stream_of(flow_id: int) -> int:
    """The QUIC stream of a flow: dialer (odd) flows on client streams, acceptor (even) on server ones."""
    return 2 * flow_id + 2 if flow_id % 2 else 2 * flow_id - 3


def flow_of(stream_id: int) -> int:
    return stream_id // 2 - 1 if stream_id % 4 == 0 else (stream_id + 3) // 2


class _Stream(FrameReader):
    """One QUIC stream: its ``FrameReader`` state, and what we wrote to it. It reads the frames a
    stream of its kind may carry (the control stream: HELLO, PING/PONG, GOAWAY, AUTH; a flow's
    stream: its OPEN first, then that flow's frames) and hands them to ``conn``."""

    __slots__ = ("conn", "flows", "id", "flow_id", "opened", "ended", "peer_ended",
                 "_buf", "_stream_left", "_stream_flow", "_need_preamble")

    def __init__(self, conn: QuicTunnelConnection, stream_id: int, flow_id: int, *, preamble: bool = False,
                 opened: bool = False) -> None:
        self.conn = conn
        self.flows = conn.flows
        self.id = stream_id
        self.flow_id = flow_id
        self.opened = opened  # a peer stream's OPEN was read (local streams: True)
        self.ended = False  # our half is finished (or queued to finish)
        self.peer_ended = False
        self._reader_init(preamble)  # the control stream starts with the peer's preamble

    def _check_header(self, ftype: int, flow_id: int, length: int) -> None:
        control = self.id == CONTROL_STREAM
        if ftype not in (_CONTROL_FRAMES if control else _FLOW_FRAMES):
            if ftype not in _KNOWN_FRAMES:
                raise ProtocolError("unknown_frame", f"unknown frame type {ftype}")
            where = "the control stream" if control else f"the stream of flow {self.flow_id}"
            raise ProtocolError("bad_frame", f"{FrameType(ftype).name} frame on {where}")
        if ftype == _DATA:
            max_frame = self.conn._max_frame
            if length > max_frame:
                raise ProtocolError("frame_too_large", f"frame of {length} bytes exceeds the maximum of {max_frame}")
        elif ftype in _FIXED_LENGTH:
            if length != _FIXED_LENGTH[ftype]:
                raise ProtocolError("bad_frame", f"{FrameType(ftype).name} frame with length {length}")
        elif length > MAX_CONTROL_BODY:
            raise ProtocolError("frame_too_large", f"{FrameType(ftype).name} body of {length} bytes exceeds "
                                                   f"{MAX_CONTROL_BODY}")

    def _data_start(self, flow_id: int, length: int) -> bool:
        if flow_id != self.flow_id:
            self._wrong_flow("DATA", flow_id)
        return self.conn._data_start(flow_id, length)

    def _frame(self, ftype: int, flow_id: int, payload: memoryview, events: list[ev.Event]) -> None:
        self.conn._stream_frame(self, ftype, flow_id, payload, events)

    def _wrong_flow(self, what: str, flow_id: int) -> None:
        raise ProtocolError("bad_flow_id", f"{what} for flow {flow_id} on the stream of flow {self.flow_id}")

    def _unfinished(self) -> bool:
        """The peer's half ended inside a frame (or before the preamble)."""
        return bool(self._buf) or bool(self._stream_left) or self._need_preamble


class QuicTunnelConnection(FlowCore):
    """One Ferryman tunnel over one QUIC connection; see the module docstring. ``quic`` is the
    engine's configuration of this side (``engine.configuration(...)``)."""

    def __init__(
        self,
        config: WireConfig,
        quic: Any,
        *,
        dialer: bool,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        connection_window: int = CONNECTION_WINDOW,
        engine: QuicEngine | None = None,
        max_pending_datagrams: int = MAX_PENDING_DATAGRAMS,
    ) -> None:
        engine = engine if engine is not None else select_engine()
        if engine.is_client(quic) != dialer:
            raise ValueError("the dialer of a QUIC tunnel is the QUIC client")
        stream_window = 4 * max(config.window, config.max_frame) + 65536
        window = max(connection_window, 2 * stream_window)
        super().__init__(config, dialer)
        self.engine = engine
        self.early_datagrams = 0  # datagrams of our UDP flows that overtook their OPEN_OK (dropped)
        self.backlog = 0  # bytes queued in the engine not yet sent once (plus pending datagrams)
        self.max_pending_datagrams = max_pending_datagrams
        self.reading = True  # False: the peer is not read (pause_reading)
        self.held_base = HELD_BASE  # packet bytes fed to the engine while not reading: this much plus
        # a flow window per open flow (what peers may send us under Ferryman credit)
        self.dropped_packets = 0  # packets dropped while not reading, beyond the budget
        self._held_bytes = 0
        self.max_datagram = engine.max_datagram_size(quic) - DATAGRAM_OVERHEAD
        self.quic: EngineConnection = engine.connection(
            quic, alpn=ALPN, max_streams=2 * config.max_flows + 1, stream_window=stream_window,
            connection_window=window, original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self._kinds = engine.events
        self._terminated = False
        self._held = False  # HandshakeCompleted returned; events wait for initiate()/refuse()
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[_Stream, list[bytes | memoryview]] = {}
        self._early: list[tuple[int, bytes, bool]] = []
        # The acceptor may write to the control stream only once the dialer opened it.
        self._control_open = dialer
        self._control_early: list[bytes | memoryview] = []
        self._early_bytes = 0
        self._unopened = 0  # streams of the peer whose OPEN has not been read yet (each may buffer a frame)

    # ------------------------------------------------------------------ I/O
    def connect(self, addr: Address, now: float) -> None:
        """Dialer: start the QUIC handshake towards ``addr``."""
        self.quic.connect(addr, now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> list[ev.Event]:
        """Feed one UDP datagram; returns the events it caused. Raises ProtocolError on a violation."""
        if not self.reading:
            self._held_bytes += len(data)
            if self._held_bytes > self.held_base + len(self.flows) * self.config.window:
                self.dropped_packets += 1
                return []
        try:
            self.quic.receive_datagram(data, addr, now)
        except EngineFailure as exc:
            raise self._engine_failed(exc) from None
        return self.events()

    def receive_segments(self, buffer: bytes, segment: int, addr: Address, now: float) -> list[ev.Event]:
        """Feed UDP datagrams of ``segment`` bytes each (the last may be shorter) from one peer,
        coalesced by the kernel (GRO); returns the events they caused."""
        if not self.reading:
            self._held_bytes += len(buffer)
            if self._held_bytes > self.held_base + len(self.flows) * self.config.window:
                self.dropped_packets += -(-len(buffer) // segment)
                return []
        try:
            self.quic.receive_segments(buffer, segment, addr, now)
        except EngineFailure as exc:
            raise self._engine_failed(exc) from None
        return self.events()

    def handle_timer(self, now: float) -> list[ev.Event]:
        try:
            self.quic.handle_timer(now)
        except EngineFailure as exc:
            raise self._engine_failed(exc) from None
        return self.events()

    def _engine_failed(self, exc: EngineFailure) -> ProtocolError:
        err = ProtocolError("quic_error", str(exc))
        self._dead = err
        self._pending.clear()
        return err

    def get_timer(self) -> float | None:
        return self.quic.get_timer()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Hand queued frames to the engine and return the UDP datagrams to send now."""
        quic = self.quic
        pending = self._pending
        if pending:
            flows = self.flows
            for st, chunks in pending.items():
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                quic.send(st.id, data, st.ended)
                flow = flows.get(st.flow_id) if st.flow_id else None
                if flow is not None:
                    flow.out = None  # its next frame starts a new chunk
            pending.clear()
        try:
            datagrams = quic.datagrams_to_send(now)
        except EngineFailure as exc:
            raise self._engine_failed(exc) from None
        self.backlog = quic.backlog()
        return datagrams

    # ------------------------------------------------------------------ reading back-pressure
    def pause_reading(self) -> None:
        """Stop reading the peer: its stream data stays in the engine, unacknowledged to the
        application, so the engine gives the peer no more credit; packets keep being fed to the
        engine (their ACKs and credit are what lets our backlog drain), up to ``held_base``
        bytes plus a flow window per open flow (what a peer may send under Ferryman credit),
        beyond which they are dropped (``dropped_packets``) and do not count as a sign of life."""
        if self.reading:
            self.reading = False
            self._held_bytes = 0
            self.quic.hold(True)

    def resume_reading(self) -> list[ev.Event]:
        """Read the peer again; returns the events held meanwhile."""
        if self.reading:
            return []
        self.reading = True
        self.quic.hold(False)
        return self.events()

    @property
    def has_output(self) -> bool:
        return bool(self._pending)

    @property
    def host_cid(self) -> bytes:
        return self.quic.host_cid

    def events(self) -> list[ev.Event]:
        """Turn what the engine queued into events (stopping after a HandshakeCompleted)."""
        events: list[ev.Event] = []
        if self._held or self._terminated or (not self.reading and not self.quic.ending()):
            return events
        if self._dead is not None:
            raise self._dead
        quic = self.quic
        kinds = self._kinds
        try:
            while True:
                qe = quic.next_event()
                if qe is None:
                    break
                kind = type(qe)
                if kind is kinds.StreamDataReceived:
                    quic.received(qe.stream_id, len(qe.data))
                    self._stream_data(qe.stream_id, qe.data, qe.end_stream, events)
                elif kind is kinds.DatagramFrameReceived:
                    self._datagram(qe.data, events)
                elif kind is kinds.HandshakeCompleted:
                    certificate, chain = quic.peer_certificates()
                    events.append(HandshakeCompleted(certificate, chain))
                    self._held = True
                    break
                elif kind is kinds.ConnectionTerminated:
                    self._terminated = True
                    events.append(self._terminated_event(qe))
                    break
                elif kind is kinds.ConnectionIdIssued:
                    events.append(ConnectionIdIssued(qe.connection_id))
                elif kind is kinds.ConnectionIdRetired:
                    events.append(ConnectionIdRetired(qe.connection_id))
                elif kind is kinds.StreamReset or kind is kinds.StopSendingReceived:
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
    def _terminated_event(qe: Any) -> TunnelTerminated:
        phrase = qe.reason_phrase or ""
        match = _REASON_RE.fullmatch(phrase)
        if match:
            return TunnelTerminated(match.group(1), match.group(2), qe.error_code)
        if phrase == "Idle timeout":
            return TunnelTerminated("idle_timeout", "QUIC idle timeout: no packet from the peer", qe.error_code)
        if 0x100 <= qe.error_code < 0x200:  # CRYPTO_ERROR: a TLS alert (RFC 9000 §20.1)
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
            self.quic.close_with_alert(tls_alert, phrase)
        else:
            self.quic.close(CLOSE_ERROR, None, phrase)

    def close(self, code: str, reason: str, *, error: bool = False) -> None:
        """Close the QUIC connection with ``code: reason`` as its reason phrase."""
        self.quic.close(CLOSE_ERROR if error else CLOSE_NORMAL, None, f"{code}: {reason}"[:MAX_REASON])

    def _fail(self, exc: ProtocolError) -> None:
        self._dead = exc
        self._pending.clear()
        for flow in self.flows.values():
            flow.out = None
        self.close(exc.code, exc.message, error=True)

    # ------------------------------------------------------------------ local API
    def send_datagram(self, flow_id: int, data: bytes | memoryview) -> bool:
        """Queue one datagram of an open UDP flow as one QUIC DATAGRAM frame (False: the flow is gone)."""
        if self._datagram_flow(flow_id) is None:
            return False
        limit = min(self.max_datagram, self.peer.max_frame)  # type: ignore[union-attr]
        if len(data) > limit:
            raise FlowError("datagram_too_large", f"datagram of {len(data)} bytes exceeds the {limit} bytes "
                                                  "a QUIC datagram of this tunnel carries")
        if self.quic.pending_datagrams() >= self.max_pending_datagrams:
            raise FlowError("datagram_queue_full", f"{self.max_pending_datagrams} datagrams already wait to be sent")
        self.quic.send_datagram_frame(_FLOW_TAG.pack(flow_id) + data)
        return True

    # ------------------------------------------------------------------ output helpers
    def _control(self) -> _Stream:
        st = self._streams.get(CONTROL_STREAM)
        if st is None:
            st = self._streams[CONTROL_STREAM] = _Stream(self, CONTROL_STREAM, 0, preamble=True, opened=True)
        return st

    def _output(self, flow: Flow) -> list[bytes | memoryview]:
        """The pending chunk of the flow's stream (made on the first frame since the last flush)."""
        st = self._streams[stream_of(flow.id)]
        out = self._pending.get(st)
        if out is None:
            out = self._pending[st] = []
        flow.out = out
        return out

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
        st = self._streams[sid] = _Stream(self, sid, flow_id, opened=True)
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
            st._read(data, events)
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
        if self._unopened >= self.config.max_pending_opens:
            raise ProtocolError("too_many_pending", f"over {self.config.max_pending_opens} QUIC streams of the peer "
                                                    "without their OPEN")
        self._unopened += 1
        st = self._streams[sid] = _Stream(self, sid, flow_id)
        return st

    def _peer_end(self, st: _Stream) -> None:
        if st._unfinished():
            raise ProtocolError("bad_frame", f"QUIC stream {st.id} ended inside a frame")
        if st.id == CONTROL_STREAM:
            raise ProtocolError("stream_state", "peer ended the control stream")
        if not st.opened:
            raise ProtocolError("stream_state", f"QUIC stream {st.id} ended before its OPEN")
        if st.flow_id in self.flows:
            raise ProtocolError("stream_state", f"flow {st.flow_id}: stream ended without FIN, RST or OPEN_FAIL")
        st.peer_ended = True
        if st.ended:
            del self._streams[st.id]

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
            st._wrong_flow(FrameType(ftype).name, flow_id)
        if not st.opened:
            if ftype != _OPEN:
                raise ProtocolError("stream_state", f"{FrameType(ftype).name} before OPEN on the stream of "
                                                    f"flow {flow_id}")
            st.opened = True
            self._unopened -= 1
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
