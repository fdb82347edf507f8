"""Hostile requests at the HTTPS front door, end to end (real TLS clients, real backends).

- HTTP/2 pseudo-headers the h2 library lets through (a space, a tab or a non-ASCII byte in
  ``:path``, a space in ``:method``) would be written into the backend's HTTP/1.1 request
  line and split it: they are refused with 400 before any backend sees them.
- ``.``/``..`` segments hidden behind separators a backend may decode or honour
  (``%2f``, ``%5c``, ``..;``) cannot climb out of an app's path prefix.
- A WebSocket handshake whose ``Origin`` is another site (a sibling app on the same
  registrable domain sends the app's ``SameSite=Lax`` cookie) is refused: cross-site
  WebSocket hijacking; the app's own origin and a client without ``Origin`` still connect.
- A backend ``101`` without the ``Sec-WebSocket-Accept`` of the client's key is no WebSocket:
  502, and no byte the client sends afterwards reaches the backend (WebSocket smuggling).
- A CSRF token with non-ASCII characters is refused (403), not a server error (500).
- ``X_Remote_User``, ``X_Forwarded_For`` and other ``_`` spellings of the headers the edge
  strips or sets never reach the backend (CGI/WSGI-style servers read them as the real ones).
- A client cannot leave its body unframed towards the backend (``Connection: content-length``
  dropped the edge's only framing: the body reached the backend as a request of its own, with
  any header the client wrote); the edge frames every body itself, and an HTTP/2 request that
  ends without the body its ``content-length`` promised does not leave the backend waiting.
- A ``#`` in the request target (a backend may cut it off, then normalise ``..``) is refused.
- A backend cannot set the edge's own cookies (``__Host-ferryman*``, any case) on its host.
- A prefixed app's sign-in completes: the edge's pages live at the host's root.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from pathlib import Path

import h2.events
import pytest

from web_support import (
    Backend, Door, H2Client, WsClient, cookie_line, curl, read_response, sign_in_with_curl, start_door,
    stop_door, tls_socket,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def door(tmp_path: Path):
    d = start_door(tmp_path)
    opened = Backend("open", "open.internal")
    prefixed = Backend("docs", "docs.internal", prefix="/app/")
    ws = Backend("ws", "ws.internal")
    d.backends.update(open=opened, docs=prefixed, ws=ws)
    d.set_apps([
        d.app("open", "open.test", opened, preauth="passthrough"),
        d.app("docs", "docs.test", prefixed, preauth="passthrough", ext_path="/app/"),
        d.app("ws", "ws.test", ws),
    ])
    yield d
    stop_door(d)


def h1(d: Door, host: str, target: str) -> tuple[int, bytes]:
    """One raw HTTP/1.1 GET (the target exactly as given); status and body."""
    sock = tls_socket(d, host, ["http/1.1"])
    try:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{d.port}\r\nConnection: close\r\n\r\n".encode())
        status, _, rest = read_response(sock)
        while chunk := sock.recv(65536):
            rest += chunk
        return status, rest
    finally:
        sock.close()


def test_http2_pseudo_headers_that_would_split_the_backend_request_line_are_refused(door: Door) -> None:
    c = H2Client(door, "open.test")
    c.conn.config.validate_outbound_headers = False  # send what a hostile client sends
    c.conn.config.normalize_outbound_headers = False
    for method, path in (("GET", b"/hello HTTP/1.1"), ("GET", b"/hello\tx"), ("GET", b"/hello\xff"),
                         ("GET /hello", b"/x"), ("GET\x0b", b"/hello")):
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(b":method", method.encode("latin-1")), (b":scheme", b"https"),
                                  (b":authority", c.authority), (b":path", path)], end_stream=True)
        c.flush()
        status, _, body, _ = c.response(sid)
        assert status == 400 and b"bad_target" in body, (method, path, status, body[:200])
    assert door.backends["open"].server.seen == []
    ok = c.request("GET", "/hello")
    assert c.response(ok)[:3:2] == (200, b"hello from backend open")


def test_encoded_dot_segments_cannot_leave_the_app_prefix(door: Door) -> None:
    for target in ("/app/..%2fsecret", "/app/..%2Fsecret", "/app/%2e%2e%5csecret", "/app/..;/secret",
                   "/app/x/..;jsessionid=1/secret", "/app%2f..%2fsecret"):
        status, body = h1(door, "docs.test", target)
        assert status in (400, 404) and (b"bad_path" in body or b"outside_prefix" in body), (target, status, body[:200])
    assert door.backends["docs"].server.seen == []
    assert h1(door, "docs.test", "/app/hello") == (200, b"hello from backend docs")
    assert h1(door, "docs.test", "/app/a..b/..x/hello")[0] == 404  # dots inside a name are no segment: served


def test_a_fragment_in_the_target_is_refused(door: Door) -> None:
    for target in ("/app/..#/secret", "/app/x/..#", "/app/%2e%2e#", "/app/hello#x"):
        status, body = h1(door, "docs.test", target)
        assert status == 400 and b"bad_target" in body, (target, status, body[:200])
    c = H2Client(door, "docs.test")
    try:
        status, _, body, _ = c.response(c.request("GET", "/app/..#/secret"))
        assert status == 400 and b"bad_target" in body
    finally:
        c.close()
    assert door.backends["docs"].server.seen == []


def test_a_client_cannot_unframe_its_body_towards_the_backend(door: Door) -> None:
    smuggled = (f"GET /admin-smuggled HTTP/1.1\r\nHost: open.internal\r\nX-Remote-User: admin\r\n"
                f"X-Forwarded-For: 1.2.3.4\r\n\r\n").encode()
    sock = tls_socket(door, "open.test", ["http/1.1"])
    try:
        sock.sendall(f"POST /hello HTTP/1.1\r\nHost: open.test:{door.port}\r\n"
                     f"Connection: keep-alive, content-length\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
                     + smuggled)
        status, headers, _ = read_response(sock)
    finally:
        sock.close()
    assert status == 200 and headers.get("x-length") == str(len(smuggled))  # the backend read it as the body
    time.sleep(0.5)  # a second request, had there been one, would have reached the backend by now
    seen = door.backends["open"].server.seen
    assert [(m, p) for m, p, _ in seen] == [("POST", "/hello")]
    assert seen[0][2].get("content-length") == str(len(smuggled))
    # HTTP/2: a POST whose HEADERS end the stream while promising a body of 5 bytes.
    c = H2Client(door, "open.test")
    try:
        started = time.monotonic()
        status, headers2, _, _ = c.response(c.request("POST", "/hello", [(b"content-length", b"5")]), timeout=20)
        assert status == 200 and headers2.get(b"x-length") == b"0" and time.monotonic() - started < 10
    finally:
        c.close()
    assert seen[-1][0] == "POST" and seen[-1][2].get("content-length") == "0"


def test_a_backend_cannot_set_the_edges_own_cookies(door: Door) -> None:
    for http2 in (False, True):
        reply = curl(door, door.url("open.test", "/own-cookie"), http2=http2)
        assert reply.status == 200
        cookies = reply.headers.get("set-cookie", [])
        assert cookies == ["app=1; Path=/"], cookies


def test_a_prefixed_app_completes_sign_in_at_the_hosts_root(tmp_path: Path) -> None:
    d = start_door(tmp_path)
    try:
        backend = Backend("docs", "docs.internal", prefix="/app/")
        d.backends["docs"] = backend
        d.set_apps([d.app("docs", "docs.test", backend, ext_path="/app/")])
        final = sign_in_with_curl(d, str(tmp_path / "jar"), "docs.test", path="/app/hello")
        assert final.status == 200 and final.body == b"hello from backend docs", final
        assert curl(d, d.url("docs.test", "/robots.txt")).body.startswith(b"User-agent: *\nDisallow: /")
        assert curl(d, d.url("docs.test", "/elsewhere")).status == 404  # outside the prefix, not the edge's
    finally:
        stop_door(d)


class OriginWs(WsClient):
    """A WebSocket handshake with a chosen ``Origin`` header."""

    def __init__(self, d: Door, host: str, path: str, cookie: str, origin: str | None) -> None:
        self.sock = tls_socket(d, host, ["http/1.1"])
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{d.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n")
        if origin is not None:
            req += f"Origin: {origin}\r\n"
        self.sock.sendall((req + "\r\n").encode())
        self.status, self.headers, self.buf = read_response(self.sock)


def test_a_websocket_opened_by_another_sites_page_is_refused(door: Door, tmp_path: Path) -> None:
    jar = str(tmp_path / "jar")
    assert sign_in_with_curl(door, jar, "ws.test").status == 200
    cookie = cookie_line(jar, "ws.test")
    for origin in (f"https://open.test:{door.port}", "https://evil.example", "null", f"http://ws.test:{door.port}",
                   f"https://ws.test:{door.port}.evil.example"):
        ws = OriginWs(door, "ws.test", "/ws", cookie, origin)
        assert ws.status == 403 and b"websocket_origin" in ws.buf + ws.sock.recv(65536), origin
        ws.close()
    assert door.backends["ws"].server.websockets == 0
    # over HTTP/2 (RFC 8441) the same
    c = H2Client(door, "ws.test")
    c.pump()
    sid = c.request("CONNECT", "/ws", [(b"cookie", cookie.encode()), (b"sec-websocket-version", b"13"),
                                       (b"origin", b"https://evil.example")],
                    end=False, extra_pseudo=[(b":protocol", b"websocket")])
    status, _, body, _ = c.response(sid)
    assert status == 403 and b"websocket_origin" in body
    assert door.backends["ws"].server.websockets == 0
    assert door.door.counters["web_websocket_origin_refused"] == 6
    rec = door.wait_record(lambda r: r.code == "websocket_origin")
    assert rec.app == "ws" and rec.status == 403 and rec.action == "deny"
    # the app's own pages (any case, the default port written or not) and non-browser clients connect
    for origin in (f"https://WS.test:{door.port}", None):
        ws = OriginWs(door, "ws.test", "/ws", cookie, origin)
        assert ws.status == 101, origin
        ws.send(b"hi", 1)
        assert ws.recv() == (1, b"hi")
        ws.close()
    assert not [e for e in c.events if isinstance(e, h2.events.ConnectionTerminated)]


def test_underscore_spellings_of_identity_headers_never_reach_the_backend(tmp_path: Path) -> None:
    d = start_door(tmp_path)
    try:
        wiki = Backend("wiki", "wiki.internal")
        d.backends["wiki"] = wiki
        d.set_apps([d.app("wiki", "wiki.test", wiki, header_sso={"upn": "X-Remote-User", "groups": "X_Groups"})])
        jar = str(tmp_path / "jar")
        assert sign_in_with_curl(d, jar, "wiki.test").status == 200
        r = curl(d, d.url("wiki.test", "/headers"), "-H", "X_Remote_User: root", "-H", "x_forwarded_for: 6.6.6.6",
                 "-H", "X_Ferryman_Jwt_Assertion: forged", "-H", "X-Groups: admins", "-H", "X_Real_IP: 6.6.6.6",
                 "-H", "X-Custom_Header: kept", jar=jar)
        seen = json.loads(r.body)
        assert seen["x-remote-user"] != "root" and seen["x_groups"] != "admins"
        for name in ("x_remote_user", "x_forwarded_for", "x_ferryman_jwt_assertion", "x-groups", "x_real_ip"):
            assert name not in seen, name
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-custom_header"] == "kept"
    finally:
        stop_door(d)


def test_a_non_ascii_csrf_token_is_refused_not_a_server_error(door: Door) -> None:
    cookie = "__Host-ferryman-csrf=" + "a" * 32
    r = curl(door, door.url("auth.test", "/.ferryman/sign_in"), "-H", "Content-Type: application/x-www-form-urlencoded",
             "-H", f"Cookie: {cookie}", data="csrf=%C3%A9%C3%A9&upn=a&password=b".encode())
    assert r.status == 403 and b"csrf_refused" in r.body
    r = curl(door, door.url("ws.test", "/.ferryman/sign_out"), "-H", "Content-Type: application/x-www-form-urlencoded",
             "-H", f"Cookie: {cookie}", data="csrf=%C3%A9".encode())
    assert r.status == 403 and b"csrf_refused" in r.body
    assert not [rec for rec in door.records if rec.status >= 500]


class _Fake101:
    """A backend that answers every request with a bare ``101`` (no ``Sec-WebSocket-Accept``), then
    records whatever comes through: the raw tunnel a WebSocket-smuggling client wants."""

    def __init__(self, accept: bytes = b"") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.internal_url = f"http://fake.internal:{self.listener.getsockname()[1]}"
        self.accept = accept
        self.after: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    extra = f"Sec-WebSocket-Accept: {self.accept.decode()}\r\n".encode() if self.accept else b""
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 + extra + b"\r\n")
                    rest = head.partition(b"\r\n\r\n")[2]
                    while chunk := conn.recv(65536):
                        rest += chunk
                except OSError:
                    pass
                self.after.append(rest)

    def close(self) -> None:
        self.listener.close()


def test_a_101_that_is_no_websocket_handshake_opens_no_tunnel_to_the_backend(tmp_path: Path) -> None:
    d = start_door(tmp_path)
    fakes = [_Fake101(), _Fake101(accept=b"d3JvbmcgYWNjZXB0IHZhbHVlIQ==")]
    try:
        d.set_apps([d.app("fake", "open.test", fakes[0], preauth="passthrough"),
                    d.app("fake2", "other.test", fakes[1], preauth="passthrough")])
        for host, fake in (("open.test", fakes[0]), ("other.test", fakes[1])):
            ws = OriginWs(d, host, "/ws", "", None)
            assert ws.status == 502, (host, ws.status)
            try:
                ws.sock.sendall(b"GET /admin HTTP/1.1\r\nHost: x\r\nX-Remote-User: root\r\n\r\n")
                while ws.sock.recv(65536):
                    pass
            except OSError:
                pass
            ws.close()
            deadline = time.monotonic() + 5
            while not fake.after and time.monotonic() < deadline:
                time.sleep(0.02)
            assert fake.after == [b""], (host, fake.after)  # nothing reached the backend past the handshake
    finally:
        for fake in fakes:
            fake.close()
        stop_door(d)
