"""Target ``quic``: Ferryman's framing on QUIC (``QuicTunnelConnection``), below it a scripted engine.

The QUIC library itself is not the subject: a scripted engine (``ScriptEngine``, implementing
``dataplane.wire.quic_engine.QuicEngine``) hands the connection exactly the events a peer can cause
through QUIC — data on any stream id with or without its end, DATAGRAM frames, stream resets,
CONNECTION_CLOSE reason phrases — in the order the input says. Contract:

- ``events()`` raises nothing but ``ProtocolError``, closes the QUIC connection when it does, and a
  dead connection keeps raising that error;
- bytes held per stream (an incomplete header or control body) and bytes held before HELLO are bounded;
- a node answering events as a real one does never gets a ``FlowError`` for a flow reported open;
- a CONNECTION_CLOSE reason phrase always becomes a ``TunnelTerminated`` event.
"""

from __future__ import annotations

import collections
from typing import Any

from dataplane.wire import events as ev
from dataplane.wire.connection import OPEN, FlowError, ProtocolError, WireConfig
from dataplane.wire.frames import HEADER_SIZE, MAX_CONTROL_BODY, Hello, Open, encode_control, encode_preamble
from dataplane.wire.quic import MAX_EARLY_BYTES, QuicTunnelConnection, TunnelTerminated

from . import Finding, Reader

MAX_BUFFERED = HEADER_SIZE + MAX_CONTROL_BODY


class _Event:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class StreamDataReceived(_Event): ...
class DatagramFrameReceived(_Event): ...
class HandshakeCompleted(_Event): ...
class ConnectionTerminated(_Event): ...
class ConnectionIdIssued(_Event): ...
class ConnectionIdRetired(_Event): ...
class StreamReset(_Event): ...
class StopSendingReceived(_Event): ...


class _Kinds:
    StreamDataReceived = StreamDataReceived
    DatagramFrameReceived = DatagramFrameReceived
    HandshakeCompleted = HandshakeCompleted
    ConnectionTerminated = ConnectionTerminated
    ConnectionIdIssued = ConnectionIdIssued
    ConnectionIdRetired = ConnectionIdRetired
    StreamReset = StreamReset
    StopSendingReceived = StopSendingReceived


class ScriptConnection:
    """An engine connection whose events are scripted; what is sent is counted, never encrypted."""

    host_cid = b"\x01" * 8

    def __init__(self) -> None:
        self.queue: collections.deque[_Event] = collections.deque()
        self.sent: dict[int, int] = {}
        self.ended: set[int] = set()
        self.datagrams = 0
        self.closed: str | None = None
        self.held = False

    def connect(self, addr: Any, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: return []
    def get_timer(self) -> float | None: return None
    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> Any:
        return self.queue.popleft() if self.queue else None

    def send(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        if stream_id in self.ended:
            raise Finding(f"data queued on QUIC stream {stream_id} after its end")
        self.sent[stream_id] = self.sent.get(stream_id, 0) + len(data)
        if end_stream:
            self.ended.add(stream_id)

    def received(self, stream_id: int, size: int) -> None: ...

    def sent_offset(self, stream_id: int) -> int | None:
        return self.sent.get(stream_id)

    def receive_segments(self, buffer: bytes, segment: int, addr: Any, now: float) -> None: ...

    def backlog(self) -> int:
        return 0  # everything queued is sent at once

    def hold(self, on: bool) -> None:
        self.held = on

    def ending(self) -> bool:
        return self.closed is not None

    def pending_datagrams(self) -> int:
        return 0

    def send_datagram_frame(self, data: bytes | memoryview) -> None:
        self.datagrams += 1

    def peer_certificates(self) -> tuple[bytes | None, list[bytes]]:
        return None, []

    def close(self, error_code: int, frame_type: int | None, reason: str) -> None:
        self.closed = reason

    def close_with_alert(self, alert: int, reason: str) -> None:
        self.closed = reason


class ScriptEngine:
    name = "script"
    events = _Kinds

    def configuration(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def is_client(self, configuration: dict[str, Any]) -> bool:
        return configuration["client"]

    def max_datagram_size(self, configuration: dict[str, Any]) -> int:
        return 1350

    def supported_versions(self, configuration: dict[str, Any]) -> list[int]:
        return [1]

    def connection(self, configuration: dict[str, Any], **kwargs: Any) -> ScriptConnection:
        return ScriptConnection()

    def parse_header(self, data: bytes, cid_length: int) -> None:
        return None

    def version_negotiation(self, header: Any, versions: list[int]) -> bytes:
        return b""

    def retry(self, header: Any, new_cid: bytes, token: bytes) -> bytes:
        return b""


ENGINE = ScriptEngine()
# Stream ids the script picks from: the control stream, client/server bidirectional streams of the
# first flows, unidirectional ones; a byte above these picks a raw id.
_STREAMS = [0, 4, 8, 1, 5, 9, 12, 13, 2, 3, 6, 7]


class _Run:
    def __init__(self, dialer: bool, hello: bool, flows: bool) -> None:
        role, peer_role = ("client", "edge") if dialer else ("edge", "client")
        config = WireConfig(role=role, node="fuzz", max_frame=4096, window=65536, max_flows=32, max_pending_opens=8)
        self.conn = QuicTunnelConnection(config, ENGINE.configuration(client=dialer), dialer=dialer, engine=ENGINE)
        self.quic: ScriptConnection = self.conn.quic  # type: ignore[assignment]
        self.error: ProtocolError | None = None
        self.quic.queue.append(HandshakeCompleted())
        got = self.conn.events()
        if len(got) != 1:
            raise Finding(f"handshake gave {got!r}")
        self.conn.initiate()
        if hello:
            hello_bytes = encode_preamble() + encode_control(0, Hello(role=peer_role, node="peer", max_frame=4096,
                                                                     window=65536, max_flows=32))
            self.push(StreamDataReceived(stream_id=0, data=hello_bytes, end_stream=False))
            if flows and self.error is None:
                self.conn.open_flow(Open(host="app.example", port=443))
                self.conn.open_flow(Open(host="dns.example", port=53, protocol="udp"))
                self.conn.datagrams_to_send(0.0)

    def push(self, event: _Event) -> None:
        conn = self.conn
        self.quic.queue.append(event)
        if self.error is not None:
            try:
                conn.events()
            except ProtocolError as exc:
                if exc is not self.error:
                    raise Finding(f"a dead connection raised {exc.code!r} after {self.error.code!r}") from exc
                return
            if not conn._terminated:
                raise Finding("a dead connection accepted more input")
            return
        try:
            events = conn.events()
        except ProtocolError as exc:
            self.error = exc
            if self.quic.closed is None or not self.quic.closed.startswith(exc.code + ": "):
                raise Finding(f"ProtocolError {exc.code!r} without CONNECTION_CLOSE naming it") from exc
            return
        for st in conn._streams.values():
            if len(st._buf) > MAX_BUFFERED:
                raise Finding(f"{len(st._buf)} bytes buffered on stream {st.id} (at most {MAX_BUFFERED})")
        if conn._early_bytes > MAX_EARLY_BYTES:
            raise Finding(f"{conn._early_bytes} bytes held before HELLO")
        if isinstance(event, ConnectionTerminated) and not any(isinstance(e, TunnelTerminated) for e in events):
            raise Finding("CONNECTION_CLOSE without a TunnelTerminated event")
        self._react(events)
        conn.datagrams_to_send(0.0)

    def _react(self, events: list[ev.Event]) -> None:
        conn = self.conn
        try:
            for e in events:
                flow = conn.flows.get(getattr(e, "flow_id", 0))
                if isinstance(e, ev.FlowRequested):
                    if flow is None:  # reset later in the same read
                        continue
                    if flow.local or flow.state == OPEN:
                        raise Finding(f"FlowRequested for flow {e.flow_id} that is not a pending remote flow")
                    if e.flow_id % 3 == 0:
                        conn.reject_flow(e.flow_id, "dial_refused", "refused")
                    else:
                        conn.accept_flow(e.flow_id)
                        self._send(e.flow_id)
                elif isinstance(e, ev.DataReceived) and flow is not None:
                    conn.acknowledge(e.flow_id, len(e.data))
                elif isinstance(e, (ev.FlowAccepted, ev.CreditAvailable)) and flow is not None:
                    self._send(e.flow_id)
                elif isinstance(e, ev.FlowEnded) and flow is not None and not flow.sent_fin:
                    conn.send_fin(e.flow_id)
                elif isinstance(e, ev.DatagramReceived) and flow is not None:
                    conn.send_datagram(e.flow_id, bytes(e.data)[:512])
        except FlowError as exc:
            raise Finding(f"local API refused an action on a flow reported open: {exc.code}: {exc}") from exc

    def _send(self, flow_id: int) -> None:
        flow = self.conn.flows.get(flow_id)
        if flow is not None and flow.state == OPEN and not flow.sent_fin and not flow.udp:
            self.conn.send_data(flow_id, b"x" * 3000)


def one_input(data: bytes) -> None:
    r = Reader(data)
    flags = r.byte()
    run = _Run(dialer=bool(flags & 1), hello=bool(flags & 2), flows=bool(flags & 4))
    steps = 0
    while r.left() and steps < 64:
        steps += 1
        op = r.byte()
        kind = op & 7
        if kind <= 3:  # stream data (the most common)
            pick = r.byte()
            sid = _STREAMS[pick] if pick < len(_STREAMS) else (pick << 8 | r.byte())
            size = r.u16() % 2048
            run.push(StreamDataReceived(stream_id=sid, data=r.take(size), end_stream=bool(op & 8)))
        elif kind == 4:
            run.push(DatagramFrameReceived(data=r.take(r.u16() % 2048)))
        elif kind == 5:
            pick = r.byte()
            sid = _STREAMS[pick % len(_STREAMS)]
            run.push((StreamReset if op & 8 else StopSendingReceived)(stream_id=sid, error_code=0))
        elif kind == 6:
            phrase = r.take(r.byte()).decode("utf-8", "replace")
            run.push(ConnectionTerminated(error_code=r.u16(), frame_type=None, reason_phrase=phrase))
            return
        else:
            run.push(ConnectionIdIssued(connection_id=r.take(8)) if op & 8 else
                     ConnectionIdRetired(connection_id=r.take(8)))
