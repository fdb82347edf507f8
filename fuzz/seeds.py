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


def _quic() -> list[bytes]:
    from dataplane.wire.frames import (FrameType, Open, OpenOk, encode_control, encode_header, encode_ping,
                                       encode_preamble, encode_window)

    from .t_quic import _STREAMS

    def stream(sid: int, data: bytes, end: bool = False) -> bytes:
        return bytes([8 if end else 0, _STREAMS.index(sid)]) + struct.pack("!H", len(data)) + data

    flow = (encode_control(1, OpenOk()) + encode_header(FrameType.DATA, 1, 3) + b"abc" + encode_window(1, 100)
            + encode_header(FrameType.FIN, 1, 0))
    peer_open = encode_control(2, Open(host="x", port=80)) + encode_header(FrameType.DATA, 2, 2) + b"hi"
    datagram = bytes([4]) + struct.pack("!H", 6) + struct.pack("!I", 3) + b"ab"
    first = (bytes([7]) + stream(4, flow) + stream(1, peer_open) + datagram
             + stream(0, encode_ping(FrameType.PING, 2.0)) + bytes([6, 6]) + b"bye: x" + b"\x00\x00")
    return [first, bytes([6]) + stream(1, peer_open, True), bytes([1]) + stream(5, peer_open)
            + stream(0, encode_preamble())]


def _control() -> list[bytes]:
    from .t_control import TYPES
    bodies = {
        "SegmentIn": {"destination": "*.corp.example", "ports": "80,443,8000-8100", "protocol": "tcp"},
        "ApplicationCreate": {"name": "wiki", "segments": [{"destination": "10.0.0.0/24", "ports": [22, "80-90"]}]},
        "GroupCreate": {"name": "lab", "allowed_addresses": ["10.0.0.0/8"], "denied_addresses": ["10.9.9.9"]},
        "HeartbeatIn": {"version": "1.0", "addresses": ["10.0.0.1:443"], "tunnels": 2, "config_version": 7},
        "TrafficIn": {"records": [{"connection_id": "c1", "transaction_id": "t1", "start": 1700000000.5,
                                   "upn": "a@b", "destination_port": 443}]},
        "RegisterRequest": {"token": "tok", "csr_pem": "-----BEGIN", "name": "edge1", "addresses": ["e:1"]},
        "SignInRequest": {"upn": "a@b.example", "password": "pw"},
        "PolicyCreate": {"name": "p", "action": "allow"},
    }
    names = [t.__name__ for t in TYPES]
    return [bytes([names.index(name)]) + json.dumps(body).encode() for name, body in bodies.items()]


def _socks5() -> list[bytes]:
    connect_name = b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb" + b"GET"
    connect_v6 = b"\x05\x02\x00\x02" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16"
    associate = b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"
    udp = b"\x00\x00\x00\x03\x07db.corp\x00\x35payload"
    return [b"\x00\x03\x03\x05\x02" + connect_name, b"\x00\x00" + connect_v6, b"\x00\x00" + associate,
            b"\x01" + udp, b"\x01\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35x"]


def _httpconnect() -> list[bytes]:
    heads = [b"CONNECT wiki.corp.example:443 HTTP/1.1\r\nHost: wiki.corp.example:443\r\n\r\n\x16\x03\x01",
             b"CONNECT [2001:db8::1]:22 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic e30=\r\n\r\n",
             b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", b"CONNECT 10.0.0.1:80 HTTP/1.0\n\n"]
    return [b"\x02\x10\x07" + heads[0], b"\x00" + heads[1], b"\x00" + heads[2], b"\x01\x05" + heads[3]]


def _dns() -> list[bytes]:
    from dnslib import AAAA, EDNS0, QTYPE, RR, SOA, A, DNSRecord
    out = []
    for name, qtype in (("db.corp.example", "A"), ("v6.corp.example", "AAAA"), ("missing.example", "A")):
        q = DNSRecord.question(name, qtype)
        q.add_ar(EDNS0(udp_len=4096))
        a = q.reply()
        if name.startswith("db"):
            a.add_answer(RR(name, QTYPE.A, rdata=A("10.0.0.5"), ttl=60))
        elif name.startswith("v6"):
            a.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA("2001:db8::5"), ttl=30))
        else:
            a.header.rcode = 3
            a.add_auth(RR("example", QTYPE.SOA, rdata=SOA("ns.example", "h.example", (1, 2, 3, 4, 60)), ttl=90))
        query, answer = q.pack(), a.pack()
        out.append(struct.pack("!H", len(query)) + query + answer)
    return out


def _proxy() -> list[bytes]:
    answers = [b"HTTP/1.1 200 Connection established\r\n\r\n",
               b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\n"
               b"Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.0 100 Continue\r\n\r\nHTTP/1.0 403 Forbidden\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\n\r\n",
               b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x03", b"SSH-2.0-OpenSSH\r\n"]
    return [bytes([i & 1, 2, 9, 20]) + a for i, a in enumerate(answers)]


def _webhead() -> list[bytes]:
    get = (b"GET /wiki/page?x=1 HTTP/1.1\r\nHost: wiki.corp.example\r\nCookie: a=b\r\n"
           b"Accept: text/html\r\n\r\n")
    post = (b"POST /api HTTP/1.1\r\nHost: app.example:8443\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"\r\nhello")
    chunked = (b"PUT /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
               b"X-Trailer: 1\r\n\r\n")
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x00")
    return [b"\x00" + get + get, b"\x02\x30\x05" + post, b"\x01\x11" + chunked, b"\x00" + upgrade,
            b"\x00" + b"GET / HTTP/1.0\r\n\r\n", b"\x00CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"]


SEEDS = {"webhead": _webhead, "proxy": _proxy, "dns": _dns, "httpconnect": _httpconnect, "socks5": _socks5, "tunnel": _tunnel, "frames": _frames, "quic": _quic, "control": _control}


def main() -> None:
    for name, make in SEEDS.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in make():
            (folder / ("seed-" + hashlib.sha1(data).hexdigest()[:16])).write_bytes(data)
        print(name, len(list(folder.iterdir())))


if __name__ == "__main__":
    main()
