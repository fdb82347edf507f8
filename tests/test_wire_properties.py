"""Property-based tests (hypothesis) of the sans-I/O tunnel connection.

(a) Framing is independent of how the byte stream is cut: a random but valid exchange
    between two honest connections is recorded (each side's received bytes plus the local
    calls it made at each stream offset) and replayed into fresh connections with the
    stream split at arbitrary points; the event lists must be identical.
(b) Arbitrary input never raises anything but ProtocolError and never makes the
    connection buffer more than one frame.
(c) Control bodies that are valid msgpack of the wrong shape give ProtocolError("bad_frame").
"""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.wire import events as ev
from dataplane.wire.connection import OPEN, OPENING, ProtocolError, TunnelConnection, WireConfig
from dataplane.wire.frames import (
    DECODERS,
    HEADER_SIZE,
    MAX_CONTROL_BODY,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenFail,
    OpenOk,
    Rst,
    encode_control,
    encode_header,
    encode_ping,
    encode_preamble,
    encode_window,
)

pytestmark = pytest.mark.timeout(60)

DIALER_CFG = WireConfig(role="client", node="cl", max_frame=1024, window=4096, max_flows=8, max_pending_opens=4)
ACCEPTOR_CFG = WireConfig(role="edge", node="ed", max_frame=2048, window=6000, max_flows=6, max_pending_opens=3)


def norm(events: list[ev.Event]) -> list[tuple]:
    """Comparable form of events: DATA/DATAGRAM payloads as bytes."""
    return [
        (type(e).__name__, *(bytes(getattr(e, n)) if n == "data" else getattr(e, n) for n in e.__slots__))
        for e in events
    ]


def merged(events: list[tuple]) -> list[tuple]:
    """DATA is a byte stream: a payload split over reads may arrive as several DataReceived
    events, so adjacent DataReceived tuples of one flow are compared joined."""
    out: list[tuple] = []
    for e in events:
        if e[0] == "DataReceived" and out and out[-1][0] == "DataReceived" and out[-1][1] == e[1]:
            out[-1] = ("DataReceived", e[1], out[-1][2] + e[2])
        else:
            out.append(e)
    return out


def buffer_bound(conn: TunnelConnection) -> int:
    # One incomplete unit at most. Control bodies may be up to MAX_CONTROL_BODY even when
    # max_frame is smaller, so the bound is max_frame + header only when
    # max_frame >= MAX_CONTROL_BODY.
    return HEADER_SIZE + max(conn.config.max_frame, MAX_CONTROL_BODY)


def check_invariants(conn: TunnelConnection) -> None:
    assert len(conn._buf) <= buffer_bound(conn)
    if conn.config.max_frame >= MAX_CONTROL_BODY:
        assert len(conn._buf) <= conn.config.max_frame + HEADER_SIZE
    remote_opening = sum(1 for f in conn.flows.values() if not f.local and f.state == OPENING)
    assert conn.pending_opens == remote_opening
    assert 0 <= conn.pending_opens <= conn.config.max_pending_opens
    # peer OPENs are refused at our max_flows, our own opens stop at the peer's max_flows
    assert len(conn.flows) <= max(conn.config.max_flows, conn.peer.max_flows if conn.peer else 0)


# --------------------------------------------------------------------------- (a) split invariance


class Side:
    """One connection of the simulation plus what is needed to replay its input."""

    def __init__(self, config: WireConfig, dialer: bool) -> None:
        self.config = config
        self.dialer = dialer
        self.conn = TunnelConnection(config, dialer=dialer)
        self.received = bytearray()
        self.actions: list[tuple[int, str, tuple]] = []  # (stream offset, method, args)
        self.events: list[tuple] = []
        self.unacked: dict[int, int] = {}

    def act(self, name: str, *args: object) -> object:
        result = getattr(self.conn, name)(*args)
        self.actions.append((len(self.received), name, args))
        return result

    def feed(self, data: bytes) -> None:
        self.received += data
        got = self.conn.receive_data(data)
        check_invariants(self.conn)
        for e in got:
            if isinstance(e, ev.DataReceived):
                self.unacked[e.flow_id] = self.unacked.get(e.flow_id, 0) + len(e.data)
        self.events += norm(got)


def pump(src: Side, dst: Side) -> bool:
    data = src.conn.data_to_send()
    if data:
        dst.feed(data)
    return bool(data)


OPS = ["flow", "flow", "open", "open", "accept", "accept", "accept", "reject", "data", "data", "data", "data", "data", "ack", "ack", "ack",
       "fin", "reset", "ping", "datagram", "goaway"]
# (operation, on the dialer?, selector, size, pump afterwards: bit 0 dialer->acceptor, bit 1 back)
op_lists = st.lists(
    st.tuples(st.sampled_from(OPS), st.booleans(), st.integers(0, 1 << 20), st.one_of(st.integers(0, 64), st.integers(900, 6000)),
              st.integers(0, 3)),
    min_size=6,
    max_size=40,
)


def can_open(conn: TunnelConnection) -> bool:
    peer = conn.peer
    return (peer is not None and not conn.goaway_sent and not conn.goaway_received
            and len(conn.flows) < peer.max_flows)


def _protocol(k: int) -> str:
    """Every third flow the simulation opens is a UDP flow (datagrams only)."""
    return "udp" if k % 3 == 0 else "tcp"


def apply(op: str, me: Side, other: Side, k: int, n: int) -> bool:
    """Perform ``op`` on ``me`` if it makes sense there; returns whether it did."""
    conn = me.conn
    flows = conn.flows
    pending = [fid for fid, f in flows.items() if not f.local and f.state == OPENING]
    sendable = [fid for fid, f in flows.items() if f.state == OPEN and not f.sent_fin and not f.udp]
    udp = [fid for fid, f in flows.items() if f.state == OPEN and f.udp]
    owed = [fid for fid, size in me.unacked.items() if size and fid in flows]
    if op == "flow" and can_open(conn):  # a complete open: OPEN, deliver, OPEN_OK, deliver
        fid = me.act("open_flow", Open(host=f"h{k}", port=k % 65536, protocol=_protocol(k)))
        pump(me, other)
        if fid in other.conn.flows:
            other.act("accept_flow", fid, "")
            pump(other, me)
    elif op == "open" and can_open(conn):
        me.act("open_flow", Open(host=f"h{k}", port=k % 65536, app="a" * (n % 7), protocol=_protocol(k)))
    elif op == "accept" and pending:
        me.act("accept_flow", pending[k % len(pending)], f"b{n}")
    elif op == "reject" and pending:
        me.act("reject_flow", pending[k % len(pending)], "refused", f"r{n}")
    elif op == "data" and sendable:
        fid = sendable[k % len(sendable)]
        payload = (k.to_bytes(3, "big") * (n // 3 + 1))[:n]
        credit = conn.credit(fid)
        assert me.act("send_data", fid, payload) == min(n, credit)
        assert conn.credit(fid) == credit - min(n, credit)
    elif op == "ack" and owed:
        fid = owed[k % len(owed)]
        size = 1 + n % me.unacked[fid]
        me.unacked[fid] -= size
        me.act("acknowledge", fid, size)
    elif op == "fin" and sendable:
        me.act("send_fin", sendable[k % len(sendable)])
    elif op == "reset" and flows:
        ids = sorted(flows)
        me.act("reset_flow", ids[k % len(ids)], "cancel", f"x{n}")
    elif op == "ping":
        me.act("ping", float(k) / 8)
    elif op == "datagram" and udp:
        me.act("send_datagram", udp[k % len(udp)], bytes([k % 256]) * (n % 900))
    elif op == "goaway" and k % 7 == 0:
        me.act("goaway", "drain", f"g{n}")
    else:
        return False
    return True


def simulate(ops: list[tuple[str, bool, int, int, int]]) -> tuple[Side, Side]:
    d = Side(DIALER_CFG, True)
    a = Side(ACCEPTOR_CFG, False)
    d.act("initiate")
    a.act("initiate")
    pump(d, a)
    pump(a, d)
    for op, dialer_side, k, n, pumps in ops:
        me, other = (d, a) if dialer_side else (a, d)
        if not apply(op, me, other, k, n) and op != "goaway":
            apply(op, other, me, k, n)
        if pumps & 1:
            pump(d, a)
        if pumps & 2:
            pump(a, d)
    for _ in range(10):
        if not (pump(d, a) | pump(a, d)):
            break
    # honest peers never trip a protocol error (check_invariants ran after every chunk)
    assert d.conn.dead is None and a.conn.dead is None
    return d, a


def replay(side: Side, cuts: set[int]) -> list[tuple]:
    conn = TunnelConnection(side.config, dialer=side.dialer)
    stream = bytes(side.received)
    points = sorted({c for c in cuts if 0 <= c <= len(stream)} | {o for o, _, _ in side.actions} | {len(stream)})
    events: list[tuple] = []
    actions = iter(side.actions)
    nxt = next(actions, None)
    pos = 0
    for point in points:
        while nxt is not None and nxt[0] <= pos:
            getattr(conn, nxt[1])(*nxt[2])
            nxt = next(actions, None)
        if point > pos:
            events += norm(conn.receive_data(stream[pos:point]))
            check_invariants(conn)
            pos = point
    while nxt is not None:
        getattr(conn, nxt[1])(*nxt[2])
        nxt = next(actions, None)
    assert len(conn._buf) == 0
    return events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=op_lists, data=st.data())
def test_events_independent_of_stream_splitting(ops: list[tuple[str, bool, int, int, int]], data: st.DataObject) -> None:
    d, a = simulate(ops)
    for side in (d, a):
        size = len(side.received)
        one_shot = replay(side, set())
        assert merged(one_shot) == merged(side.events)
        cuts = data.draw(st.sets(st.integers(0, size), max_size=60), label="cuts")
        assert merged(replay(side, cuts)) == merged(one_shot)
        # and a dense region cut byte by byte somewhere in the stream
        start = data.draw(st.integers(0, size), label="dense start")
        assert merged(replay(side, set(range(start, min(size, start + 300))))) == merged(one_shot)


def test_simulation_exercises_the_protocol() -> None:
    """Guard against the property test silently exercising nothing."""
    ops = [("open", True, 1, 0, 1), ("accept", False, 0, 0, 2), ("data", True, 7, 5000, 1), ("ack", False, 0, 4000, 2),
           ("data", True, 7, 5000, 0), ("ping", False, 2, 0, 0), ("fin", True, 0, 0, 0), ("open", False, 3, 0, 2),
           ("accept", True, 0, 0, 2), ("datagram", False, 1, 50, 1), ("reset", True, 1, 0, 0)]
    d, a = simulate(ops)
    kinds = {e[0] for e in a.events} | {e[0] for e in d.events}
    assert kinds >= {"HelloReceived", "FlowRequested", "FlowAccepted", "DataReceived", "CreditAvailable",
                     "FlowEnded", "PongReceived", "DatagramReceived", "FlowReset"}
    data_frames = [e for e in a.events if e[0] == "DataReceived"]
    # 5000 of the 6000 bytes of credit, in frames of at most the acceptor's max_frame (2048);
    # 4001 acknowledged (past 6000 // 4) give 1000 + 4001 of credit for the next 5000
    assert [len(e[2]) for e in data_frames] == [2048, 2048, 904, 2048, 2048, 904]
    assert ("CreditAvailable", 1, 1000 + 4001) in d.events
    assert merged(replay(a, set(range(len(a.received))))) == merged(a.events)


# --------------------------------------------------------------------------- (b) garbage input

VALID_HELLO = Hello(role="connector", node="peer", max_frame=4096, window=8192, max_flows=16)
u32 = st.integers(0, 0xFFFFFFFF)
small_id = st.sampled_from([0, 1, 1, 1, 1, 2, 3, 5, 5, 5, 7, 9])


def _frame(ftype: int, flags: int, fid: int, payload: bytes) -> bytes:
    return struct.pack("!BBII", ftype, flags, fid, len(payload)) + payload


frame_pieces = st.one_of(
    st.binary(max_size=48),
    # arbitrary headers: any type, any length (often too large, or a short truncated body)
    st.builds(lambda t, fl, fid, n: struct.pack("!BBII", t, fl, fid, n), st.integers(0, 255), st.integers(0, 255),
              st.one_of(small_id, u32), st.one_of(st.integers(0, 64), u32)),
    # well-formed frames of every type with random contents
    st.builds(_frame, st.integers(1, 13), st.integers(0, 255), st.one_of(small_id, u32), st.binary(max_size=40)),
    st.builds(lambda fid, host, port: encode_control(fid, Open(host=host, port=port)), small_id,
              st.text(max_size=8), st.integers(0, 65535)),
    st.builds(lambda fid, b: encode_control(fid, OpenOk(bound=b)), small_id, st.text(max_size=4)),
    st.builds(lambda fid, c: encode_control(fid, OpenFail(code=c)), small_id, st.text(max_size=4)),
    st.builds(lambda fid, c: encode_control(fid, Rst(code=c)), small_id, st.text(max_size=4)),
    st.builds(lambda c: encode_control(0, GoAway(code=c)), st.text(max_size=4)),
    st.builds(lambda fid, p: encode_header(FrameType.DATA, fid, len(p)) + p, small_id, st.binary(max_size=300)),
    st.builds(lambda fid, p: encode_header(FrameType.DATAGRAM, fid, len(p)) + p, small_id, st.binary(max_size=50)),
    st.builds(lambda fid, n: encode_header(FrameType.DATA, fid, n), small_id, st.integers(0, 70000)),
    st.builds(encode_window, small_id, u32),
    # frames that are valid for the flows the garbage test opens (1 and 5)
    st.builds(lambda fid, p: encode_header(FrameType.DATA, fid, len(p)) + p, st.sampled_from([1, 5]),
              st.binary(max_size=2000)),
    st.builds(encode_window, st.sampled_from([1, 5]), st.integers(1, 1 << 16)),
    st.builds(lambda fid: encode_header(FrameType.FIN, fid, 0), small_id),
    st.builds(lambda v: encode_ping(FrameType.PING, v), st.floats(allow_nan=False)),
    st.builds(lambda v: encode_ping(FrameType.PONG, v), st.floats(allow_nan=False)),
    st.just(encode_control(0, VALID_HELLO)),
    st.just(encode_preamble()),
)


def feed_garbage(conn: TunnelConnection, stream: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        if cut < pos:
            continue
        chunk = stream[pos:cut]
        pos = cut
        try:
            got = conn.receive_data(chunk)
        except ProtocolError as exc:
            assert isinstance(exc.code, str) and exc.code
            assert conn.dead is exc
            assert len(conn._buf) == 0
            # a GOAWAY naming the reason is queued last
            assert last_goaway(conn.data_to_send()) == GoAway(code=exc.code, reason=exc.message[:1024])
            with pytest.raises(ProtocolError) as again:
                conn.receive_data(b"more")
            assert again.value is exc
            return
        assert isinstance(got, list)
        check_invariants(conn)
        # act like a node: answer requests so the state machine goes deeper. Events describe
        # the whole chunk: a FlowRequested may already be stale (RST in the same chunk).
        for e in got:
            flow = conn.flows.get(getattr(e, "flow_id", -1))
            if isinstance(e, ev.FlowRequested) and e.flow_id % 4 == 1 and flow is not None and flow.state == OPENING:
                conn.accept_flow(e.flow_id)
            if isinstance(e, ev.DataReceived):
                conn.acknowledge(e.flow_id, len(e.data))
        check_invariants(conn)


def last_goaway(out: bytes) -> GoAway:
    """Decode the GOAWAY that must be the last frame of ``out``."""
    for start in range(len(out) - HEADER_SIZE, -1, -1):
        t, flags, fid, n = struct.unpack_from("!BBII", out, start)
        if t == FrameType.GOAWAY and flags == 0 and fid == 0 and start + HEADER_SIZE + n == len(out):
            return DECODERS[FrameType.GOAWAY].decode(out[start + HEADER_SIZE:])
    raise AssertionError(f"no trailing GOAWAY in {out[-64:]!r}")


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(frame_pieces, max_size=25),
    opens=st.integers(0, 4),
    max_frame=st.sampled_from([1024, 4096, 16384, 65536]),
    data=st.data(),
)
def test_garbage_after_handshake_only_raises_protocol_error(
    pieces: list[bytes], opens: int, max_frame: int, data: st.DataObject
) -> None:
    conn = TunnelConnection(WireConfig(role="edge", node="me", max_frame=max_frame, max_flows=4,
                                       max_pending_opens=2), dialer=False)
    conn.initiate()
    conn.data_to_send()
    assert norm(conn.receive_data(encode_preamble() + encode_control(0, VALID_HELLO))) == [
        ("HelloReceived", VALID_HELLO)
    ]
    # flows 1 and 5 get accepted, 3 and 7 stay pending (max_pending_opens=2, max_flows=4: both full)
    for fid in (1, 3, 5, 7)[:opens]:
        assert conn.receive_data(encode_control(fid, Open(host="h", port=fid))) == [
            ev.FlowRequested(fid, Open(host="h", port=fid))
        ]
        if fid % 4 == 1:
            conn.accept_flow(fid)
    stream = b"".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    feed_garbage(conn, stream, cuts)


@settings(max_examples=500, deadline=None)
@given(
    stream=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda p, rest: p + rest, st.just(encode_preamble()), st.binary(max_size=200)),
        st.builds(lambda p, pieces: p + b"".join(pieces), st.just(encode_preamble()), st.lists(frame_pieces, max_size=10)),
    ),
    cuts=st.lists(st.integers(0, 260), max_size=10),
    initiated=st.booleans(),
)
def test_fully_random_bytes_only_raise_protocol_error(stream: bytes, cuts: list[int], initiated: bool) -> None:
    conn = TunnelConnection(WireConfig(role="connector", node="me", max_frame=16384), dialer=True)
    if initiated:
        conn.initiate()
        conn.data_to_send()
    feed_garbage(conn, stream, [c for c in cuts if c <= len(stream)])


def test_data_payload_streams_without_buffering() -> None:
    """A DATA frame cut short is delivered as it arrives; only headers are ever buffered."""
    conn = TunnelConnection(WireConfig(role="edge", node="me", max_frame=16384), dialer=False)
    conn.receive_data(encode_preamble() + encode_control(0, VALID_HELLO) + encode_control(1, Open(host="h", port=1)))
    conn.accept_flow(1)
    header = encode_header(FrameType.DATA, 1, 16384)
    assert norm(conn.receive_data(header[:4])) == []
    assert len(conn._buf) == 4
    assert norm(conn.receive_data(header[4:] + b"x" * 16383)) == [("DataReceived", 1, b"x" * 16383)]
    assert len(conn._buf) == 0
    assert norm(conn.receive_data(b"y" + encode_header(FrameType.FIN, 1, 0))) == [
        ("DataReceived", 1, b"y"), ("FlowEnded", 1)]
    assert len(conn._buf) == 0


# --------------------------------------------------------------------------- (c) wrong-shape bodies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), st.text(max_size=10),
    st.binary(max_size=10),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=25,
)
# Every control body is an array whose first field is a str: anything else is the wrong shape.
not_an_array = values.filter(lambda v: not isinstance(v, list))
bad_first_field = st.builds(lambda first, rest: [first, *rest], values.filter(lambda v: not isinstance(v, str)),
                            st.lists(values, max_size=8))
# Arrays of plausible types but missing required fields.
too_short = {
    FrameType.HELLO: st.tuples(st.lists(st.text(max_size=5), max_size=2), st.lists(st.integers(1, 1000), max_size=2))
    .map(lambda t: t[0] + t[1] if len(t[0]) == 2 else t[0]),
    FrameType.OPEN: st.lists(st.text(max_size=5), max_size=1),
    FrameType.OPEN_FAIL: st.just([]),
    FrameType.RST: st.just([]),
    FrameType.GOAWAY: st.just([]),
}
CONTROL_TYPES = [FrameType.HELLO, FrameType.OPEN, FrameType.OPEN_OK, FrameType.OPEN_FAIL, FrameType.RST,
                 FrameType.GOAWAY]


@st.composite
def wrong_bodies(draw: st.DrawFn) -> tuple[int, bytes]:
    ftype = draw(st.sampled_from(CONTROL_TYPES))
    choices = [not_an_array, bad_first_field]
    if ftype in too_short:
        choices.append(too_short[ftype])
    value = draw(st.one_of(*choices))
    body = msgspec.msgpack.encode(value)
    if draw(st.integers(0, 9)) == 0:
        body += draw(st.binary(min_size=1, max_size=4))  # valid msgpack followed by trailing bytes
    return ftype, body


@settings(max_examples=400, deadline=None)
@given(case=wrong_bodies())
def test_wrong_shape_bodies_are_bad_frame(case: tuple[int, bytes]) -> None:
    ftype, body = case
    if len(body) > MAX_CONTROL_BODY:
        body = msgspec.msgpack.encode(None)
    conn = TunnelConnection(WireConfig(role="edge", node="me"), dialer=False)
    conn.initiate()
    conn.data_to_send()
    prefix = encode_preamble()
    if ftype != FrameType.HELLO:
        prefix += encode_control(0, VALID_HELLO)
        if ftype in (FrameType.OPEN_OK, FrameType.OPEN_FAIL):
            conn.receive_data(prefix)
            prefix = b""
            conn.open_flow(Open(host="h", port=1))  # flow 2 awaits an answer
            conn.data_to_send()
    fid = {FrameType.HELLO: 0, FrameType.GOAWAY: 0, FrameType.OPEN: 1}.get(ftype, 2)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(prefix + encode_header(ftype, fid, len(body)) + body)
    assert info.value.code == "bad_frame", (info.value.code, info.value.message)
    assert info.value.message.startswith("undecodable control frame: ")
    assert conn.dead is info.value
    assert last_goaway(conn.data_to_send()).code == "bad_frame"
