"""Ferryman tunnel wire format: preamble, fixed frame header, control-frame bodies.

A tunnel is a byte stream (TLS over TCP) that starts, in each direction, with a
10-byte preamble (8-byte magic + big-endian u16 protocol version) followed by frames.
Every frame is a 10-byte header ``!BBII`` = type, flags, flow id, payload length, then
the payload. Control bodies (HELLO, OPEN, OPEN_OK, OPEN_FAIL, RST, GOAWAY, AUTH) are msgspec
msgpack Structs encoded as arrays; DATA and DATAGRAM payloads are raw bytes that are
passed on as slices, never re-encoded; WINDOW carries a u32 credit increment and
PING/PONG an 8-byte opaque value. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated

import msgspec

MAGIC = b"\x00FRYMN\r\n"
VERSION = 1
PREAMBLE = struct.Struct("!8sH")
PREAMBLE_SIZE = PREAMBLE.size
HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size
WINDOW_BODY = struct.Struct("!I")
PING_BODY = struct.Struct("!d")

MAX_FLOW_ID = 0xFFFFFFFF
MAX_WINDOW = 0x7FFFFFFF
# Control bodies are small; this caps what a peer can make us buffer for one of them
# regardless of the negotiated maximum DATA frame size.
MAX_CONTROL_BODY = 16384


class FrameType(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    OPEN_OK = 3
    OPEN_FAIL = 4
    DATA = 5
    FIN = 6
    RST = 7
    WINDOW = 8
    PING = 9
    PONG = 10
    GOAWAY = 11
    DATAGRAM = 12
    AUTH = 13


ROLES = ("edge", "connector", "client")

Short = Annotated[str, msgspec.Meta(max_length=255)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=MAX_WINDOW)]
Token = Annotated[str, msgspec.Meta(max_length=8192)]
Grant = Annotated[bytes, msgspec.Meta(max_length=2048)]
Certificate = Annotated[bytes, msgspec.Meta(max_length=4096)]  # DER
GrantKey = Annotated[bytes, msgspec.Meta(max_length=64)]


class Hello(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """First frame each side sends: who it is and the limits it enforces on the peer."""

    role: Short
    node: Short
    max_frame: Positive
    window: Positive
    max_flows: Positive
    group: Short = ""
    features: Annotated[list[Short], msgspec.Meta(max_length=32)] = []
    software: Short = ""
    token: Token = ""  # client → edge: the user's access token (a JWT), when signed in
    # connector → edge: this tunnel's key for flow grants (``dataplane.access.grants``); secret,
    # sent only inside the mutually authenticated tunnel, never logged.
    grant_key: GrantKey = b""


class Open(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Ask the peer to open a flow to host:port.

    From an edge to a connector it also says for whom (``user`` UPN, ``device`` id, the
    ``connection`` id of the traffic log, the client's initiating ``process``) and carries
    the ``grant`` the edge signed for exactly this flow (``dataplane.access.grants``).

    A flow relayed through a peer edge (``dataplane.edge.relay``) also names the connector
    the deciding edge chose (``relay_to``: the peer hands the flow to a tunnel of exactly that
    connector) and carries the deciding edge's certificate (``signer``, DER): the connector
    checks it against its CA and verifies the grant with its key.
    """

    host: Short
    port: Port
    protocol: Short = "tcp"
    source: Short = ""
    app: Short = ""
    user: Short = ""
    device: Short = ""
    connection: Short = ""
    process: Short = ""
    grant: Grant = b""
    relay_to: Short = ""
    signer: Certificate = b""


class OpenOk(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """The flow is open: ``bound`` is the local address the answering side connected from,
    ``remote`` the address it reached (the backend's IP and port, for traffic logs)."""

    bound: Short = ""
    remote: Short = ""


class OpenFail(msgspec.Struct, array_like=True, gc=False, frozen=True):
    code: Short
    reason: Text = ""


class Rst(msgspec.Struct, array_like=True, gc=False, frozen=True):
    code: Short
    reason: Text = ""


class GoAway(msgspec.Struct, array_like=True, gc=False, frozen=True):
    code: Short
    reason: Text = ""


class Auth(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Client → edge, any time after HELLO: a fresh access token for the flows opened from now on."""

    token: Token


BODY_TYPES: dict[int, type] = {
    FrameType.HELLO: Hello,
    FrameType.OPEN: Open,
    FrameType.OPEN_OK: OpenOk,
    FrameType.OPEN_FAIL: OpenFail,
    FrameType.RST: Rst,
    FrameType.GOAWAY: GoAway,
    FrameType.AUTH: Auth,
}

_encoder = msgspec.msgpack.Encoder()
DECODERS: dict[int, msgspec.msgpack.Decoder] = {
    t: msgspec.msgpack.Decoder(cls) for t, cls in BODY_TYPES.items()
}
BODY_FRAME: dict[type, int] = {cls: t for t, cls in BODY_TYPES.items()}

_pack_header = HEADER.pack


def encode_preamble(version: int = VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, version)


def encode_control(flow_id: int, body: msgspec.Struct) -> bytes:
    payload = _encoder.encode(body)
    return _pack_header(BODY_FRAME[type(body)], 0, flow_id, len(payload)) + payload


def encode_header(frame_type: int, flow_id: int, length: int) -> bytes:
    return _pack_header(frame_type, 0, flow_id, length)


def encode_window(flow_id: int, increment: int) -> bytes:
    return _pack_header(FrameType.WINDOW, 0, flow_id, 4) + WINDOW_BODY.pack(increment)


def encode_ping(frame_type: int, value: float) -> bytes:
    return _pack_header(frame_type, 0, 0, 8) + PING_BODY.pack(value)
