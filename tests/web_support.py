"""Test support for the HTTPS front door (``dataplane.edge.web``): real servers, real clients.

- ``make_pki(dir)``: a test CA and certificates (front door hosts, a custom domain, a
  backend certificate signed by a second CA, a self-signed backend certificate).
- ``Backend``: a threaded ``http.server`` backend on a free loopback port, plain or TLS,
  with HTTP routes (hello, headers as JSON, echo, big, slow, HTML/CSS with internal links,
  gzip HTML, redirects and cookies, trailers, connection ids) and a WebSocket echo
  (``/ws``, RFC 6455 framing done here).
- ``TcpDialer``: the ``BackendDialer`` of the tests — a real TCP connection to the backend
  (internal host names map to 127.0.0.1, as a connector's DNS would resolve them).
- ``UserTable``: a ``SignIn`` with a fixed user table (password + TOTP via pyotp), single-use
  rotating refresh tokens and revocation, like the control plane's.
- ``Rules``: an ``Authorizer`` with per-app allowed users, a compliant-device requirement
  and revoked sessions, changeable while the front door runs.
- ``LoopThread`` runs the front door's event loop in a thread; ``Door`` starts a
  ``FrontDoor`` on a free port and collects its transaction records.
- ``curl(...)``: runs the real curl against the door (``--resolve`` every test host to
  127.0.0.1, the test CA), ``ws_connect``/``ws_send``/``ws_recv``: a minimal WebSocket
  client over a TLS socket, ``H2Client``: an HTTP/2 client on the ``h2`` library for what
  curl cannot do (extended CONNECT, resets, flow control).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime
import gzip
import hashlib
import http.server
import ipaddress
import json
import os
import secrets
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import pyotp
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dataplane.edge.web import (
    AssertionSigner, DialError, FrontDoor, KeyRing, Principal, RequestFacts, SignInError, SignInResult,
    TransactionRecord, Verdict, WebApp, WebSettings,
)
from dataplane.edge.web.backend import SocketStream, open_socket_stream

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HOSTS = ["auth.test", "wiki.test", "docs.test", "open.test", "other.test", "long.test", "ws.test", "tls.test"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- certificates
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert(subject: str, sans: Iterable[str], issuer_cert: x509.Certificate | None, issuer_key, key,
          ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2)))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        alt: list[x509.GeneralName] = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca_pem: str
    ca_path: str
    door_cert: str
    door_key: str
    custom_cert: str  # custom.test, signed by the test CA
    custom_key: str
    backend_ca_pem: str  # a second CA that signed the backend certificate
    backend_cert: str
    backend_key: str
    selfsigned_cert: str  # a backend certificate nobody signed
    selfsigned_key: str


def make_pki(directory: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Ferryman test CA", [], None, ca_key, ca_key, ca=True)
    door_key = ec.generate_private_key(ec.SECP256R1())
    door = _cert("front door", HOSTS + ["localhost", "127.0.0.1"], ca, ca_key, door_key)
    custom_key = ec.generate_private_key(ec.SECP256R1())
    custom = _cert("custom.test", ["custom.test"], ca, ca_key, custom_key)
    bca_key = ec.generate_private_key(ec.SECP256R1())
    bca = _cert("backend CA", [], None, bca_key, bca_key, ca=True)
    b_key = ec.generate_private_key(ec.SECP256R1())
    bcert = _cert("backend.internal", ["backend.internal", "127.0.0.1"], bca, bca_key, b_key)
    s_key = ec.generate_private_key(ec.SECP256R1())
    scert = _cert("backend.internal", ["backend.internal", "127.0.0.1"], None, s_key, s_key)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.pem"
    ca_path.write_text(pem(ca))
    return Pki(ca_pem=pem(ca), ca_path=str(ca_path), door_cert=pem(door) + pem(ca), door_key=_pem_key(door_key),
               custom_cert=pem(custom), custom_key=_pem_key(custom_key), backend_ca_pem=pem(bca),
               backend_cert=pem(bcert), backend_key=_pem_key(b_key), selfsigned_cert=pem(scert),
               selfsigned_key=_pem_key(s_key))


# ---------------------------------------------------------------------------- backend
def _ws_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


def _ws_read(read) -> tuple[int, bytes] | None:
    """One frame from ``read(n)`` (exactly n bytes or b"" at EOF)."""
    h = read(2)
    if len(h) < 2:
        return None
    opcode, n, masked = h[0] & 0x0F, h[1] & 0x7F, h[1] & 0x80
    if n == 126:
        n = struct.unpack("!H", read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read(8))[0]
    key = read(4) if masked else b""
    payload = read(n) if n else b""
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_OPTIONS(self) -> None:
        self.server.seen.append(("OPTIONS", self.path, dict(self.headers)))
        self._send(204, b"", extra=[("Access-Control-Allow-Origin", self.headers.get("Origin", "*")),
                                    ("Access-Control-Allow-Methods", "GET, POST")])

    def do_POST(self) -> None:
        self.do_PUT()

    def do_PUT(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        if getattr(self, "drop_next", False):  # armed by /conn-then-drop: this request gets no answer
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        if path.endswith("/early"):  # answers without reading the body
            self._send(403, b"backend refuses uploads here", extra=[("Connection", "close")])
            return
        body = self._body()
        self._send(200, body, "application/octet-stream",
                   [("X-Sha256", hashlib.sha256(body).hexdigest()), ("X-Length", str(len(body))),
                    ("X-Request-Chunked", str("chunked" in self.headers.get("Transfer-Encoding", "")))])

    def do_GET(self) -> None:  # noqa: C901 - one route table
        srv = self.server
        srv.seen.append((self.command, self.path, dict(self.headers)))
        if getattr(self, "drop_next", False):  # armed by /conn-then-drop: this request gets no answer
            self.close_connection = True
            return
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if srv.prefix and path.startswith(srv.prefix):
            path = "/" + path[len(srv.prefix):]
        base = srv.internal_base
        if path == "/hello":
            self._send(200, b"hello from backend " + srv.name.encode())
        elif path == "/headers":
            self._send(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(), "application/json")
        elif path == "/conn":
            self._send(200, str(id(self.connection)).encode())
        elif path == "/conn-then-close":  # answers as keep-alive, then closes (as a backend's idle timeout would)
            self._send(200, str(id(self.connection)).encode())
            self.wfile.flush()
            self.close_connection = True
        elif path == "/conn-then-drop":  # answers as keep-alive, then closes at the next request, unanswered
            self._send(200, str(id(self.connection)).encode())
            self.drop_next = True
        elif path == "/big":
            n = int(q.get("n", "1048576"))
            block = hashlib.sha256(b"seed").digest() * 2048
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            while sent < n:
                piece = block[:min(len(block), n - sent)]
                self.wfile.write(piece)
                sent += len(piece)
        elif path == "/slow":
            time.sleep(float(q.get("s", "1")))
            self._send(200, b"slow answer")
        elif path == "/page":
            html = (f'<!doctype html><html><head><title>Page</title><link rel="stylesheet" href="{base}/style.css">'
                    f'<script>var internal = "{base}/api";</script></head><body>'
                    f'<h1 id="title">Internal page</h1><a id="next" href="{base}/next">next</a> '
                    f'<a id="rel" href="next">relative</a> <img src="{base}/img.png" srcset="{base}/a.png 1x, '
                    f'{base}/b.png 2x"><form action="{base}/submit"></form></body></html>').encode()
            self._send(200, html, "text/html; charset=utf-8")
        elif path == "/next":
            self._send(200, b'<!doctype html><html><body><h1 id="title">Next page</h1></body></html>',
                       "text/html; charset=utf-8")
        elif path == "/style.css":
            self._send(200, f'body {{ background: url("{base}/bg.png") }} @import "{base}/more.css";'.encode(),
                       "text/css")
        elif path == "/gz-page":
            html = f'<html><body><a id="l" href="{base}/x">x</a></body></html>'.encode() * 200
            self._send(200, gzip.compress(html), "text/html", [("Content-Encoding", "gzip")])
        elif path == "/redirect":
            self._send(302, b"", extra=[("Location", f"{base}/next"),
                                        ("Set-Cookie", f"app=1; Domain={srv.internal_host}; Path={srv.prefix or '/'}"),
                                        ("Refresh", f"5; url={base}/next"), ("Content-Location", f"{base}/redirect")])
        elif path == "/trailers":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n")
        elif path == "/robots.txt":
            self._send(200, b"User-agent: *\nAllow: /\n")
        elif path == "/ws":
            self._websocket()
        elif path == "/own-cookie":  # a hostile backend planting the edge's own cookies next to its own
            self._send(200, b"cookies", extra=[("Set-Cookie", "__Host-ferryman=planted; Path=/; Secure"),
                                               ("Set-Cookie", "__HOST-Ferryman-csrf=planted; Path=/; Secure"),
                                               ("Set-Cookie", " __Host-ferryman-s-abc=planted; Path=/; Secure"),
                                               ("Set-Cookie", "app=1; Path=/")])
        elif path == "/hop":
            self._send(200, b"hop", extra=[("Connection", "X-Secret, keep-alive"), ("X-Secret", "internal"),
                                           ("Alt-Svc", 'h3=":443"'), ("Keep-Alive", "timeout=5")])
        else:
            self._send(404, b"backend has no " + path.encode())

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self._send(400, b"not a websocket handshake")
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        if self.headers.get("Sec-WebSocket-Protocol"):
            self.send_header("Sec-WebSocket-Protocol", self.headers["Sec-WebSocket-Protocol"].split(",")[0].strip())
        self.end_headers()
        self.wfile.flush()
        self.server.websockets += 1
        read = self.rfile.read
        try:
            while True:
                frame = _ws_read(read)
                if frame is None:
                    break
                opcode, payload = frame
                if opcode == 8:
                    self.wfile.write(_ws_frame(8, payload[:2]))
                    break
                if opcode == 9:
                    self.wfile.write(_ws_frame(10, payload))
                elif opcode in (1, 2):
                    self.wfile.write(_ws_frame(opcode, payload))
                self.wfile.flush()
        except (OSError, struct.error):
            pass
        finally:
            self.server.websockets_closed += 1
            self.close_connection = True


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        """Connections the front door cut on purpose (limits, resets) are expected here."""


class Backend:
    """A real HTTP/1.1 backend on 127.0.0.1; ``internal_base`` is the URL it writes in its links."""

    def __init__(self, name: str, internal_host: str = "wiki.internal", prefix: str = "",
                 tls: tuple[str, str] | None = None, tmp: Path | None = None) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        scheme = "https" if tls else "http"
        srv = self.server
        srv.name = name
        srv.internal_host = internal_host
        srv.prefix = prefix.rstrip("/") + "/" if prefix else ""
        srv.internal_base = f"{scheme}://{internal_host}:{self.port}{prefix.rstrip('/')}"
        srv.seen = []
        srv.websockets = 0
        srv.websockets_closed = 0
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            assert tmp is not None
            cert, key = tmp / f"{name}-cert.pem", tmp / f"{name}-key.pem"
            cert.write_text(tls[0])
            key.write_text(tls[1])
            ctx.load_cert_chain(str(cert), str(key))
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self.internal_url = f"{scheme}://{internal_host}:{self.port}{prefix}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list:
        return self.server.seen

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------- the outside pieces
class TcpDialer:
    """Opens a real TCP connection to an app's internal host:port (internal names → 127.0.0.1)."""

    def __init__(self) -> None:
        self.no_connector: set[str] = set()
        self.opened = 0
        self.principals: list[Principal | None] = []

    async def open(self, app: WebApp, principal: Principal | None) -> SocketStream:
        if app.name in self.no_connector:
            raise DialError("no_connector", "No connector of this application's group is available.", 503)
        url = urlsplit(app.internal_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            stream = await open_socket_stream("127.0.0.1", port, peer="connector-test")
        except OSError:
            raise DialError("unreachable", "The application could not be reached.", 502) from None
        self.opened += 1
        self.principals.append(principal)
        return stream


@dataclass
class User:
    upn: str
    password: str
    user_id: str
    totp: str = ""
    disabled: bool = False


class UserTable:
    """A ``SignIn`` over a fixed user table: password + TOTP, rotating single-use refresh tokens."""

    def __init__(self, users: Iterable[User], access_lifetime: int = 3600, session_lifetime: int = 86400) -> None:
        self.users = {u.upn: u for u in users}
        self.access_lifetime = access_lifetime
        self.session_lifetime = session_lifetime
        self.refresh_tokens: dict[str, tuple[str, str, int]] = {}  # token -> (user upn, sid, auth_time)
        self.sessions: dict[str, int] = {}  # sid -> end
        self.revoked: set[str] = set()
        self.refreshes = 0
        self.sign_outs: list[str] = []

    def _result(self, user: User, sid: str, auth_time: int) -> SignInResult:
        token = "rt_" + secrets.token_urlsafe(32)
        self.refresh_tokens[token] = (user.upn, sid, auth_time)
        end = self.sessions[sid]
        principal = Principal(user_id=user.user_id, upn=user.upn, session_id=sid,
                              amr=("pwd", "mfa") if user.totp else ("pwd",), auth_time=auth_time,
                              expires=min(end, int(time.time()) + self.access_lifetime))
        return SignInResult(principal=principal, refresh_token=token, session_expires=end)

    async def sign_in(self, upn: str, password: str, otp: str, source: str) -> SignInResult:
        user = self.users.get(upn)
        if user is None or not secrets.compare_digest(user.password, password):
            raise SignInError("auth_failed", "The user name or password is wrong.")
        if user.disabled:
            raise SignInError("account_disabled", "This account is disabled.", 403)
        if user.totp:
            if not otp:
                raise SignInError("mfa_required", "Enter the one-time code from your authenticator app.")
            if not pyotp.TOTP(user.totp).verify(otp, valid_window=1):
                raise SignInError("mfa_failed", "The one-time code is wrong.")
        sid = "s-" + secrets.token_hex(8)
        self.sessions[sid] = int(time.time()) + self.session_lifetime
        return self._result(user, sid, int(time.time()))

    async def refresh(self, refresh_token: str, source: str) -> SignInResult:
        entry = self.refresh_tokens.pop(refresh_token, None)
        if entry is None:
            raise SignInError("refresh_invalid", "Sign in again.")
        upn, sid, auth_time = entry
        if sid in self.revoked:
            raise SignInError("session_revoked", "This session has ended.")
        self.refreshes += 1
        return self._result(self.users[upn], sid, auth_time)

    async def sign_out(self, principal: Principal, refresh_token: str) -> None:
        self.revoked.add(principal.session_id)
        self.sign_outs.append(principal.session_id)


class Rules:
    """An ``Authorizer``: per-app allowed user ids (absent app: everyone), apps that need a
    compliant device, revoked sessions, disabled users; group ids and claims for SSO."""

    def __init__(self) -> None:
        self.allowed: dict[str, set[str]] = {}
        self.need_device: set[str] = set()
        self.revoked: set[str] = set()
        self.disabled: set[str] = set()
        self.groups: dict[str, tuple[str, ...]] = {}
        self.calls = 0

    def authorize(self, app: WebApp, principal: Principal, facts: RequestFacts) -> Verdict:
        self.calls += 1
        if principal.user_id in self.disabled:
            return Verdict(allowed=False, code="user_disabled", reason="Your account is disabled.")
        if principal.session_id in self.revoked:
            return Verdict(allowed=False, code="session_revoked", reason="Your session was ended by an administrator.")
        users = self.allowed.get(app.name)
        if users is not None and principal.user_id not in users:
            return Verdict(allowed=False, code="not_assigned", reason=f"You are not assigned to {app.name}.")
        if app.name in self.need_device and not principal.device_id:
            return Verdict(allowed=False, code="device_required", policy="compliant-devices",
                           reason="A compliant device is required: this browser has no Ferryman client agent.")
        return Verdict(allowed=True, groups=self.groups.get(principal.user_id, ()),
                       claims={"email": principal.upn, "name": principal.upn.split("@")[0].title()})


# ---------------------------------------------------------------------------- loop + door
class LoopThread:
    """A uvloop event loop (what nodes run on) in a daemon thread; ``run(coro)`` waits for a result."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args) -> Any:
        async def _call():
            return fn(*args)
        return self.run(_call())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Door:
    door: FrontDoor
    loop: LoopThread
    port: int
    pki: Pki
    users: UserTable
    rules: Rules
    dialer: TcpDialer
    records: list[TransactionRecord] = field(default_factory=list)
    backends: dict[str, Backend] = field(default_factory=dict)
    cookie_keys: str = ""  # the KeyRing text the door was started with

    def url(self, host: str, path: str = "/") -> str:
        return f"https://{host}:{self.port}{path}"

    def host(self, name: str) -> str:
        return f"{name}:{self.port}"

    def set_apps(self, apps: list[WebApp]) -> None:
        self.loop.call(self.door.set_apps, apps)

    def app(self, name: str, host: str, backend: Backend, **options: Any) -> WebApp:
        return WebApp(name=name, external_url=f"https://{host}:{self.port}" + options.pop("ext_path", ""),
                      internal_url=backend.internal_url, **options)

    def wait_record(self, predicate, timeout: float = 10.0) -> TransactionRecord:
        """The last record that satisfies ``predicate`` (waits for it: records come from the loop thread)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in list(self.records) if predicate(r)]
            if found or time.monotonic() > deadline:
                assert found, "no such transaction record"
                return found[-1]
            time.sleep(0.02)

    def wait_records(self, n: int, timeout: float = 10.0) -> list[TransactionRecord]:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.records)


ALICE = User("alice@corp.example", "correct horse battery", "u-alice", totp=pyotp.random_base32())
BOB = User("bob@corp.example", "bob's password 1", "u-bob")


class OidcFake:
    """An ``OidcSignIn`` standing in for the control plane's OIDC leg: code ``ok`` signs in Bob."""

    label = "Sign in with Test IdP"

    def __init__(self) -> None:
        self.table: UserTable | None = None

    async def begin(self, callback_url: str, state: str) -> str:
        return f"https://idp.test/authorize?state={state}"

    async def finish(self, params, callback_url: str, source: str) -> SignInResult:
        if params.get("code") != "ok" or self.table is None:
            raise SignInError("oidc_failed", "The external provider refused the sign-in.")
        sid = "s-" + secrets.token_hex(8)
        self.table.sessions[sid] = int(time.time()) + self.table.session_lifetime
        return self.table._result(BOB, sid, int(time.time()))


def start_door(tmp: Path, settings: WebSettings | None = None, users: Iterable[User] = (ALICE, BOB),
               access_lifetime: int = 3600, oidc: OidcFake | None = None) -> Door:
    pki = make_pki(tmp / "pki")
    port = free_port()
    base = settings or WebSettings()
    import msgspec
    settings = msgspec.structs.replace(base, auth_host=f"auth.test:{port}")
    loop = LoopThread()
    table = UserTable(users, access_lifetime=access_lifetime)
    rules = Rules()
    dialer = TcpDialer()
    records: list[TransactionRecord] = []
    if oidc is not None:
        oidc.table = table
    key_text = "k1:" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()

    async def make() -> FrontDoor:
        door = FrontDoor(settings, authorizer=rules, dialer=dialer, sign_in=table, cookie_keys=KeyRing.from_text(key_text),
                         signer=AssertionSigner.generate(), certificate=(pki.door_cert, pki.door_key),
                         on_record=records.append, oidc=oidc)
        await door.start("127.0.0.1", port)
        return door

    door = loop.run(make())
    return Door(door=door, loop=loop, port=port, pki=pki, users=table, rules=rules, dialer=dialer, records=records,
                cookie_keys=key_text)


def stop_door(d: Door) -> None:
    try:
        d.loop.run(d.door.close(), timeout=10)
    finally:
        d.loop.stop()
        for b in d.backends.values():
            b.stop()


# ---------------------------------------------------------------------------- clients
@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    version: str = ""

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""


def curl(d: Door, url: str, *args: str, jar: str | None = None, http2: bool = False, timeout: float = 20.0,
         data: bytes | None = None) -> Reply:
    """Run curl; parse the last response's status and headers (-D) and the body."""
    hosts = [h for h in HOSTS + ["custom.test"]]
    cmd = ["curl", "-sS", "--max-time", str(timeout), "--cacert", d.pki.ca_path, "-D", "-", "-o", "-"]
    for h in hosts:
        cmd += ["--resolve", f"{h}:{d.port}:127.0.0.1"]
    cmd += ["--http2"] if http2 else ["--http1.1"]
    if jar:
        cmd += ["-b", jar, "-c", jar]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    cmd += list(args) + [url]
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout + 10)
    if proc.returncode != 0 and not proc.stdout:
        raise RuntimeError(f"curl failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return parse_curl(proc.stdout)


def parse_curl(out: bytes) -> Reply:
    rest = out
    status, headers, version = 0, {}, ""
    while rest.startswith(b"HTTP/"):
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        version = lines[0].split(b" ")[0].decode()
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        if status != 100 and not (status == 101 and False):
            if not rest.startswith(b"HTTP/"):
                break
    return Reply(status, headers, rest, version)


def tls_socket(d: Door, host: str, alpn: list[str] | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=d.pki.ca_path)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response head from a socket (the body is left to the caller); also returns extra bytes."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0] else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


class WsClient:
    """A minimal RFC 6455 client over a TLS socket (HTTP/1.1 Upgrade)."""

    def __init__(self, d: Door, host: str, path: str, cookie: str = "") -> None:
        self.sock = tls_socket(d, host, ["http/1.1"])
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{d.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
        if cookie:
            req += f"Cookie: {cookie}\r\n"
        self.sock.sendall((req + "\r\n").encode())
        self.status, self.headers, self.buf = read_response(self.sock)
        self.accept_ok = self.headers.get("sec-websocket-accept") == base64.b64encode(
            hashlib.sha1(key.encode() + GUID).digest()).decode()

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, payload: bytes, opcode: int = 2) -> None:
        self.sock.sendall(_ws_frame(opcode, payload, mask=True))

    def recv(self) -> tuple[int, bytes] | None:
        return _ws_read(self._read)

    def close(self) -> None:
        self.sock.close()


class H2Client:
    """An HTTP/2 client over TLS built on the ``h2`` library (blocking, for tests)."""

    def __init__(self, d: Door, host: str, settings: dict | None = None) -> None:
        self.sock = tls_socket(d, host, ["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.authority = f"{host}:{d.port}".encode()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()
        self.events: list[h2.events.Event] = []
        self.remote_settings: dict = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, timeout: float = 10.0) -> list[h2.events.Event]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        events = self.conn.receive_data(data)
        for e in events:
            if isinstance(e, h2.events.RemoteSettingsChanged):
                self.remote_settings.update({k: v.new_value for k, v in e.changed_settings.items()})
        self.events.extend(events)
        self.flush()
        return events

    def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]] = (), body: bytes | None = None,
                end: bool = True, extra_pseudo: list[tuple[bytes, bytes]] = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", self.authority),
                (b":path", path.encode())] + list(extra_pseudo) + list(headers)
        self.conn.send_headers(sid, hdrs, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def response(self, sid: int, timeout: float = 10.0, ack: bool = True) -> tuple[int, dict[bytes, bytes], bytes, bool]:
        """(status, headers, body, reset) of a stream, read until it ends or is reset."""
        status, headers, body, done, reset = 0, {}, b"", False, False
        deadline = time.monotonic() + timeout
        seen = 0
        while not done and time.monotonic() < deadline:
            for e in self.events[seen:]:
                if getattr(e, "stream_id", None) != sid:
                    continue
                if isinstance(e, h2.events.ResponseReceived):
                    headers = dict(e.headers)
                    status = int(headers[b":status"])
                elif isinstance(e, h2.events.DataReceived):
                    body += e.data
                    if ack:
                        self.conn.acknowledge_received_data(e.flow_controlled_length, sid)
                elif isinstance(e, h2.events.StreamEnded):
                    done = True
                elif isinstance(e, h2.events.StreamReset):
                    done = reset = True
            seen = len(self.events)
            if not done:
                self.flush()
                self.pump(max(0.1, deadline - time.monotonic()))
        self.flush()
        return status, headers, body, reset

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        except Exception:  # noqa: BLE001
            pass
        self.sock.close()


def sign_in_with_curl(d: Door, jar: str, host: str, user: User = ALICE, path: str = "/hello",
                      http2: bool = False) -> Reply:
    """Sign in through the real redirect dance with curl and a cookie jar; the final response."""
    import re
    first = curl(d, d.url(host, path), jar=jar, http2=http2)
    assert first.status == 302, first
    form = curl(d, first.header("location"), jar=jar, http2=http2)
    assert form.status == 200, form
    csrf = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    nonce = re.search(rb'name="nonce" value="([^"]+)"', form.body).group(1).decode()
    target = re.search(rb'name="host" value="([^"]+)"', form.body).group(1).decode()
    otp = pyotp.TOTP(user.totp).now() if user.totp else ""
    from urllib.parse import urlencode
    body = urlencode({"csrf": csrf, "nonce": nonce, "host": target, "upn": user.upn, "password": user.password,
                      "otp": otp}).encode()
    return curl(d, d.url("auth.test", "/.ferryman/sign_in"), "-L", "-H",
                "Content-Type: application/x-www-form-urlencoded", "-H", f"Origin: https://auth.test:{d.port}",
                jar=jar, data=body, http2=http2)


def concurrent_map(fn, items, workers: int = 8) -> list:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def jar_cookies(jar: str, host: str) -> dict[str, str]:
    """The cookies curl's jar holds for ``host`` (Netscape format; HttpOnly lines are prefixed)."""
    out: dict[str, str] = {}
    for line in Path(jar).read_text().splitlines():
        if line.startswith("#HttpOnly_"):
            line = line[len("#HttpOnly_"):]
        elif line.startswith("#") or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) == 7 and parts[0].lstrip(".") == host:
            out[parts[5]] = parts[6]
    return out


def cookie_line(jar: str, host: str) -> str:
    return "; ".join(f"{k}={v}" for k, v in jar_cookies(jar, host).items())
