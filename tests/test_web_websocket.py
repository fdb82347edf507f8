"""WebSockets through the front door: HTTP/1.1 Upgrade and RFC 8441 over HTTP/2, end to end.

A signed-in client echoes text and binary frames (small and 1 MiB) through the edge to a
real WebSocket backend; access withdrawn while the socket is open (a session revoked in
the authorizer's view, a session cut by the edge, sign-out) ends it within 5 seconds;
an idle WebSocket ends after ``websocket_idle_timeout``; an app without WebSockets and a
request without a session are refused; each WebSocket leaves one transaction record
with the bytes of both directions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h2.events
import pytest

from dataplane.edge.web import WebSettings
from dataplane.edge.web.session import COOKIE
from web_support import (
    ALICE, Backend, Door, H2Client, WsClient, _ws_frame, _ws_read, cookie_line, jar_cookies, sign_in_with_curl,
    start_door, stop_door,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def door(tmp_path: Path):
    d = start_door(tmp_path, WebSettings(websocket_idle_timeout=3.0, websocket_recheck=0.5))
    ws = Backend("ws", "ws.internal")
    d.backends["ws"] = ws
    d.set_apps([d.app("ws", "ws.test", ws), d.app("nows", "wiki.test", ws, websocket=False)])
    yield d
    stop_door(d)


def cookie_for(d: Door, tmp_path: Path, host: str = "ws.test") -> str:
    jar = str(tmp_path / "jar")
    r = sign_in_with_curl(d, jar, host)
    assert r.status == 200
    return cookie_line(jar, host)


def test_http1_websocket_echo_and_revocation(door: Door, tmp_path: Path) -> None:
    cookie = cookie_for(door, tmp_path)
    ws = WsClient(door, "ws.test", "/ws", cookie)
    assert ws.status == 101 and ws.accept_ok
    for payload, opcode in ((b"hello", 1), (os.urandom(1 << 20), 2), (b"", 2)):
        ws.send(payload, opcode)
        assert ws.recv() == (opcode, payload)
    sid = next(iter(door.users.sessions))
    door.rules.revoked.add(sid)  # the snapshot now says the session is revoked
    t0 = time.monotonic()
    ws.sock.settimeout(10)
    assert ws.recv() is None  # cut by the edge
    assert time.monotonic() - t0 < 5
    ws.close()
    rec = door.wait_record(lambda r: r.websocket)
    assert rec.status == 101 and rec.bytes_in > (1 << 20) and rec.bytes_out > (1 << 20)
    assert "access withdrawn" in rec.reason and rec.upn == ALICE.upn
    assert door.backends["ws"].server.websockets == 1


def test_edge_cuts_a_session_and_idle_timeout(door: Door, tmp_path: Path) -> None:
    cookie = cookie_for(door, tmp_path)
    ws = WsClient(door, "ws.test", "/ws", cookie)
    ws.send(b"ping", 1)
    assert ws.recv() == (1, b"ping")
    sid = next(iter(door.users.sessions))
    assert door.loop.call(door.door.cut_session, sid, "signed out elsewhere") == 1
    ws.sock.settimeout(5)
    assert ws.recv() is None
    ws.close()
    idle = WsClient(door, "ws.test", "/ws", cookie)
    idle.send(b"x", 1)
    assert idle.recv() == (1, b"x")
    t0 = time.monotonic()
    idle.sock.settimeout(10)
    assert idle.recv() is None
    assert 2.5 < time.monotonic() - t0 < 6  # websocket_idle_timeout = 3 s
    idle.close()
    door.wait_record(lambda r: r.websocket and "idle_timeout" in r.reason)
    assert door.door.counters["web_websocket_idle_timeout"] == 1


def test_websocket_refusals(door: Door, tmp_path: Path) -> None:
    anonymous = WsClient(door, "ws.test", "/ws")
    assert anonymous.status == 401
    anonymous.close()
    jar = str(tmp_path / "jar")
    sign_in_with_curl(door, jar, "wiki.test")
    denied = WsClient(door, "wiki.test", "/ws", cookie_line(jar, "wiki.test"))
    assert denied.status == 403
    denied.close()
    assert door.backends["ws"].server.websockets == 0


def test_http2_extended_connect(door: Door, tmp_path: Path) -> None:
    cookie = cookie_for(door, tmp_path)
    c = H2Client(door, "ws.test")
    c.pump()  # the server's SETTINGS: extended CONNECT is on
    sid = c.request("CONNECT", "/ws", [(b"cookie", cookie.encode()), (b"sec-websocket-version", b"13"),
                                       (b"sec-websocket-protocol", b"chat")],
                    end=False, extra_pseudo=[(b":protocol", b"websocket")])
    status, headers = 0, {}
    while not status:
        for e in c.pump():
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                headers = dict(e.headers)
                status = int(headers[b":status"])
    assert status == 200 and headers.get(b"sec-websocket-protocol") == b"chat"
    buf = b""

    def read(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            for e in c.pump():
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                    buf += e.data
                    c.conn.acknowledge_received_data(e.flow_controlled_length, sid)
            c.flush()
        out, buf = buf[:n], buf[n:]
        return out

    for payload in (b"over h2", os.urandom(300000)):
        frame = _ws_frame(2, payload, mask=True)
        for i in range(0, len(frame), 16384):
            while c.conn.local_flow_control_window(sid) < min(16384, len(frame) - i):
                c.pump()
            c.conn.send_data(sid, frame[i:i + 16384])
            c.flush()
        assert _ws_read(read) == (2, payload)
    # a plain HTTP/2 request on the same connection still works
    st, _, body, _ = c.response(c.request("GET", "/hello", [(b"cookie", cookie.encode())]))
    assert (st, body) == (200, b"hello from backend ws")
    c.conn.send_data(sid, _ws_frame(8, b"\x03\xe8", mask=True), end_stream=True)
    c.flush()
    assert _ws_read(read)[0] == 8
    c.close()
    rec = door.wait_record(lambda r: r.websocket)
    assert rec.status == 200 and rec.protocol == "HTTP/2" and rec.bytes_in > 300000
