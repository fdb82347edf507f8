"""Writes the seed corpora of the fuzz targets (``python -m fuzz.seeds``): a few valid inputs each,
so the fuzzer starts from messages that get deep into each parser. The files are committed."""

from __future__ import annotations

import hashlib
import json
import struct

from . import CORPUS


def _tunnel() -> list[bytes]:
    from dataplane.wire.frames import (Auth, FrameType, GoAway, Open, OpenFail, OpenOk, Rst, encode_control,
                                       encode_header, encode_ping, encode_window)
    data = struct.pack("!I", 7)
    stream = (encode_control(1, OpenOk(bound="1.2.3.4:5", remote="10.0.0.1:80"))
              + encode_header(FrameType.DATA, 1, 5) + b"hello"
              + encode_window(1, 4096) + encode_ping(FrameType.PING, 1.5)
              + encode_control(3, OpenOk()) + encode_header(FrameType.DATAGRAM, 3, 4) + data
              + encode_control(2, Open(host="db.internal", port=5432, user="a@b"))
              + encode_header(FrameType.FIN, 1, 0) + encode_control(3, Rst(code="reset"))
              + encode_control(0, Auth(token="t" * 20)) + encode_control(0, GoAway(code="bye")))
    other = encode_control(1, OpenFail(code="no_application", reason="no"))
    return [bytes([7, 3, 5, 17, 1]) + stream, bytes([6, 0]) + stream, bytes([7, 0]) + other,
            bytes([0, 0]) + stream[:40]]


def _frames() -> list[bytes]:
    from dataplane.wire.frames import (BODY_TYPES, Auth, GoAway, Hello, Open, OpenFail, OpenOk, Rst,
                                       encode_control, encode_preamble)
    types = sorted(BODY_TYPES)
    bodies = [Hello(role="edge", node="e1", max_frame=65536, window=65536, max_flows=10, features=["quic"]),
              Open(host="h", port=1, protocol="udp", grant=b"\x01\x02"), OpenOk(bound="b"), OpenFail(code="c"),
              Rst(code="r", reason="x"), GoAway(code="g"), Auth(token="t")]
    out = []
    for body in bodies:
        frame = encode_control(0, body)
        out.append(bytes([types.index(frame[0])]) + frame[10:])
    out.append(b"\xff" + encode_preamble())
    return out


SEEDS = {"tunnel": _tunnel, "frames": _frames}


def main() -> None:
    for name, make in SEEDS.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in make():
            (folder / ("seed-" + hashlib.sha1(data).hexdigest()[:16])).write_bytes(data)
        print(name, len(list(folder.iterdir())))


if __name__ == "__main__":
    main()
