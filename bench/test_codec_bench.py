"""Micro-benchmarks of the sans-I/O wire core (pytest-benchmark).

Run: ``python -m pytest bench/test_codec_bench.py --benchmark-enable``. Under the
project's default ``--benchmark-disable`` every function still runs once, so each also
checks the result it measures.
"""

from __future__ import annotations

import pytest

from dataplane.wire import events as ev
from dataplane.wire.connection import TunnelConnection, WireConfig
from dataplane.wire.frames import DECODERS, MAX_WINDOW, FrameType, Open, encode_control, encode_header

pytestmark = pytest.mark.timeout(60)

OPEN_REQ = Open(host="postgres.corp.example", port=5432, protocol="tcp", source="203.0.113.7:51234", app="billing-db")


def connected(max_frame: int = 262144) -> tuple[TunnelConnection, TunnelConnection, int]:
    """A dialer and an acceptor with flow 1 open; huge windows so credit never runs out."""
    d = TunnelConnection(WireConfig(role="client", node="c", max_frame=max_frame, window=MAX_WINDOW), dialer=True)
    a = TunnelConnection(WireConfig(role="edge", node="e", max_frame=max_frame, window=MAX_WINDOW), dialer=False)
    d.initiate()
    a.initiate()
    a.receive_data(d.data_to_send())
    d.receive_data(a.data_to_send())
    fid = d.open_flow(OPEN_REQ)
    a.receive_data(d.data_to_send())
    a.accept_flow(fid)
    d.receive_data(a.data_to_send())
    return d, a, fid


def _receiver(conn: TunnelConnection, fid: int, chunks: list[bytes]):
    flow = conn.flows[fid]

    def run() -> list[ev.Event]:
        flow.recv_credit = MAX_WINDOW  # keep credit topped up without WINDOW round trips
        out: list[ev.Event] = []
        for chunk in chunks:
            out += conn.receive_data(chunk)
        return out

    return run


@pytest.mark.benchmark(group="receive")
def test_receive_64k_of_64_byte_frames(benchmark) -> None:
    d, a, fid = connected()
    frame = encode_header(FrameType.DATA, fid, 64) + bytes(range(64))
    count = 65536 // len(frame)
    buf = frame * count
    assert len(buf) <= 65536 and count == 885
    events = benchmark(_receiver(a, fid, [buf]))
    assert len(events) == count
    assert all(type(e) is ev.DataReceived and e.flow_id == fid and bytes(e.data) == bytes(range(64)) for e in events)
    assert len(a._buf) == 0


@pytest.mark.benchmark(group="receive")
def test_receive_one_256k_frame(benchmark) -> None:
    d, a, fid = connected()
    payload = b"\xab" * 262144
    buf = encode_header(FrameType.DATA, fid, len(payload)) + payload
    events = benchmark(_receiver(a, fid, [buf]))
    assert len(events) == 1 and bytes(events[0].data) == payload


@pytest.mark.benchmark(group="receive")
def test_receive_256k_frame_in_16k_reads(benchmark) -> None:
    # the same frame as TLS hands it over, 16 KiB at a time: its payload is streamed as it
    # comes (one DataReceived per read, no reassembly copy)
    d, a, fid = connected()
    payload = b"\xcd" * 262144
    buf = encode_header(FrameType.DATA, fid, len(payload)) + payload
    chunks = [buf[i:i + 16384] for i in range(0, len(buf), 16384)]
    assert len(chunks) == 17
    events = benchmark(_receiver(a, fid, chunks))
    assert len(events) == 17 and all(e.flow_id == fid for e in events)
    assert b"".join(bytes(e.data) for e in events) == payload


def _sender(conn: TunnelConnection, fid: int, payload: bytes):
    flow = conn.flows[fid]

    def run() -> bytes:
        flow.send_credit = MAX_WINDOW
        conn.send_data(fid, payload)
        return conn.data_to_send()

    return run


@pytest.mark.benchmark(group="send")
def test_send_64_byte_payload(benchmark) -> None:
    d, a, fid = connected()
    payload = b"p" * 64
    out = benchmark(_sender(d, fid, payload))
    assert out == encode_header(FrameType.DATA, fid, 64) + payload


@pytest.mark.benchmark(group="send")
def test_send_16k_payload(benchmark) -> None:
    d, a, fid = connected()
    payload = b"q" * 16384
    out = benchmark(_sender(d, fid, payload))
    assert out == encode_header(FrameType.DATA, fid, 16384) + payload


@pytest.mark.benchmark(group="control")
def test_encode_open(benchmark) -> None:
    raw = benchmark(encode_control, 7, OPEN_REQ)
    assert raw[:10] == bytes([2, 0, 0, 0, 0, 7]) + len(raw[10:]).to_bytes(4, "big")
    assert DECODERS[FrameType.OPEN].decode(raw[10:]) == OPEN_REQ


@pytest.mark.benchmark(group="control")
def test_decode_open(benchmark) -> None:
    body = encode_control(7, OPEN_REQ)[10:]
    decoder = DECODERS[FrameType.OPEN]
    assert benchmark(decoder.decode, body) == OPEN_REQ
