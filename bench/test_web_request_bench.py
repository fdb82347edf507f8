"""Micro-benchmark of the front door's per-request Python path (no sockets, no TLS).

Run: ``python -m pytest bench/test_web_request_bench.py --benchmark-enable``. One
``H1Connection`` gets 200 keep-alive requests written into it as a client would; the
backend is an in-memory ``ByteStream`` that answers each request head with a 1 KiB
response as nginx writes it. Measured per batch: parse the request, look up the app,
rate limits, session cookie, authorization, assertion, backend request head, backend
response parse, header translation, response framing. The TLS, socket and tunnel costs
come on top (``bench/web_frontdoor.py`` measures them with wrk). Under the project's
default ``--benchmark-disable`` each function runs once and checks every response.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from dataplane.edge.web import (
    AssertionSigner, FrontDoor, KeyRing, Principal, SignInError, Verdict, WebApp, WebSettings,
)
from dataplane.edge.web.http1 import H1Connection
from dataplane.edge.web.session import COOKIE, AppSession, Sealer
from tests.web_support import make_pki

pytestmark = pytest.mark.timeout(120)

REQUESTS = 200
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 16:58:01 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Fri, 04 Dec 2026 16:58:01 GMT\r\nConnection: keep-alive\r\nETag: \"6751-400\"\r\n"
            b"Accept-Ranges: bytes\r\n\r\n" + b"x" * 1024)


class _Backend:
    """Answers each request head at once, to ``read`` or, attached, to its sink (as a tunnel flow
    does: a pooled connection's request is then served in callbacks, ``proxy.Direct``)."""

    peer = "mem"

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.sink = None

    async def read(self, n: int) -> bytes:
        return await self.queue.get()

    def attach(self, sink) -> None:
        self.sink = sink
        while sink is not None and not self.queue.empty():
            sink.flow_data(self.queue.get_nowait())

    def release(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            if self.sink is not None:
                self.sink.flow_data(RESPONSE)
            else:
                self.queue.put_nowait(RESPONSE)

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Dial:
    async def open(self, app, principal):
        return _Backend()


class _Allow:
    def authorize(self, app, principal, facts):
        return Verdict(allowed=True, groups=("g-eng",), claims={"email": principal.upn})


class _NoSignIn:
    async def sign_in(self, *args):
        raise SignInError("auth_failed", "benchmark")

    refresh = sign_in

    async def sign_out(self, *args):
        return None


class _Transport:
    """Collects what the connection writes (the client side of the benchmark)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.done: asyncio.Event | None = None
        self.want = 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if len(self.out) >= self.want and self.done is not None:
            self.done.set()

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass

    def is_closing(self):
        return False

    def abort(self):
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    loop = uvloop.new_event_loop()
    keys = KeyRing.generate()

    async def make():
        door = FrontDoor(WebSettings(auth_host="auth.bench.test", app_rate=1e9, edge_rate=1e9), authorizer=_Allow(),
                         dialer=_Dial(), sign_in=_NoSignIn(), cookie_keys=keys, signer=AssertionSigner.generate(),
                         certificate=(pki.door_cert, pki.door_key))
        door.set_apps([WebApp(name="app", external_url="https://app.bench.test", internal_url="http://app.internal:80"),
                       WebApp(name="open", external_url="https://open.bench.test",
                              internal_url="http://app.internal:80", preauth="passthrough")])
        return door

    door = loop.run_until_complete(make())
    now = int(time.time())
    principal = Principal(user_id="3f1d2c4e-8a9b-4c1d-9e2f-1234567890ab", upn="alice@corp.example",
                          session_id="7a1d2c4e-8a9b-4c1d-9e2f-1234567890ab", amr=("pwd", "mfa"), auth_time=now,
                          expires=now + 3600)
    cookie = Sealer(keys).seal("app.bench.test", AppSession(principal, now + 3600, now))
    yield loop, door, cookie
    loop.close()


def _request(host: str, cookie: str = "") -> bytes:
    lines = [f"GET /files/1k?x=1 HTTP/1.1", f"Host: {host}", "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120",
             "Accept: text/html,application/xhtml+xml,*/*;q=0.8", "Accept-Encoding: gzip, deflate, br",
             "Accept-Language: en-GB,en;q=0.9"]
    if cookie:
        lines.append(f"Cookie: {COOKIE}={cookie}; theme=dark")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _batch(loop, door, request: bytes) -> list[bytes]:
    async def run() -> list[bytes]:
        conn = H1Connection(door)
        transport = _Transport()
        transport.done = asyncio.Event()
        transport.want = REQUESTS
        conn.connection_made(transport)
        for _ in range(REQUESTS):  # one at a time, as a keep-alive client without pipelining
            before = len(transport.out)
            conn.data_received(request)
            while len(transport.out) == before:
                await asyncio.sleep(0)
        conn.connection_lost(None)
        return transport.out

    return loop.run_until_complete(run())


def _check(out: list[bytes]) -> None:
    assert len(out) == REQUESTS
    assert all(o.startswith(b"HTTP/1.1 200 OK\r\n") and o.endswith(b"x" * 1024) for o in out)


def test_signed_in_requests(benchmark, setup) -> None:
    loop, door, cookie = setup
    out = benchmark(_batch, loop, door, _request("app.bench.test", cookie))
    _check(out)


def test_passthrough_requests(benchmark, setup) -> None:
    loop, door, _ = setup
    out = benchmark(_batch, loop, door, _request("open.bench.test"))
    _check(out)
