"""State-machine tests of TunnelConnection: two real connections driven against each other.

``pump(src, dst)`` moves whatever ``src`` queued into ``dst.receive_data`` and returns
the events ``dst`` produced. Misbehaving peers are simulated by feeding hand-built frames
(``encode_*`` from frames.py, or raw struct-packed bytes) straight into ``receive_data``.
"""

from __future__ import annotations

import struct

import msgspec
import pytest

from dataplane.wire import events as ev
from dataplane.wire.connection import FlowError, ProtocolError, TunnelConnection, WireConfig
from dataplane.wire.frames import (
    DECODERS,
    Auth,
    MAX_WINDOW,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenOk,
    Rst,
    encode_control,
    encode_header,
    encode_ping,
    encode_preamble,
    encode_window,
)

pytestmark = pytest.mark.timeout(60)

REQ = Open(host="db.corp", port=5432, app="pg")


def cfg(role: str = "edge", node: str = "n", **kw) -> WireConfig:
    return WireConfig(role=role, node=node, **kw)


def pump(src: TunnelConnection, dst: TunnelConnection) -> list[ev.Event]:
    data = src.data_to_send()
    return dst.receive_data(data) if data else []


def pair(dialer: WireConfig | None = None, acceptor: WireConfig | None = None) -> tuple[TunnelConnection, TunnelConnection]:
    """A dialer (client) and an acceptor (edge) that completed the HELLO exchange."""
    d = TunnelConnection(dialer or cfg("client", "cl-1"), dialer=True)
    a = TunnelConnection(acceptor or cfg("edge", "edge-1"), dialer=False)
    d.initiate()
    a.initiate()
    assert [type(e) for e in pump(d, a)] == [ev.HelloReceived]
    assert [type(e) for e in pump(a, d)] == [ev.HelloReceived]
    return d, a


def open_flow(src: TunnelConnection, dst: TunnelConnection, request: Open = REQ) -> int:
    fid = src.open_flow(request)
    assert pump(src, dst) == [ev.FlowRequested(fid, request)]
    dst.accept_flow(fid)
    assert pump(dst, src) == [ev.FlowAccepted(fid, "")]
    return fid


def frames(raw: bytes, preamble: bool = False) -> list[tuple[int, int, int, bytes]]:
    """Independent parser for what a connection sent: (type, flags, flow, payload)."""
    pos = 0
    if preamble:
        assert raw[:10] == b"\x00FRYMN\r\n\x00\x01"
        pos = 10
    out = []
    while pos < len(raw):
        t, flags, fid, n = struct.unpack_from("!BBII", raw, pos)
        out.append((t, flags, fid, raw[pos + 10:pos + 10 + n]))
        pos += 10 + n
    assert pos == len(raw)
    return out


def data_events(events: list[ev.Event]) -> list[tuple[int, bytes]]:
    return [(e.flow_id, bytes(e.data)) for e in events if isinstance(e, ev.DataReceived)]


def expect_protocol_error(conn: TunnelConnection, data: bytes, code: str, message: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.code == code, info.value.message
    if message is not None:
        assert info.value.message == message
        assert str(info.value) == message
    assert conn.dead is info.value
    return info.value


def sent_goaway(conn: TunnelConnection) -> GoAway:
    """The connection's last queued frame must be a GOAWAY; decode and return it."""
    got = frames(conn.data_to_send())
    t, flags, fid, body = got[-1]
    assert (t, flags, fid) == (FrameType.GOAWAY, 0, 0)
    return DECODERS[FrameType.GOAWAY].decode(body)


# --------------------------------------------------------------------------- handshake


def test_handshake() -> None:
    dc = cfg("client", "cl-1", group="g1", max_frame=4096, window=8192, max_flows=7, features=["dgram"], software="t/1")
    ac = cfg("edge", "edge-1", max_frame=2048, window=16384, max_flows=9)
    d = TunnelConnection(dc, dialer=True)
    a = TunnelConnection(ac, dialer=False)
    assert d.data_to_send() == b"" and not d.has_output
    with pytest.raises(FlowError) as info:
        d.open_flow(REQ)
    assert info.value.code == "not_ready"
    d.initiate()
    assert d.has_output
    assert pump(d, a) == [
        ev.HelloReceived(Hello(role="client", node="cl-1", max_frame=4096, window=8192, max_flows=7,
                               group="g1", features=["dgram"], software="t/1"))
    ]
    assert a.peer is not None and a.peer.node == "cl-1"
    assert d.peer is None
    a.initiate()
    assert pump(a, d) == [
        ev.HelloReceived(Hello(role="edge", node="edge-1", max_frame=2048, window=16384, max_flows=9))
    ]
    assert d.peer == Hello(role="edge", node="edge-1", max_frame=2048, window=16384, max_flows=9)
    assert not d.has_output and not a.has_output
    assert d.dead is None and a.dead is None


def test_handshake_byte_by_byte() -> None:
    d = TunnelConnection(cfg("client", "c"), dialer=True)
    a = TunnelConnection(cfg("edge", "e"), dialer=False)
    d.initiate()
    raw = d.data_to_send()
    got: list[ev.Event] = []
    for i in range(len(raw)):
        got += a.receive_data(raw[i:i + 1])
    assert [type(e) for e in got] == [ev.HelloReceived]
    assert got[0].hello.node == "c"
    assert len(a._buf) == 0


def test_second_hello_and_bad_hello() -> None:
    d, a = pair()
    hello = Hello(role="client", node="x", max_frame=1024, window=1, max_flows=1)
    expect_protocol_error(a, encode_control(0, hello), "bad_hello", "second HELLO on the same tunnel")

    a = TunnelConnection(cfg(), dialer=False)
    bad_role = Hello(role="admin", node="x", max_frame=1024, window=1, max_flows=1)
    expect_protocol_error(a, encode_preamble() + encode_control(0, bad_role), "bad_hello", "unknown role 'admin' in HELLO")

    a = TunnelConnection(cfg(), dialer=False)
    small = Hello(role="client", node="x", max_frame=1023, window=1, max_flows=1)
    expect_protocol_error(a, encode_preamble() + encode_control(0, small), "bad_hello", "peer max_frame 1023 is below 1024")


# --------------------------------------------------------------------------- open / accept / reject


def test_flow_open_accept() -> None:
    d, a = pair()
    fid = d.open_flow(REQ)
    assert fid == 1
    assert frames(d.data_to_send()) == [(FrameType.OPEN, 0, 1, msgspec.msgpack.encode(REQ))]
    # the same OPEN again, via pump this time
    d2, a2 = pair()
    assert d2.open_flow(REQ) == 1
    assert pump(d2, a2) == [ev.FlowRequested(1, REQ)]
    assert a2.pending_opens == 1
    a2.accept_flow(1, bound="10.0.0.5:5432")
    assert a2.pending_opens == 0
    assert pump(a2, d2) == [ev.FlowAccepted(1, "10.0.0.5:5432")]
    assert set(d2.flows) == {1} and set(a2.flows) == {1}
    assert d2.flows[1].local and not a2.flows[1].local
    with pytest.raises(FlowError) as info:
        a2.accept_flow(1)
    assert info.value.code == "flow_state"
    with pytest.raises(FlowError) as info:
        d2.accept_flow(1)  # our own flow: nothing to answer
    assert info.value.code == "flow_state"
    with pytest.raises(FlowError) as info:
        a2.accept_flow(3)
    assert (info.value.code, info.value.message) == ("flow_state", "flow 3 is not awaiting an answer")


def test_flow_reject() -> None:
    d, a = pair()
    fid = d.open_flow(REQ)
    pump(d, a)
    a.reject_flow(fid, "denied", "policy says no" + "!" * 2000)
    assert a.flows == {} and a.pending_opens == 0
    got = pump(a, d)
    assert got == [ev.FlowRejected(fid, "denied", ("policy says no" + "!" * 2000)[:1024])]
    assert len(got[0].reason) == 1024
    assert d.flows == {}
    # The flow is gone: calls naming it say so and queue nothing.
    assert d.send_data(fid, b"x") == 0
    assert d.send_fin(fid) is False
    assert a.reject_flow(fid, "denied", "again") is False
    assert not a.has_output and not d.has_output
    with pytest.raises(FlowError) as info:  # an id that never named a flow is the node's bug
        d.send_data(fid + 2, b"x")
    assert info.value.code == "no_flow"


def test_acceptor_opens_flows_too() -> None:
    d, a = pair()
    assert open_flow(a, d) == 2
    assert open_flow(d, a) == 1
    assert open_flow(a, d) == 4
    assert open_flow(d, a) == 3
    assert sorted(d.flows) == sorted(a.flows) == [1, 2, 3, 4]


def test_send_before_accept_is_refused() -> None:
    d, a = pair()
    fid = d.open_flow(REQ)
    with pytest.raises(FlowError) as info:
        d.send_data(fid, b"early")
    assert info.value.code == "flow_state"
    with pytest.raises(FlowError) as info:
        d.send_fin(fid)
    assert info.value.code == "flow_state"
    assert d.credit(fid) == 524288  # the peer's default window
    assert d.credit(999) == 0


# --------------------------------------------------------------------------- data and credit


def test_data_within_credit() -> None:
    d, a = pair(acceptor=cfg("edge", "e", max_frame=1024, window=4096))
    fid = open_flow(d, a)
    assert d.credit(fid) == 4096
    payload = bytes(range(256)) * 40  # 10240 bytes
    assert d.send_data(fid, payload) == 4096
    assert d.credit(fid) == 0
    assert d.send_data(fid, payload) == 0
    assert not a.has_output
    got = pump(d, a)
    assert data_events(got) == [(fid, payload[i:i + 1024]) for i in range(0, 4096, 1024)]
    assert a.flows[fid].recv_credit == 0

    # threshold = window // 4 = 1024: below it nothing is sent ...
    a.acknowledge(fid, 1000)
    assert not a.has_output
    a.acknowledge(fid, 23)
    assert not a.has_output
    # ... reaching it grants everything acknowledged so far in one WINDOW
    a.acknowledge(fid, 1)
    raw = a.data_to_send()
    assert raw == encode_window(fid, 1024)
    assert d.receive_data(raw) == [ev.CreditAvailable(fid, 1024)]
    assert d.credit(fid) == 1024
    a.acknowledge(fid, 3072)
    assert pump(a, d) == [ev.CreditAvailable(fid, 4096)]
    assert d.send_data(fid, payload[4096:]) == 4096
    assert data_events(pump(d, a)) == [(fid, payload[i:i + 1024]) for i in range(4096, 8192, 1024)]


def test_send_data_split_by_peer_max_frame() -> None:
    d, a = pair(acceptor=cfg("edge", "e", max_frame=1024, window=1 << 20))
    fid = open_flow(d, a)
    payload = bytes(i % 251 for i in range(5000))
    assert d.send_data(fid, payload) == 5000
    raw = d.data_to_send()
    got_frames = frames(raw)
    assert [(t, f, len(p)) for t, _, f, p in got_frames] == [(FrameType.DATA, fid, 1024)] * 4 + [(FrameType.DATA, fid, 904)]
    assert max(len(p) for *_, p in got_frames) <= 1024
    events = a.receive_data(raw)
    assert b"".join(data for _, data in data_events(events)) == payload
    # the acceptor's own max_frame does not limit what the acceptor sends (the dialer's does)
    assert a.send_data(fid, payload) == 5000
    assert [len(p) for *_, p in frames(a.data_to_send())] == [5000]


def test_send_data_credit_limit_with_split() -> None:
    d, a = pair(acceptor=cfg("edge", "e", max_frame=1024, window=2500))
    fid = open_flow(d, a)
    assert d.send_data(fid, memoryview(b"z" * 10000)) == 2500
    assert [len(p) for *_, p in frames(d.data_to_send())] == [1024, 1024, 452]


# --------------------------------------------------------------------------- half-close


def test_half_close_dialer_first() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    assert d.send_fin(fid) is False
    assert pump(d, a) == [ev.FlowEnded(fid)]
    with pytest.raises(FlowError) as info:
        d.send_data(fid, b"after fin")
    assert info.value.code == "flow_state"
    with pytest.raises(FlowError):
        d.send_fin(fid)
    # the other direction still works
    assert a.send_data(fid, b"response") == 8
    assert data_events(pump(a, d)) == [(fid, b"response")]
    # acknowledging after FIN grants nothing
    a.acknowledge(fid, 1 << 20)
    assert not a.has_output
    assert a.send_fin(fid) is True
    assert a.flows == {}
    assert pump(a, d) == [ev.FlowEnded(fid), ev.FlowClosed(fid)]
    assert d.flows == {}


def test_half_close_acceptor_first() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    assert a.send_fin(fid) is False
    assert pump(a, d) == [ev.FlowEnded(fid)]
    assert d.send_data(fid, b"still talking") == 13
    assert d.send_fin(fid) is True
    assert d.flows == {}
    got = pump(d, a)
    assert data_events(got) == [(fid, b"still talking")]
    assert got[1:] == [ev.FlowEnded(fid), ev.FlowClosed(fid)]
    assert a.flows == {}


def test_simultaneous_fin() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    assert d.send_fin(fid) is False
    assert a.send_fin(fid) is False
    assert pump(d, a) == [ev.FlowEnded(fid), ev.FlowClosed(fid)]
    assert pump(a, d) == [ev.FlowEnded(fid), ev.FlowClosed(fid)]
    assert d.flows == {} and a.flows == {}


def test_data_after_fin_and_second_fin_are_errors() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    d.send_fin(fid)
    pump(d, a)
    expect_protocol_error(a, encode_header(FrameType.DATA, fid, 1) + b"x", "stream_state", f"DATA on flow {fid} after FIN")
    d, a = pair()
    fid = open_flow(d, a)
    d.send_fin(fid)
    pump(d, a)
    expect_protocol_error(a, encode_header(FrameType.FIN, fid, 0), "stream_state", f"unexpected FIN on flow {fid}")


# --------------------------------------------------------------------------- reset


@pytest.mark.parametrize("by_dialer", [True, False])
def test_reset_open_flow(by_dialer: bool) -> None:
    d, a = pair()
    fid = open_flow(d, a)
    src, dst = (d, a) if by_dialer else (a, d)
    src.reset_flow(fid, "cancelled", "user closed the tab")
    assert src.flows == {}
    assert pump(src, dst) == [ev.FlowReset(fid, "cancelled", "user closed the tab")]
    assert dst.flows == {}
    # resetting a flow that is gone is a no-op
    src.reset_flow(fid, "again")
    dst.reset_flow(fid, "again")
    assert not src.has_output and not dst.has_output


def test_reset_pending_remote_open() -> None:
    d, a = pair()
    fid = d.open_flow(REQ)
    pump(d, a)
    assert a.pending_opens == 1
    a.reset_flow(fid, "gone")
    assert a.pending_opens == 0
    assert a.flows == {}
    assert pump(a, d) == [ev.FlowReset(fid, "gone", "")]
    assert d.flows == {}


def test_dialer_resets_its_pending_open() -> None:
    d, a = pair()
    fid = d.open_flow(REQ)
    pump(d, a)
    d.reset_flow(fid, "timeout", "no answer in 10s")
    assert pump(d, a) == [ev.FlowReset(fid, "timeout", "no answer in 10s")]
    assert a.pending_opens == 0 and a.flows == {}
    assert a.accept_flow(fid) is False  # cancelled: nothing to answer
    assert not a.has_output


def test_open_and_reset_in_one_chunk() -> None:
    """Events describe a whole chunk: by the time the node sees FlowRequested, the RST that
    followed in the same chunk is already applied, so answering it does nothing (False)."""
    d, a = pair()
    fid = d.open_flow(REQ)
    d.reset_flow(fid, "cancel")
    assert pump(d, a) == [ev.FlowRequested(fid, REQ), ev.FlowReset(fid, "cancel", "")]
    assert a.flows == {} and a.pending_opens == 0
    assert a.accept_flow(fid) is False
    assert a.reject_flow(fid, "no", "") is False
    assert not a.has_output and a.pending_opens == 0


def test_late_frames_after_reset_are_counted() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    d.reset_flow(fid, "cancel")
    # the acceptor has not seen the RST yet and keeps going
    a.send_data(fid, b"in flight")
    a.acknowledge(fid, 1 << 20)
    a.send_fin(fid)
    a.reset_flow(fid, "crossed")
    assert pump(a, d) == []
    assert d.late_frames == 4  # DATA, WINDOW, FIN, RST
    assert pump(d, a) == []  # the RST arrives for a flow the acceptor already reset
    assert a.late_frames == 1
    # late answers to our own reset OPEN are tolerated as well
    fid2 = d.open_flow(REQ)
    d.reset_flow(fid2, "cancel")
    d.data_to_send()
    assert d.receive_data(encode_control(fid2, OpenOk())) == []
    assert d.late_frames == 5
    assert d.dead is None and a.dead is None


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (encode_header(FrameType.DATA, 7, 1) + b"x", "DATA for flow 7, which was never opened"),
        (encode_header(FrameType.DATA, 8, 1) + b"x", "DATA for flow 8, which was never opened"),
        (encode_window(9, 100), "WINDOW for flow 9, which was never opened"),
        (encode_header(FrameType.FIN, 11, 0), "FIN for flow 11, which was never opened"),
        (encode_control(13, Rst(code="x")), "RST for flow 13, which was never opened"),
        (encode_header(FrameType.DATAGRAM, 0, 1) + b"x", "DATAGRAM for flow 0, which was never opened"),
        (encode_header(FrameType.FIN, 0, 0), "FIN for flow 0, which was never opened"),
    ],
)
def test_frames_for_never_opened_flows_are_errors(frame: bytes, message: str) -> None:
    d, a = pair()
    open_flow(d, a)  # flow 1 exists
    err = expect_protocol_error(d, frame, "unknown_flow", message)
    assert sent_goaway(d) == GoAway(code="unknown_flow", reason=err.message)


def test_late_open_ok_for_never_opened_flow_is_error() -> None:
    d, a = pair()
    ok = encode_control(5, OpenOk())
    expect_protocol_error(d, ok, "unknown_flow", "OPEN_OK for flow 5, which was never opened")


# --------------------------------------------------------------------------- limits


def test_max_flows_on_receiving_side() -> None:
    d, a = pair(acceptor=cfg("edge", "edge-1", max_flows=2))
    f1 = open_flow(d, a)
    f2 = open_flow(d, a)
    # a dialer that ignores the announced limit
    d.peer = msgspec.structs.replace(d.peer, max_flows=100)
    f3 = d.open_flow(REQ)
    assert pump(d, a) == [ev.OpenRefused(f3, "too_many_flows", "at most 2 flows per tunnel")]
    assert set(a.flows) == {f1, f2} and a.pending_opens == 0
    assert pump(a, d) == [ev.FlowRejected(f3, "too_many_flows", "at most 2 flows per tunnel")]
    # the tunnel survives: the existing flows still carry data
    d.send_data(f1, b"one")
    d.send_data(f2, b"two")
    assert data_events(pump(d, a)) == [(f1, b"one"), (f2, b"two")]
    assert a.dead is None and d.dead is None


def test_local_open_beyond_peer_max_flows() -> None:
    d, a = pair(acceptor=cfg("edge", "edge-1", max_flows=2))
    open_flow(d, a)
    d.open_flow(REQ)  # pending counts too
    with pytest.raises(FlowError) as info:
        d.open_flow(REQ)
    assert info.value.code == "too_many_flows"
    assert info.value.message == "peer edge-1 allows at most 2 flows per tunnel"
    assert len(d.flows) == 2


def test_max_pending_opens() -> None:
    d, a = pair(acceptor=cfg("edge", "edge-1", max_pending_opens=2))
    f1, f2, f3 = d.open_flow(REQ), d.open_flow(REQ), d.open_flow(REQ)
    got = pump(d, a)
    assert got == [
        ev.FlowRequested(f1, REQ),
        ev.FlowRequested(f2, REQ),
        ev.OpenRefused(f3, "too_many_pending", "at most 2 pending OPENs per tunnel"),
    ]
    assert a.pending_opens == 2
    assert pump(a, d) == [ev.FlowRejected(f3, "too_many_pending", "at most 2 pending OPENs per tunnel")]
    a.accept_flow(f1)
    pump(a, d)
    f4 = d.open_flow(REQ)
    assert pump(d, a) == [ev.FlowRequested(f4, REQ)]
    a.reject_flow(f2, "nope", "")
    f5 = d.open_flow(REQ)
    assert pump(d, a) == [ev.FlowRequested(f5, REQ)]
    assert a.pending_opens == 2
    assert a.dead is None


# --------------------------------------------------------------------------- GOAWAY


def test_goaway_received_blocks_new_flows() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    a.goaway("shutdown", "maintenance")
    a.goaway("shutdown", "twice")  # only one GOAWAY goes out
    assert pump(a, d) == [ev.GoAwayReceived("shutdown", "maintenance")]
    assert d.goaway_received and a.goaway_sent
    with pytest.raises(FlowError) as info:
        d.open_flow(REQ)
    assert (info.value.code, info.value.message) == ("draining", "peer edge-1 is draining (GOAWAY); no new flows")
    with pytest.raises(FlowError) as info:
        a.open_flow(REQ)
    assert (info.value.code, info.value.message) == ("draining", "this tunnel is draining; no new flows")
    # existing flows continue
    d.send_data(fid, b"ping")
    assert data_events(pump(d, a)) == [(fid, b"ping")]


def test_goaway_sent_refuses_peer_opens() -> None:
    d, a = pair()
    a.goaway("shutdown")
    f1 = d.open_flow(REQ)  # crosses the GOAWAY on the wire
    assert pump(d, a) == [ev.OpenRefused(f1, "draining", "edge edge-1 is draining")]
    assert a.flows == {} and a.pending_opens == 0
    assert pump(a, d) == [ev.GoAwayReceived("shutdown", ""), ev.FlowRejected(f1, "draining", "edge edge-1 is draining")]
    assert d.flows == {}


# --------------------------------------------------------------------------- flow ids


def test_flow_id_parity() -> None:
    d, a = pair()
    assert [d.open_flow(REQ) for _ in range(3)] == [1, 3, 5]
    assert [a.open_flow(REQ) for _ in range(3)] == [2, 4, 6]


@pytest.mark.parametrize(
    ("dialer_side", "ids", "message"),
    [
        (False, [2], "OPEN with flow id 2 (ids must be new and odd)"),  # acceptor gets even id from dialer
        (False, [0], "OPEN with flow id 0 (ids must be new and odd)"),
        (False, [1, 1], "OPEN with flow id 1 (ids must be new and odd)"),  # reused
        (False, [5, 3], "OPEN with flow id 3 (ids must be new and odd)"),  # going backwards
        (True, [1], "OPEN with flow id 1 (ids must be new and even)"),  # dialer gets odd id from acceptor
        (True, [0], "OPEN with flow id 0 (ids must be new and even)"),
        (True, [4, 4], "OPEN with flow id 4 (ids must be new and even)"),
    ],
)
def test_bad_flow_id(dialer_side: bool, ids: list[int], message: str) -> None:
    d, a = pair()
    conn = d if dialer_side else a
    for fid in ids[:-1]:
        assert conn.receive_data(encode_control(fid, REQ)) == [ev.FlowRequested(fid, REQ)]
    expect_protocol_error(conn, encode_control(ids[-1], REQ), "bad_flow_id", message)


def test_reused_id_of_closed_flow_is_refused() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    d.reset_flow(fid, "x")
    pump(d, a)
    expect_protocol_error(a, encode_control(fid, REQ), "bad_flow_id")


# --------------------------------------------------------------------------- peer violations


def test_data_beyond_credit() -> None:
    d, a = pair(acceptor=cfg("edge", "edge-1", max_frame=8192, window=4096))
    fid = open_flow(d, a)
    msg = f"flow {fid}: peer sent 4097 bytes with only 4096 bytes of credit"
    err = expect_protocol_error(a, encode_header(FrameType.DATA, fid, 4097) + b"x" * 4097, "flow_control", msg)
    raw = a.data_to_send()
    t, _, f0, body = frames(raw)[-1]
    assert (t, f0) == (FrameType.GOAWAY, 0)
    assert DECODERS[FrameType.GOAWAY].decode(body) == GoAway(code="flow_control", reason=msg)
    # the peer learns why
    assert d.receive_data(raw) == [ev.GoAwayReceived("flow_control", msg)]
    # the connection is dead: any further input re-raises the same error
    with pytest.raises(ProtocolError) as info:
        a.receive_data(encode_ping(FrameType.PING, 1.0))
    assert info.value is err
    with pytest.raises(ProtocolError) as info:
        a.receive_data(b"")
    assert info.value is err
    assert len(a._buf) == 0


def test_data_beyond_credit_cumulative() -> None:
    d, a = pair(acceptor=cfg("edge", "edge-1", max_frame=8192, window=4096))
    fid = open_flow(d, a)
    chunk = encode_header(FrameType.DATA, fid, 3000) + b"y" * 3000
    assert data_events(a.receive_data(chunk)) == [(fid, b"y" * 3000)]
    expect_protocol_error(a, chunk, "flow_control", f"flow {fid}: peer sent 3000 bytes with only 1096 bytes of credit")


def test_window_violations() -> None:
    d, a = pair()
    fid = open_flow(d, a)
    expect_protocol_error(d, encode_window(fid, 0), "bad_frame", f"WINDOW with flow {fid} increment 0")
    d, a = pair()
    fid = open_flow(d, a)
    expect_protocol_error(d, encode_window(0, 5), "bad_frame", "WINDOW with flow 0 increment 5")
    d, a = pair()
    fid = open_flow(d, a)
    over = MAX_WINDOW - 524288 + 1
    expect_protocol_error(d, encode_window(fid, over), "flow_control", f"flow {fid}: credit overflow ({MAX_WINDOW + 1} bytes)")
    d, a = pair()
    fid = open_flow(d, a)
    assert d.receive_data(encode_window(fid, MAX_WINDOW - 524288)) == [ev.CreditAvailable(fid, MAX_WINDOW)]


@pytest.mark.parametrize(
    ("ftype", "length"),
    [(FrameType.WINDOW, 5), (FrameType.WINDOW, 0), (FrameType.PING, 7), (FrameType.PONG, 9), (FrameType.FIN, 1)],
)
def test_fixed_length_frames(ftype: int, length: int) -> None:
    d, a = pair()
    # the header alone is enough to reject it
    expect_protocol_error(d, encode_header(ftype, 1, length), "bad_frame", f"{FrameType(ftype).name} frame with length {length}")


@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.DATAGRAM])
def test_frame_too_large_on_header(ftype: int) -> None:
    d, a = pair(acceptor=cfg("edge", "e", max_frame=4096))
    fid = open_flow(d, a)
    header = encode_header(ftype, fid, 4097)
    expect_protocol_error(a, header, "frame_too_large", "frame of 4097 bytes exceeds the maximum of 4096")
    assert sent_goaway(a).code == "frame_too_large"
    # split header: the first half is buffered, the second half completes it
    d, a = pair(acceptor=cfg("edge", "e", max_frame=4096))
    fid = open_flow(d, a)
    header = encode_header(ftype, fid, 0xFFFFFFFF)
    assert a.receive_data(header[:6]) == []
    expect_protocol_error(a, header[6:], "frame_too_large", "frame of 4294967295 bytes exceeds the maximum of 4096")
    assert len(a._buf) == 0
    # exactly max_frame is fine
    d, a = pair(acceptor=cfg("edge", "e", max_frame=4096))
    fid = open_flow(d, a)
    assert data_events(a.receive_data(encode_header(FrameType.DATA, fid, 4096) + b"m" * 4096)) == [(fid, b"m" * 4096)]


def test_control_body_too_large_on_header() -> None:
    d, a = pair()
    expect_protocol_error(a, encode_header(FrameType.OPEN, 1, 16385), "frame_too_large", "OPEN body of 16385 bytes exceeds 16384")


def test_bad_magic() -> None:
    a = TunnelConnection(cfg("edge", "e"), dialer=False)
    expect_protocol_error(a, b"GET / HTTP/1.1\r\n\r\n", "bad_preamble", "not a Ferryman tunnel: bad magic in preamble")
    # not initiated yet: the GOAWAY is preceded by our preamble so the peer can parse it
    raw = a.data_to_send()
    assert raw[:10] == encode_preamble()
    (t, _, fid, body), = frames(raw, preamble=True)
    assert (t, fid) == (FrameType.GOAWAY, 0)
    assert DECODERS[t].decode(body) == GoAway("bad_preamble", "not a Ferryman tunnel: bad magic in preamble")


def test_bad_magic_after_initiate_has_no_second_preamble() -> None:
    a = TunnelConnection(cfg("edge", "e"), dialer=False)
    a.initiate()
    a.data_to_send()
    expect_protocol_error(a, b"\x00FRYMN\r\r\x00\x01", "bad_preamble")
    assert [f[0] for f in frames(a.data_to_send())] == [FrameType.GOAWAY]


def test_unsupported_version() -> None:
    # both sides initiate on connect (as the transport does): the GOAWAY follows our HELLO
    a = TunnelConnection(cfg("edge", "e"), dialer=False)
    d = TunnelConnection(cfg("client", "c"), dialer=True)
    d.initiate()
    a.initiate()
    hello = d.data_to_send()
    assert a.receive_data(encode_preamble(2)[:5]) == []
    msg = "peer speaks protocol version 2; this node speaks version 1"
    expect_protocol_error(a, encode_preamble(2)[5:] + hello[10:], "unsupported_version", msg)
    assert a.peer is None
    # a peer that does speak version 1 hears why
    got = d.receive_data(a.data_to_send())
    assert [type(e) for e in got] == [ev.HelloReceived, ev.GoAwayReceived]
    assert got[1] == ev.GoAwayReceived("unsupported_version", msg)


def test_unsupported_version_before_initiate() -> None:
    a = TunnelConnection(cfg("edge", "e"), dialer=False)
    expect_protocol_error(a, encode_preamble(0), "unsupported_version", "peer speaks protocol version 0; this node speaks version 1")
    (t, _, fid, body), = frames(a.data_to_send(), preamble=True)
    assert (t, fid) == (FrameType.GOAWAY, 0)
    assert DECODERS[t].decode(body).code == "unsupported_version"


@pytest.mark.parametrize(
    ("frame", "name"),
    [
        (encode_ping(FrameType.PING, 1.0), "PING"),
        (encode_control(1, REQ), "OPEN"),
        (encode_header(FrameType.FIN, 1, 0), "FIN"),
        (encode_header(FrameType.PONG, 0, 8) + bytes(8), "PONG"),
        (encode_header(FrameType.DATAGRAM, 1, 0), "DATAGRAM"),
    ],
)
def test_frame_before_hello(frame: bytes, name: str) -> None:
    a = TunnelConnection(cfg("edge", "e"), dialer=False)
    expect_protocol_error(a, encode_preamble() + frame, "hello_required", f"{name} frame before HELLO")


@pytest.mark.parametrize("ftype", [0, 14, 200, 255])
def test_unknown_frame_type(ftype: int) -> None:
    d, a = pair()
    # rejected on the header alone, whatever length it claims
    expect_protocol_error(a, struct.pack("!BBII", ftype, 0, 1, 0xFFFFFF), "unknown_frame", f"unknown frame type {ftype}")
    assert sent_goaway(a) == GoAway("unknown_frame", f"unknown frame type {ftype}")


def test_undecodable_control_body() -> None:
    d, a = pair()
    body = b"\x92\x01\x02"  # OPEN with host=1
    with pytest.raises(ProtocolError) as info:
        a.receive_data(encode_header(FrameType.OPEN, 1, len(body)) + body)
    assert info.value.code == "bad_frame"
    assert info.value.message.startswith("undecodable control frame: ")
    assert a.dead is info.value
    assert sent_goaway(a).code == "bad_frame"


def test_events_before_error_in_same_chunk_are_not_returned() -> None:
    # documents the contract: a chunk with a violation raises; the tunnel is closed anyway
    d, a = pair()
    fid = open_flow(d, a)
    d.send_data(fid, b"ok")
    with pytest.raises(ProtocolError):
        a.receive_data(d.data_to_send() + struct.pack("!BBII", 99, 0, 0, 0))


# --------------------------------------------------------------------------- PING / DATAGRAM


def test_ping_pong() -> None:
    d, a = pair()
    d.ping(1234.5625)
    assert pump(d, a) == []  # PING yields no event, only a queued PONG
    raw = a.data_to_send()
    assert raw == encode_ping(FrameType.PONG, 1234.5625)
    assert d.receive_data(raw) == [ev.PongReceived(1234.5625)]
    a.ping(-0.25)
    assert pump(a, d) == []
    assert pump(d, a) == [ev.PongReceived(-0.25)]


def test_pings_are_not_answered_while_the_peer_does_not_read() -> None:
    """A side that always reads (a client agent) but whose peer reads nothing back would pile up a
    PONG for every PING: while the transport says the peer does not read, PINGs go unanswered,
    and the first one after it reads again is answered."""
    d, a = pair()
    d.answer_pings = False  # what the transport sets when its write buffer is above the mark
    for value in range(1000):
        a.ping(float(value))
    assert pump(a, d) == [] and d.data_to_send() == b""
    d.answer_pings = True
    a.ping(7.5)
    assert pump(a, d) == []
    assert d.data_to_send() == encode_ping(FrameType.PONG, 7.5)


def test_pong_echoes_raw_bytes() -> None:
    d, a = pair()
    value = b"\x7f\xf8\x00\x00\x00\x00\xde\xad"  # a NaN with a payload
    a.receive_data(encode_header(FrameType.PING, 0, 8) + value)
    assert a.data_to_send() == encode_header(FrameType.PONG, 0, 8) + value


UDP = Open(host="10.0.0.53", port=53, protocol="udp")


def test_datagram() -> None:
    d, a = pair()
    fid = open_flow(d, a, UDP)
    d.send_datagram(fid, b"udp payload")
    got = pump(d, a)
    assert [(type(e), e.flow_id, bytes(e.data)) for e in got] == [(ev.DatagramReceived, fid, b"udp payload")]
    a.send_datagram(fid, memoryview(b"answer"))
    assert [(type(e), bytes(e.data)) for e in pump(a, d)] == [(ev.DatagramReceived, b"answer")]
    assert d.credit(fid) == 524288  # datagrams do not consume credit


def test_udp_flows_carry_datagrams_only() -> None:
    d, a = pair()
    tcp = open_flow(d, a)
    udp = open_flow(d, a, UDP)
    with pytest.raises(FlowError) as err:
        d.send_datagram(tcp, b"x")
    assert err.value.code == "flow_state"
    with pytest.raises(FlowError):
        d.send_data(udp, b"x")
    with pytest.raises(FlowError):
        d.send_fin(udp)
    with pytest.raises(FlowError) as err:
        d.send_datagram(99, b"x")
    assert err.value.code == "no_flow"
    # A UDP flow ends with RST, like an aborted TCP flow.
    d.reset_flow(udp, "idle_timeout", "no datagram for 120s")
    assert pump(d, a) == [ev.FlowReset(udp, "idle_timeout", "no datagram for 120s")]
    assert udp not in a.flows and tcp in a.flows


def test_datagram_larger_than_the_peer_allows_is_refused_locally() -> None:
    d, a = pair(acceptor=cfg("edge", "edge-1", max_frame=2048))
    fid = open_flow(d, a, UDP)
    d.send_datagram(fid, b"x" * 2048)
    with pytest.raises(FlowError) as err:
        d.send_datagram(fid, b"x" * 2049)
    assert err.value.code == "datagram_too_large" and "2049 bytes exceeds the tunnel's maximum of 2048" in str(err.value)
    assert [len(e.data) for e in pump(d, a)] == [2048]  # the refused one was never queued


@pytest.mark.parametrize("frame, message", [
    (lambda fid: encode_header(FrameType.DATAGRAM, fid, 2) + b"hi", "DATAGRAM on flow {fid} of a TCP flow"),
    (lambda fid: encode_header(FrameType.DATA, fid, 2) + b"hi", None),
    (lambda fid: encode_header(FrameType.FIN, fid, 0), "unexpected FIN on flow {fid}"),
])
def test_peer_mixing_tcp_and_udp_frames_is_a_protocol_error(frame, message) -> None:
    d, a = pair()
    fid = open_flow(d, a, UDP if message != "DATAGRAM on flow {fid} of a TCP flow" else REQ)
    with pytest.raises(ProtocolError) as err:
        a.receive_data(frame(fid))
    assert err.value.code == "stream_state"
    assert err.value.message == (message or "DATA on flow {fid} of a UDP flow").format(fid=fid)


def test_datagram_before_open_ok_is_a_protocol_error() -> None:
    d, a = pair()
    fid = d.open_flow(UDP)
    pump(d, a)
    with pytest.raises(ProtocolError) as err:
        a.receive_data(encode_header(FrameType.DATAGRAM, fid, 1) + b"x")
    assert err.value.code == "stream_state" and "before OPEN_OK" in err.value.message


def norm(events: list[ev.Event]) -> list[tuple]:
    """Comparable events; adjacent DataReceived of one flow joined (DATA is a byte stream
    and a payload split over reads arrives in pieces)."""
    out: list[tuple] = []
    for e in events:
        t = (type(e).__name__, *(bytes(getattr(e, n)) if n == "data" else getattr(e, n) for n in e.__slots__))
        if t[0] == "DataReceived" and out and out[-1][0] == "DataReceived" and out[-1][1] == t[1]:
            out[-1] = ("DataReceived", t[1], out[-1][2] + t[2])
        else:
            out.append(t)
    return out


def test_same_events_fed_whole_or_bytewise() -> None:
    d = TunnelConnection(cfg("client", "c"), dialer=True)
    a = TunnelConnection(cfg("edge", "e", max_frame=1024), dialer=False)
    twin = TunnelConnection(cfg("edge", "e", max_frame=1024), dialer=False)

    def feed_twin(raw: bytes) -> list[ev.Event]:
        out: list[ev.Event] = []
        for i in range(len(raw)):
            out += twin.receive_data(raw[i:i + 1])
        return out

    d.initiate()
    a.initiate()
    twin.initiate()
    twin.data_to_send()
    raw = d.data_to_send()
    assert norm(a.receive_data(raw)) == norm(feed_twin(raw))
    d.receive_data(a.data_to_send())
    f1 = d.open_flow(REQ)
    raw = d.data_to_send()
    assert norm(a.receive_data(raw)) == norm(feed_twin(raw)) == [("FlowRequested", f1, REQ)]
    a.accept_flow(f1)
    twin.accept_flow(f1)
    ok = a.data_to_send()
    assert twin.data_to_send() == ok
    assert d.receive_data(ok) == [ev.FlowAccepted(f1, "")]
    f2 = d.open_flow(Open(host="x", port=1))
    d.send_data(f1, b"a" * 3000)
    d.ping(2.0)
    d.send_data(f1, b"")
    d.send_fin(f1)
    d.reset_flow(f2, "bye", "now")
    raw = d.data_to_send()
    whole = norm(a.receive_data(raw))
    assert whole == norm(feed_twin(raw))
    assert whole == [
        ("FlowRequested", f2, Open(host="x", port=1)),
        ("DataReceived", f1, b"a" * 3000),
        ("FlowEnded", f1),
        ("FlowReset", f2, "bye", "now"),
    ]
    assert a.data_to_send() == twin.data_to_send() == encode_ping(FrameType.PONG, 2.0)
    assert len(twin._buf) == 0


# --------------------------------------------------------------------------- AUTH and the HELLO token


def test_hello_carries_the_client_token_and_auth_frames_replace_it() -> None:
    d, a = pair(dialer=msgspec.structs.replace(cfg("client", "cl-1"), token="header.claims.sig"))
    assert a.peer is not None and a.peer.token == "header.claims.sig"
    d.send_auth("header.claims2.sig2")
    assert pump(d, a) == [ev.AuthReceived("header.claims2.sig2")]


def test_auth_before_hello_is_refused_both_ways() -> None:
    d = TunnelConnection(cfg("client", "cl-1"), dialer=True)
    with pytest.raises(FlowError) as info:
        d.send_auth("t")
    assert info.value.code == "not_ready"
    a = TunnelConnection(cfg("edge", "edge-1"), dialer=False)
    a.initiate()
    frame = encode_control(0, Auth(token="t"))
    expect_protocol_error(a, encode_preamble() + frame, "hello_required", "AUTH frame before HELLO")


def test_chunks_to_send_keep_large_payloads_uncopied_and_the_byte_stream_unchanged() -> None:
    d, a = pair(cfg("client", "cl-1", window=1 << 22), cfg("edge", "edge-1", window=1 << 22))
    fid = open_flow(d, a)
    big = memoryview(bytes(range(256)) * 256)  # 64 KiB: one DATA payload, passed on as it is
    assert d.send_data(fid, b"ab") == 2
    assert d.send_data(fid, big) == len(big)
    assert d.send_data(fid, b"cd") == 2
    chunks = d.chunks_to_send()
    # [header + "ab" + header] joined, the large payload itself, [header + "cd"] joined
    assert [len(c) for c in chunks] == [10 + 2 + 10, len(big), 10 + 2]
    assert chunks[1] is big
    events = a.receive_data(b"".join(chunks))
    assert b"".join(bytes(e.data) for e in events if isinstance(e, ev.DataReceived)) == b"ab" + bytes(big) + b"cd"
    assert d.chunks_to_send() == [] and not d.has_output
    # The flows' shared output queue was emptied in place: what is sent next still goes out.
    d.send_data(fid, b"ef")
    assert [bytes(e.data) for e in a.receive_data(b"".join(d.chunks_to_send()))
            if isinstance(e, ev.DataReceived)] == [b"ef"]


def test_empty_data_frames_are_dropped_and_cost_their_receiver_nothing() -> None:
    """A peer may send zero-length DATA without end (it needs no credit): no event reaches the
    node for it, whole or split across reads, while its state is still checked."""
    d, a = pair()
    fid = open_flow(d, a)
    empty = encode_header(FrameType.DATA, fid, 0)
    assert a.receive_data(empty * 10_000) == []
    for byte in range(len(empty)):  # one frame split at every byte
        assert a.receive_data(empty[:byte]) == [] and a.receive_data(empty[byte:]) == []
    assert data_events(a.receive_data(empty + encode_header(FrameType.DATA, fid, 3) + b"abc")) == [(fid, b"abc")]
    d.send_fin(fid)
    pump(d, a)
    expect_protocol_error(a, empty, "stream_state")  # DATA after FIN, empty or not


def test_repeated_goaways_are_news_once() -> None:
    """A peer sends one GOAWAY; a flood of them is one event (each used to be another event
    and another log line at the node)."""
    d, a = pair()
    frame = encode_control(0, GoAway(code="draining", reason="shutting down"))
    assert a.receive_data(frame * 1000) == [ev.GoAwayReceived("draining", "shutting down")]
    assert a.receive_data(frame) == [] and a.goaway_received
