"""Target ``tunnel``: a tunnel's byte stream into ``TunnelConnection.receive_data``.

The input is the peer's bytes (optionally after a valid preamble and HELLO, and with flows this
side opened, so the fuzzer reaches every frame's handling) and a way to split them into reads.
Contract:

- ``receive_data`` raises nothing but ``ProtocolError`` (undecodable bodies included), and a dead
  connection keeps raising that same error;
- what is buffered between reads is bounded (an incomplete header or control body at most);
- stream reassembly: the same bytes give the same events whether they come in one read or split
  anywhere (DATA payloads compared per flow, concatenated), and the same error code if refused;
- a node answering events as a real one does (accept or refuse OPENs, consume and acknowledge
  data, send data on credit, FIN after FIN) never gets a ``FlowError`` for a flow the connection
  reported as open.
"""

from __future__ import annotations

from dataplane.wire import events as ev
from dataplane.wire.connection import OPEN, FlowError, ProtocolError, TunnelConnection, WireConfig
from dataplane.wire.frames import (
    HEADER_SIZE,
    MAX_CONTROL_BODY,
    Hello,
    Open,
    encode_control,
    encode_preamble,
)

from . import Finding, Reader

MAX_BUFFERED = HEADER_SIZE + MAX_CONTROL_BODY


def _config(role: str) -> WireConfig:
    return WireConfig(role=role, node=f"fuzz-{role}", max_frame=4096, window=65536, max_flows=64,
                      max_pending_opens=16)


def _peer_hello(role: str) -> bytes:
    return encode_preamble() + encode_control(0, Hello(role=role, node="peer", max_frame=4096, window=65536,
                                                       max_flows=64))


def _normalize(events: list[ev.Event]) -> list[tuple]:
    out: list[tuple] = []
    for e in events:
        if isinstance(e, ev.DataReceived):
            if out and out[-1][0] == "data" and out[-1][1] == e.flow_id:
                out[-1] = ("data", e.flow_id, out[-1][2] + bytes(e.data))
            else:
                out.append(("data", e.flow_id, bytes(e.data)))
        elif isinstance(e, ev.DatagramReceived):
            out.append(("datagram", e.flow_id, bytes(e.data)))
        elif isinstance(e, ev.PongReceived):
            out.append(("pong", repr(e.sent_at)))  # the peer's 8 bytes: NaN is a value here
        else:
            out.append((type(e).__name__,) + tuple(getattr(e, name) for name in e.__slots__))
    return out


class _Run:
    """One connection fed with the fuzzed stream; ``react``: answer events as a node does."""

    def __init__(self, dialer: bool, hello: bool, flows: bool, react: bool) -> None:
        role, peer_role = ("client", "edge") if dialer else ("edge", "client")
        self.conn = TunnelConnection(_config(role), dialer=dialer)
        self.conn.initiate()
        self.react = react
        self.events: list[ev.Event] = []
        self.error: ProtocolError | None = None
        if hello:
            self.feed(_peer_hello(peer_role))
            if flows and self.error is None:
                self.conn.open_flow(Open(host="app.example", port=443))
                self.conn.open_flow(Open(host="dns.example", port=53, protocol="udp"))

    def feed(self, chunk: bytes) -> None:
        conn = self.conn
        if self.error is not None:
            try:
                conn.receive_data(chunk)
            except ProtocolError as exc:
                if exc is not self.error:
                    raise Finding(f"a dead connection raised {exc.code!r} after {self.error.code!r}") from exc
                return
            raise Finding("a dead connection accepted more input")
        try:
            events = conn.receive_data(chunk)
        except ProtocolError as exc:
            self.error = exc
            if conn.dead is not exc:
                raise Finding("ProtocolError raised but the connection is not dead") from exc
            return
        if len(conn._buf) > MAX_BUFFERED:
            raise Finding(f"{len(conn._buf)} bytes buffered between reads (at most {MAX_BUFFERED})")
        self.events.extend(events)
        if self.react:
            self._react(events)
        conn.data_to_send()

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
                        conn.accept_flow(e.flow_id, "10.0.0.1:1000", "10.0.0.2:80")
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
    dialer, hello, flows = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    splits = r.take(r.byte() % 32)
    stream = r.rest()

    whole = _Run(dialer, hello, flows, react=False)
    whole.feed(stream)
    split = _Run(dialer, hello, flows, react=False)
    for chunk in Reader(splits).chunks(stream):
        split.feed(chunk)
    if (whole.error is None) != (split.error is None):
        raise Finding(f"one read: {whole.error and whole.error.code}; split reads: {split.error and split.error.code}")
    if whole.error is not None:
        if whole.error.code != split.error.code:  # type: ignore[union-attr]
            raise Finding(f"one read refused with {whole.error.code!r}, split reads with {split.error.code!r}")
    elif _normalize(whole.events) != _normalize(split.events):
        raise Finding(f"events differ: one read {_normalize(whole.events)!r}, split {_normalize(split.events)!r}")

    node = _Run(dialer, hello, flows, react=True)
    for chunk in Reader(splits).chunks(stream):
        node.feed(chunk)
