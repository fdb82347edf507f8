"""Byte-exact tests of the tunnel wire format (dataplane/wire/frames.py).

Every expected value here is a literal written out by hand (or checked by hand once and
frozen), never computed with the code under test: any change to the preamble, the header
layout, a frame type number or a control body's field order must fail one of these.
"""

from __future__ import annotations

import struct

import msgspec
import pytest

from dataplane.wire import events as ev
from dataplane.wire.connection import TunnelConnection, WireConfig
from dataplane.wire.frames import (
    BODY_TYPES,
    DECODERS,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL_BODY,
    MAX_FLOW_ID,
    MAX_WINDOW,
    PREAMBLE_SIZE,
    VERSION,
    Auth,
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

H = bytes.fromhex


# --------------------------------------------------------------------------- constants


def test_preamble_bytes() -> None:
    assert MAGIC == b"\x00FRYMN\r\n"
    assert VERSION == 1
    assert PREAMBLE_SIZE == 10
    assert encode_preamble() == b"\x00FRYMN\r\n\x00\x01"
    assert encode_preamble() == H("004652594d4e0d0a0001")
    assert encode_preamble(2) == b"\x00FRYMN\r\n\x00\x02"
    assert encode_preamble(0x0102) == b"\x00FRYMN\r\n\x01\x02"  # big-endian u16


def test_frame_type_numbers() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 1,
        "OPEN": 2,
        "OPEN_OK": 3,
        "OPEN_FAIL": 4,
        "DATA": 5,
        "FIN": 6,
        "RST": 7,
        "WINDOW": 8,
        "PING": 9,
        "PONG": 10,
        "GOAWAY": 11,
        "DATAGRAM": 12,
        "AUTH": 13,
    }


def test_limits_constants() -> None:
    assert HEADER_SIZE == 10
    assert HEADER.format == "!BBII"
    assert MAX_FLOW_ID == 0xFFFFFFFF
    assert MAX_WINDOW == 0x7FFFFFFF
    assert MAX_CONTROL_BODY == 16384
    assert set(BODY_TYPES) == {1, 2, 3, 4, 7, 11, 13}
    assert set(DECODERS) == set(BODY_TYPES)


# --------------------------------------------------------------------------- header


@pytest.mark.parametrize(
    ("ftype", "flow_id", "length", "expected"),
    [
        (FrameType.HELLO, 0, 0x25, "01" "00" "00000000" "00000025"),
        (FrameType.OPEN, 1, 23, "02" "00" "00000001" "00000017"),
        (FrameType.OPEN_OK, 3, 1, "03" "00" "00000003" "00000001"),
        (FrameType.OPEN_FAIL, 5, 300, "04" "00" "00000005" "0000012c"),
        (FrameType.DATA, 7, 65536, "05" "00" "00000007" "00010000"),
        (FrameType.FIN, 2, 0, "06" "00" "00000002" "00000000"),
        (FrameType.RST, 4, 2, "07" "00" "00000004" "00000002"),
        (FrameType.WINDOW, 0x01020304, 4, "08" "00" "01020304" "00000004"),
        (FrameType.PING, 0, 8, "09" "00" "00000000" "00000008"),
        (FrameType.PONG, 0, 8, "0a" "00" "00000000" "00000008"),
        (FrameType.GOAWAY, 0, 9, "0b" "00" "00000000" "00000009"),
        (FrameType.DATAGRAM, MAX_FLOW_ID, 0xFFFFFFFF, "0c" "00" "ffffffff" "ffffffff"),
    ],
)
def test_header_layout(ftype: int, flow_id: int, length: int, expected: str) -> None:
    raw = encode_header(ftype, flow_id, length)
    assert len(raw) == 10
    assert raw == H(expected)
    assert HEADER.unpack(raw) == (int(ftype), 0, flow_id, length)


def test_header_rejects_out_of_range_values() -> None:
    with pytest.raises(struct.error):
        encode_header(FrameType.DATA, MAX_FLOW_ID + 1, 0)
    with pytest.raises(struct.error):
        encode_header(256, 1, 0)


# --------------------------------------------------------------------------- control bodies

# (body, exact msgpack body bytes written out by hand)
CONTROL_CASES = [
    (
        Hello(role="edge", node="e1", max_frame=16384, window=65536, max_flows=100),
        # fixarray(10) "edge" "e1" uint16 16384, uint32 65536, fixint 100, "" [] "" "" bin8(0)
        "9a" "a465646765" "a26531" "cd4000" "ce00010000" "64" "a0" "90" "a0" "a0" "c400",
    ),
    (
        Hello(
            role="connector", node="c", max_frame=1024, window=MAX_WINDOW, max_flows=1,
            group="g", features=["dgram", "x"], software="fm/1", token="t.k",
        ),
        "9a" "a9636f6e6e6563746f72" "a163" "cd0400" "ce7fffffff" "01" "a167"
        "92" "a5646772616d" "a178" "a4666d2f31" "a3742e6b" "c400",
    ),
    (
        Hello(role="connector", node="c", max_frame=1024, window=1, max_flows=1, grant_key=b"\x01" * 32),
        # ... bin8(32) the connector's grant key for this tunnel
        "9a" "a9636f6e6e6563746f72" "a163" "cd0400" "01" "01" "a0" "90" "a0" "a0" "c420" + "01" * 32,
    ),
    (
        Open(host="db", port=5432),
        # fixarray(12) "db" uint16 5432 "tcp" "" "" "" "" "" "" bin8(0) "" bin8(0)
        "9c" "a26462" "cd1538" "a3746370" "a0" "a0" "a0" "a0" "a0" "a0" "c400" "a0" "c400",
    ),
    (
        Open(host="10.0.0.1", port=53, protocol="udp", source="1.2.3.4:5", app="dns"),
        "9c" "a831302e302e302e31" "35" "a3756470" "a9312e322e332e343a35" "a3646e73" "a0" "a0" "a0" "a0" "c400"
        "a0" "c400",
    ),
    (
        Open(host="h", port=1, user="u@x", device="d", connection="c", process="p", grant=b"\x01\x02"),
        "9c" "a168" "01" "a3746370" "a0" "a0" "a3754078" "a164" "a163" "a170" "c4020102" "a0" "c400",
    ),
    (
        Open(host="h", port=1, grant=b"\x01", relay_to="k", signer=b"\x30"),  # relayed between edges
        "9c" "a168" "01" "a3746370" "a0" "a0" "a0" "a0" "a0" "a0" "c40101" "a16b" "c40130",
    ),
    (OpenOk(), "92" "a0" "a0"),
    (OpenOk(bound="1.2.3.4:80"), "92" "aa312e322e332e343a3830" "a0"),
    (OpenOk(bound="1.2.3.4:80", remote="5.6.7.8:9"), "92" "aa312e322e332e343a3830" "a9352e362e372e383a39"),
    (OpenFail(code="denied"), "92" "a664656e696564" "a0"),
    (OpenFail(code="refused", reason="no route"), "92" "a772656675736564" "a86e6f20726f757465"),
    (Rst(code="cancel"), "92" "a663616e63656c" "a0"),
    (Rst(code="idle", reason="timeout"), "92" "a469646c65" "a774696d656f7574"),
    (GoAway(code="drain"), "92" "a5647261696e" "a0"),
    (GoAway(code="flow_control", reason="x"), "92" "ac666c6f775f636f6e74726f6c" "a178"),
    (Auth(token="a.b.c"), "91" "a5612e622e63"),
]

FRAME_OF = {Hello: 1, Open: 2, OpenOk: 3, OpenFail: 4, Rst: 7, GoAway: 11, Auth: 13}


@pytest.mark.parametrize(("body", "payload_hex"), CONTROL_CASES, ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_encode_control_exact_and_round_trip(body: msgspec.Struct, payload_hex: str) -> None:
    payload = H(payload_hex)
    flow_id = 0 if isinstance(body, (Hello, GoAway)) else 9
    raw = encode_control(flow_id, body)
    assert raw[:10] == struct.pack("!BBII", FRAME_OF[type(body)], 0, flow_id, len(payload))
    assert raw[10:] == payload
    # round trip through the decoder the connection uses for that frame type
    decoded = DECODERS[raw[0]].decode(raw[10:])
    assert type(decoded) is type(body)
    assert decoded == body
    assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(body)


def test_every_body_type_has_a_case() -> None:
    assert {type(b) for b, _ in CONTROL_CASES} == set(BODY_TYPES.values())


def test_short_arrays_decode_with_defaults() -> None:
    # Older peers may omit trailing optional fields: array_like Structs fill defaults.
    assert DECODERS[FrameType.OPEN].decode(H("92" "a26462" "cd1538")) == Open(host="db", port=5432)
    assert DECODERS[FrameType.OPEN_OK].decode(H("90")) == OpenOk(bound="")
    assert DECODERS[FrameType.RST].decode(H("91" "a161")) == Rst(code="a", reason="")
    hello = DECODERS[FrameType.HELLO].decode(H("95" "a465646765" "a26531" "cd4000" "ce00010000" "64"))
    assert hello == Hello(role="edge", node="e1", max_frame=16384, window=65536, max_flows=100)
    assert hello.features == [] and hello.group == "" and hello.software == ""


@pytest.mark.parametrize(
    ("ftype", "payload_hex"),
    [
        (FrameType.OPEN, "91" "a26462"),  # port missing (required)
        (FrameType.OPEN, "92" "a26462" "ce00010000"),  # port 65536 > 65535
        (FrameType.OPEN, "92" "01" "02"),  # host not a str
        (FrameType.HELLO, "95" "a465646765" "a26531" "00" "01" "01"),  # max_frame 0 (< 1)
        (FrameType.HELLO, "95" "a465646765" "a26531" "01" "ce80000000" "01"),  # window > MAX_WINDOW
        (FrameType.OPEN_FAIL, "90"),  # code missing
        (FrameType.GOAWAY, "81" "a161" "a162"),  # a map, not an array
    ],
)
def test_body_validation(ftype: int, payload_hex: str) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        DECODERS[ftype].decode(H(payload_hex))


def test_string_length_limits() -> None:
    # Short fields: at most 255 characters (str8 header d9 ff); 256 (str16 da 0100) is refused.
    assert DECODERS[FrameType.RST].decode(H("92" "d9ff" + "61" * 255 + "a0")) == Rst(code="a" * 255)
    with pytest.raises(msgspec.ValidationError):
        DECODERS[FrameType.RST].decode(H("92" "da0100" + "61" * 256 + "a0"))
    # Text fields (reason): at most 1024 characters.
    assert DECODERS[FrameType.OPEN_FAIL].decode(H("92" "a161" "da0400" + "62" * 1024)) == OpenFail(
        code="a", reason="b" * 1024
    )
    with pytest.raises(msgspec.ValidationError):
        DECODERS[FrameType.OPEN_FAIL].decode(H("92" "a161" "da0401" + "62" * 1025))
    # features: at most 32 entries
    hello = "99" "a465646765" "a26531" "cd4000" "ce00010000" "64" "a0"
    assert len(DECODERS[FrameType.HELLO].decode(H(hello + "dc0020" + "a178" * 32 + "a0" "a0")).features) == 32
    with pytest.raises(msgspec.ValidationError):
        DECODERS[FrameType.HELLO].decode(H(hello + "dc0021" + "a178" * 33 + "a0" "a0"))
    # token: at most 8192 characters; grant: at most 2048 bytes
    with pytest.raises(msgspec.ValidationError):
        DECODERS[FrameType.AUTH].decode(H("91" "da2001" + "61" * 8193))
    assert len(DECODERS[FrameType.AUTH].decode(H("91" "da2000" + "61" * 8192)).token) == 8192
    with pytest.raises(msgspec.ValidationError):
        DECODERS[FrameType.OPEN].decode(H("9a" "a168" "01" "a0" "a0" "a0" "a0" "a0" "a0" "a0" "c50801" + "00" * 2049))
    assert len(DECODERS[FrameType.OPEN].decode(H("9a" "a168" "01" "a0" "a0" "a0" "a0" "a0" "a0" "a0" "c50800"
                                                 + "00" * 2048)).grant) == 2048


# --------------------------------------------------------------------------- fixed bodies


def test_window_encoding() -> None:
    assert encode_window(3, 65536) == H("08" "00" "00000003" "00000004" "00010000")
    assert encode_window(0xDEADBEEF, 1) == H("08" "00" "deadbeef" "00000004" "00000001")
    assert encode_window(1, MAX_WINDOW) == H("08" "00" "00000001" "00000004" "7fffffff")


def test_ping_pong_encoding() -> None:
    # 8-byte big-endian IEEE-754 double
    assert encode_ping(FrameType.PING, 1.5) == H("09" "00" "00000000" "00000008" "3ff8000000000000")
    assert encode_ping(FrameType.PONG, 1.5) == H("0a" "00" "00000000" "00000008" "3ff8000000000000")
    assert encode_ping(FrameType.PING, 0.0) == H("09" "00" "00000000" "00000008" "0000000000000000")
    assert encode_ping(FrameType.PING, -2.0) == H("09" "00" "00000000" "00000008" "c000000000000000")


def test_fin_and_data_encoding() -> None:
    assert encode_header(FrameType.FIN, 5, 0) == H("06" "00" "00000005" "00000000")
    assert encode_header(FrameType.DATA, 1, 3) + b"abc" == H("05" "00" "00000001" "00000003" "616263")


# --------------------------------------------------------------------------- golden exchange

DIALER = WireConfig(role="client", node="cl-1", max_frame=16384, window=65536, max_flows=64, software="ferryman/0.1")
ACCEPTOR = WireConfig(
    role="edge", node="edge-1", group="eu", max_frame=32768, window=131072, max_flows=128, features=["dgram"]
)

DIALER_HELLO = Hello(
    role="client", node="cl-1", max_frame=16384, window=65536, max_flows=64, software="ferryman/0.1"
)
ACCEPTOR_HELLO = Hello(
    role="edge", node="edge-1", max_frame=32768, window=131072, max_flows=128, group="eu", features=["dgram"]
)

# dialer -> acceptor: preamble + HELLO
GOLDEN_D1 = H(
    "004652594d4e0d0a0001"  # preamble: magic, version 1
    "01" "00" "00000000" "00000028"  # HELLO flow 0, 40 bytes
    "9a" "a6636c69656e74" "a4636c2d31" "cd4000" "ce00010000" "40" "a0" "90" "ac66657272796d616e2f302e31" "a0"
    "c400"
)
# acceptor -> dialer: preamble + HELLO
GOLDEN_A1 = H(
    "004652594d4e0d0a0001"
    "01" "00" "00000000" "00000025"  # HELLO flow 0, 37 bytes
    "9a" "a465646765" "a6656467652d31" "cd8000" "ce00020000" "cc80" "a26575" "91a5646772616d" "a0" "a0" "c400"
)
# dialer -> acceptor: OPEN flow 1 app.corp:443 app=wiki
GOLDEN_D2 = H("02" "00" "00000001" "00000020" "9c" "a86170702e636f7270" "cd01bb" "a3746370" "a0" "a477696b69"
              "a0" "a0" "a0" "a0" "c400" "a0" "c400")
# acceptor -> dialer: OPEN_OK flow 1 bound=10.1.2.3:443
GOLDEN_A2 = H("03" "00" "00000001" "0000000f" "92" "ac31302e312e322e333a343433" "a0")
# dialer -> acceptor: DATA flow 1 "GET /", FIN flow 1
GOLDEN_D3 = H("05" "00" "00000001" "00000005" "474554202f" "06" "00" "00000001" "00000000")
# acceptor -> dialer: DATA flow 1 "HTTP", FIN flow 1
GOLDEN_A3 = H("05" "00" "00000001" "00000004" "48545450" "06" "00" "00000001" "00000000")


def test_golden_exchange_produced() -> None:
    d = TunnelConnection(DIALER, dialer=True)
    a = TunnelConnection(ACCEPTOR, dialer=False)
    d.initiate()
    assert d.data_to_send() == GOLDEN_D1
    a.initiate()
    assert a.data_to_send() == GOLDEN_A1
    assert a.receive_data(GOLDEN_D1) == [ev.HelloReceived(DIALER_HELLO)]
    assert d.receive_data(GOLDEN_A1) == [ev.HelloReceived(ACCEPTOR_HELLO)]
    fid = d.open_flow(Open(host="app.corp", port=443, app="wiki"))
    assert fid == 1
    assert d.data_to_send() == GOLDEN_D2
    a.receive_data(GOLDEN_D2)
    a.accept_flow(1, bound="10.1.2.3:443")
    assert a.data_to_send() == GOLDEN_A2
    d.receive_data(GOLDEN_A2)
    assert d.send_data(1, b"GET /") == 5
    assert d.send_fin(1) is False
    assert d.data_to_send() == GOLDEN_D3
    assert a.send_data(1, b"HTTP") == 4
    assert a.send_fin(1) is False
    assert a.data_to_send() == GOLDEN_A3
    assert d.data_to_send() == b"" and a.data_to_send() == b""


def test_golden_exchange_parsed() -> None:
    # The acceptor parses the whole dialer stream in one go, the dialer gets the acceptor's.
    a = TunnelConnection(ACCEPTOR, dialer=False)
    a.initiate()
    a.data_to_send()
    got = a.receive_data(GOLDEN_D1 + GOLDEN_D2)
    assert got == [ev.HelloReceived(DIALER_HELLO), ev.FlowRequested(1, Open(host="app.corp", port=443, app="wiki"))]
    a.accept_flow(1, bound="10.1.2.3:443")
    assert a.data_to_send() == GOLDEN_A2
    got = a.receive_data(GOLDEN_D3)
    assert [type(e) for e in got] == [ev.DataReceived, ev.FlowEnded]
    assert bytes(got[0].data) == b"GET /" and got[0].flow_id == 1
    assert got[1] == ev.FlowEnded(1)

    d = TunnelConnection(DIALER, dialer=True)
    d.initiate()
    d.data_to_send()
    assert d.receive_data(GOLDEN_A1) == [ev.HelloReceived(ACCEPTOR_HELLO)]
    assert d.open_flow(Open(host="app.corp", port=443, app="wiki")) == 1
    got = d.receive_data(GOLDEN_A2)
    assert got == [ev.FlowAccepted(1, "10.1.2.3:443")]
    assert d.send_fin(1) is False
    got = d.receive_data(GOLDEN_A3)
    assert [type(e) for e in got] == [ev.DataReceived, ev.FlowEnded, ev.FlowClosed]
    assert bytes(got[0].data) == b"HTTP"
    assert got[1:] == [ev.FlowEnded(1), ev.FlowClosed(1)]
    assert d.flows == {}
