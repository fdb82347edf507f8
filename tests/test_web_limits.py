"""Every limit of the front door answers with its own status code (real sockets, real clients).

431 header block and header count, 414 URL, 413 declared and streamed bodies, 408 slow
request heads and stalled bodies, idle keep-alive connections closed, slow readers cut,
504 backend timeout (default and ``long`` apps), 502 backend unreachable / broken /
malformed, 503 no connector, 429 per app and per edge with ``Retry-After``, HTTP/2 stream
limit (``REFUSED_STREAM`` above it, connection kept), HTTP/2 flow control and stream
resets, the rapid-reset guard (``GOAWAY``), and the connection cap.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import h2.errors
import h2.events
import h2.settings
import pytest

from dataplane.edge.web import WebSettings
from web_support import Backend, Door, H2Client, curl, free_port, read_response, start_door, stop_door, tls_socket

pytestmark = pytest.mark.timeout(120)

SMALL = WebSettings(max_header_block=4096, max_headers=50, max_url_length=2048, max_body_size=1_000_000,
                    backend_timeout=1.0, backend_timeout_long=4.0, header_timeout=1.0, idle_timeout=2.0,
                    h2_max_streams=5, backend_connect_timeout=2.0, h2_max_resets=20, max_connections=50)


@pytest.fixture
def door(tmp_path: Path):
    d = start_door(tmp_path, SMALL)
    b = Backend("open", "open.internal")
    d.backends["open"] = b
    d.set_apps([d.app("open", "open.test", b, preauth="passthrough"),
                d.app("long", "long.test", b, preauth="passthrough", backend_timeout="long")])
    yield d
    stop_door(d)


def test_header_and_url_limits(door: Door) -> None:
    for http2 in (False, True):
        big = curl(door, door.url("open.test", "/hello"), "-H", "X-Big: " + "a" * 5000, http2=http2)
        assert big.status == 431 and b"larger than 4096 bytes" in big.body, http2
        long = curl(door, door.url("open.test", "/hello?" + "q" * 3000), http2=http2)
        assert long.status == 414 and b"longer than 2048 bytes" in long.body, http2
        ok = curl(door, door.url("open.test", "/hello?" + "q" * 1000), "-H", "X-Big: " + "a" * 2000, http2=http2)
        assert ok.status == 200, http2
    many = [arg for i in range(60) for arg in ("-H", f"X-H{i}: v")]
    assert curl(door, door.url("open.test", "/hello"), *many).status == 431
    # a header that never ends is cut at the limit, not buffered
    s = tls_socket(door, "open.test", ["http/1.1"])
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: open.test\r\nX-Endless: " + b"a" * 8000)
    status, _, _ = read_response(s)
    assert status == 431
    s.close()
    for code in ("header_too_large", "url_too_long", "too_many_headers"):
        door.wait_record(lambda r, c=code: r.code == c)


def test_body_limits(door: Door) -> None:
    body = b"b" * 2_000_000
    declared = curl(door, door.url("open.test", "/echo"), data=body)
    assert declared.status == 413 and b"larger than 1000000 bytes" in declared.body
    streamed = curl(door, door.url("open.test", "/echo"), "-H", "Transfer-Encoding: chunked", data=body)
    assert streamed.status == 413
    for http2 in (False, True):
        ok = curl(door, door.url("open.test", "/echo"), data=body[:900_000], http2=http2)
        assert ok.status == 200 and ok.header("x-length") == "900000"
    # HTTP/2 (curl 7.88 reports an error when a stream it is still uploading on is ended early, so
    # this uses the h2 client): 413 before any body for a declared length, 413 mid-stream otherwise,
    # then RST_STREAM(NO_ERROR) to stop the upload (RFC 9113 §8.1); the connection lives on.
    c = H2Client(door, "open.test")
    sid = c.request("POST", "/echo", [(b"content-length", b"2000000")], end=False)
    status, _, page, _ = c.response(sid)
    assert status == 413 and b"larger than 1000000 bytes" in page
    sid = c.request("POST", "/echo", end=False)
    sent = 0
    while sent <= 1_100_000:
        window = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size)
        if window <= 0:
            c.pump(5)  # the edge credits what it has passed on to the backend
            if any(getattr(e, "stream_id", 0) == sid and isinstance(e, (h2.events.ResponseReceived,
                                                                         h2.events.StreamReset)) for e in c.events):
                break
            continue
        c.conn.send_data(sid, b"x" * window)
        c.flush()
        sent += window
    status, _, page, _ = c.response(sid)
    assert status == 413 and b"larger than 1000000 bytes" in page
    status, _, body, _ = c.response(c.request("GET", "/hello"))
    assert (status, body) == (200, b"hello from backend open")
    c.close()
    assert not any(seen[0] == "POST" and seen[2].get("Content-Length") == "2000000"
                   for seen in door.backends["open"].seen)  # a declared oversize body never reaches the backend


def test_backend_timeouts(door: Door) -> None:
    r = curl(door, door.url("open.test", "/slow?s=2.5"), http2=True)
    assert r.status == 504 and b"did not answer within 1 seconds" in r.body
    r = curl(door, door.url("long.test", "/slow?s=2"))
    assert (r.status, r.body) == (200, b"slow answer")
    rec = door.wait_record(lambda x: x.status == 504)
    assert rec.code == "backend_timeout" and rec.app == "open"


def test_backend_unreachable_broken_and_no_connector(door: Door) -> None:
    dead = free_port()
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen()

    def serve() -> None:
        for reply in (b"this is not HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"):
            conn, _ = garbage.accept()
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    from dataplane.edge.web import WebApp
    door.set_apps([WebApp(name="dead", external_url=f"https://open.test:{door.port}",
                          internal_url=f"http://dead.internal:{dead}", preauth="passthrough"),
                   WebApp(name="junk", external_url=f"https://long.test:{door.port}",
                          internal_url=f"http://junk.internal:{garbage.getsockname()[1]}", preauth="passthrough")])
    r = curl(door, door.url("open.test", "/hello"))
    assert r.status == 502 and b"could not be reached" in r.body and str(dead).encode() not in r.body
    bad = curl(door, door.url("long.test", "/hello"))
    assert bad.status == 502 and b"malformed" not in bad.body  # no internal detail on the page
    cut = curl(door, door.url("long.test", "/hello"))
    assert cut.status == 200 and cut.body == b"short"  # headers were sent; the body was cut: the client sees it short
    door.dialer.no_connector.add("dead")
    r = curl(door, door.url("open.test", "/hello"), http2=True)
    assert r.status == 503 and b"No connector" in r.body
    for code in ("unreachable", "no_connector", "backend_error"):
        door.wait_record(lambda r, c=code: r.code == c)
    t.join(5)
    garbage.close()


def test_rate_limits(tmp_path: Path) -> None:
    for settings, marker in ((WebSettings(app_rate=5, edge_rate=1000), b"This application is receiving"),
                             (WebSettings(app_rate=1000, edge_rate=5), b"This site is receiving")):
        d = start_door(tmp_path / marker.decode()[5:9], settings)
        try:
            b = Backend("open", "open.internal")
            d.backends["open"] = b
            d.set_apps([d.app("open", "open.test", b, preauth="passthrough")])
            s = tls_socket(d, "open.test", ["http/1.1"])
            statuses = []
            for _ in range(12):
                s.sendall(f"GET /hello HTTP/1.1\r\nHost: open.test:{d.port}\r\n\r\n".encode())
                status, headers, rest = read_response(s)
                length = int(headers.get("content-length", "0"))
                while len(rest) < length:
                    rest += s.recv(65536)
                statuses.append(status)
                if status == 429:
                    assert int(headers["retry-after"]) >= 1 and marker in rest
            s.close()
            assert statuses.count(200) >= 5 and statuses.count(429) >= 5, statuses
        finally:
            stop_door(d)


def test_slow_clients(door: Door) -> None:
    # a request head that does not finish within header_timeout: 408
    s = tls_socket(door, "open.test", ["http/1.1"])
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: open.test\r\n")
    t0 = time.monotonic()
    status, headers, _ = read_response(s)
    assert status == 408 and 0.8 < time.monotonic() - t0 < 5 and headers["connection"] == "close"
    s.close()
    # a connection that sends nothing is closed (no page)
    s = tls_socket(door, "open.test", ["http/1.1"])
    s.settimeout(10)
    assert s.recv(100) == b""
    s.close()
    # keep-alive: idle after a response for idle_timeout → closed
    s = tls_socket(door, "open.test", ["http/1.1"])
    s.sendall(f"GET /hello HTTP/1.1\r\nHost: open.test:{door.port}\r\n\r\n".encode())
    status, _, rest = read_response(s)
    assert status == 200
    t0 = time.monotonic()
    s.settimeout(10)
    while True:
        data = s.recv(65536)
        if not data:
            break
    assert 1.5 < time.monotonic() - t0 < 6
    s.close()
    # a body that stops arriving: 408
    s = tls_socket(door, "long.test", ["http/1.1"])  # backend timeout 4 s > idle_timeout 2 s
    s.sendall(f"POST /echo HTTP/1.1\r\nHost: long.test:{door.port}\r\nContent-Length: 1000\r\n\r\n0123456789".encode())
    status, _, _ = read_response(s)
    assert status == 408
    s.close()
    # a reader that stops reading is cut after idle_timeout
    s = tls_socket(door, "open.test", ["http/1.1"])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET /big?n=200000000 HTTP/1.1\r\nHost: open.test:{door.port}\r\n\r\n".encode())
    deadline = time.monotonic() + 8
    while not door.door.counters["web_client_write_timeout"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert door.door.counters["web_client_write_timeout"] == 1  # cut after idle_timeout without a reader
    s.close()


def test_h2_stream_limit_refuses_streams_not_the_connection(door: Door) -> None:
    c = H2Client(door, "open.test")
    sids = [c.request("GET", "/slow?s=0.5") for _ in range(7)]  # sent before the server's SETTINGS are read
    results = [c.response(sid) for sid in sids]
    assert [r[0] for r in results[:5]] == [200] * 5
    refused = [e for e in c.events if isinstance(e, h2.events.StreamReset)]
    assert {e.stream_id for e in refused} == set(sids[5:])
    assert all(e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM for e in refused)
    assert c.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 5
    assert c.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1
    status, _, body, _ = c.response(c.request("GET", "/hello"))
    assert (status, body) == (200, b"hello from backend open")  # the connection lives on
    c.close()


def test_h2_flow_control_and_reset(door: Door) -> None:
    c = H2Client(door, "open.test")
    sid = c.request("GET", "/big?n=4000000")
    got = 0
    deadline = time.monotonic() + 1.2  # less than idle_timeout: the server waits for the window
    while time.monotonic() < deadline:
        try:
            events = c.pump(0.5)
        except (TimeoutError, socket.timeout):
            continue
        got += sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
    assert 0 < got <= 65535  # the server never sends past the client's window
    c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.conn.acknowledge_received_data(got, sid)  # give the connection window back, as a client does
    c.flush()
    time.sleep(0.3)
    assert len(door.door.pool) == 0  # the backend connection of a reset stream is closed, never pooled
    status, _, body, _ = c.response(c.request("GET", "/hello"))
    assert (status, body) == (200, b"hello from backend open")
    big = c.request("GET", "/big?n=3000000")
    status, _, body, reset = c.response(big, timeout=30)
    assert status == 200 and len(body) == 3000000 and not reset
    c.close()


def test_h2_rapid_reset_guard(door: Door) -> None:
    c = H2Client(door, "open.test")
    goaway = None
    for _ in range(40):
        sid = c.request("GET", "/slow?s=1")
        c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        c.flush()
    deadline = time.monotonic() + 10
    while goaway is None and time.monotonic() < deadline:
        try:
            events = c.pump(1)
        except (ConnectionError, TimeoutError, socket.timeout, OSError):
            break
        goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert door.door.counters["web_h2_reset_flood"] == 1
    c.sock.close()


def test_connection_cap(door: Door) -> None:
    socks = [tls_socket(door, "open.test", ["http/1.1"]) for _ in range(50)]
    extra = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    import ssl
    ctx = ssl.create_default_context(cafile=door.pki.ca_path)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        wrapped = ctx.wrap_socket(extra, server_hostname="open.test")
        wrapped.sendall(f"GET /hello HTTP/1.1\r\nHost: open.test:{door.port}\r\n\r\n".encode())
        if not wrapped.recv(100):
            raise ConnectionError("closed")
    assert door.door.counters["web_connections_refused"] >= 1
    for s in socks:
        s.close()
    time.sleep(0.3)
    assert curl(door, door.url("open.test", "/hello")).status == 200


def _raw(door: Door, data: bytes, host: str = "open.test") -> tuple[int, dict[str, str], bytes]:
    s = tls_socket(door, host, ["http/1.1"])
    s.sendall(data)
    status, headers, rest = read_response(s)
    s.settimeout(1.0)  # below idle_timeout: an open keep-alive connection shows as "<still open>"
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    except (TimeoutError, socket.timeout):
        rest += b"<still open>"
    s.close()
    return status, headers, rest


def test_malformed_and_smuggling_requests(door: Door) -> None:
    h = f"Host: open.test:{door.port}\r\n".encode()
    cases = [  # (request, status, the connection closes after the answer)
        (b"POST /echo HTTP/1.1\r\n" + h + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, True),
        (b"GET /hello HTTP/1.1\r\n" + h + h + b"\r\n", 400, True),  # two Host headers
        (b"GET /hello HTTP/1.1\r\n\r\n", 400, True),  # no Host
        (b"GET http://open.test/hello HTTP/1.1\r\n" + h + b"\r\n", 400, True),  # absolute form
        (b"CONNECT open.internal:80 HTTP/1.1\r\n" + h + b"\r\n", 405, True),
        (b"GET /hello HTTP/1.1\r\n" + h + b"X-Bad\x01: v\r\n\r\n", 400, True),
        (b"GET /hello HTTP/1.1\r\n" + h + b"Content-Length: -1\r\n\r\n", 400, True),
        (b"GET /a/../hello HTTP/1.1\r\n" + h + b"\r\n", 400, False),  # well-formed, refused by the proxy
        (b"GET /a/%2e%2E/hello HTTP/1.1\r\n" + h + b"\r\n", 400, False),
    ]
    for request, status, closes in cases:
        got, headers, rest = _raw(door, request)
        assert got == status, (request, got, rest[:200])
        assert (headers.get("connection") == "close") == closes, request
        assert rest.endswith(b"<still open>") != closes, request
    assert not any(seen[1].endswith("/hello") and ".." in seen[1] for seen in door.backends["open"].seen)
    # HTTP/1.0: one response, then the connection closes
    got, headers, rest = _raw(door, b"GET /hello HTTP/1.0\r\n" + h + b"\r\n")
    assert got == 200 and headers["connection"] == "close" and rest == b"hello from backend open"


def test_path_prefix(door: Door) -> None:
    from dataplane.edge.web import WebApp
    b = door.backends["open"]
    door.set_apps([WebApp(name="prefixed", external_url=f"https://open.test:{door.port}/tools",
                          internal_url=f"http://open.internal:{b.port}/", preauth="passthrough")])
    r = curl(door, door.url("open.test", "/tools/hello"))
    assert (r.status, r.body) == (200, b"hello from backend open")
    r = curl(door, door.url("open.test", "/tools?x=1"))
    assert r.status == 302 and r.header("location") == "/tools/?x=1"
    r = curl(door, door.url("open.test", "/other"))
    assert r.status == 404 and b"outside the application" in r.body
