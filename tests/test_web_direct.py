"""The front door's callback-driven path (``proxy.Direct``): a bodiless HTTP/1.1 request on an
idle pooled backend connection, served in the stream's and the client connection's callbacks.

An ``H1Connection`` is driven as its TLS transport would drive it (``data_received``,
``pause_writing``/``resume_writing``, ``connection_lost``) and the backend is an in-memory
stream that hands its bytes over like a tunnel flow (``attach``/``release``): each test scripts
when and how the backend answers and checks what the client got, what the pool kept, what
credit was held, and the traffic record.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import pytest
import uvloop

from dataplane.edge.web import (
    AssertionSigner, FrontDoor, KeyRing, Principal, SignInError, TransactionRecord, Verdict, WebApp, WebSettings,
)
from dataplane.edge.web.http1 import H1Connection
from dataplane.edge.web.session import COOKIE, AppSession, Sealer
from web_support import make_pki

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


class MemStream:
    """A backend connection's byte stream; ``answer(stream, head)`` runs at each request head."""

    peer = "mem-connector"
    relay_edge = ""

    def __init__(self, answer: Callable[[MemStream, bytes], None]) -> None:
        self.answer = answer
        self.sink = None
        self.buffer: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.closed = False
        self.heads: list[bytes] = []
        self.held = 0  # pieces whose credit the sink held back
        self.released = 0
        self.waiter: asyncio.Future[None] | None = None

    # the backend's side
    def feed(self, data: bytes) -> None:
        if self.sink is not None:
            if not self.sink.flow_data(data):
                self.held += 1
            return
        self.buffer.append(data)
        self._wake()

    def end(self) -> None:
        self.eof = True
        if self.sink is not None:
            self.sink.flow_ended()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # ByteStream
    async def read(self, n: int) -> bytes:
        while not self.buffer:
            if self.eof or self.closed:
                return b""
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.buffer.popleft()

    def attach(self, sink) -> None:
        self.sink = sink
        while sink is not None and self.buffer and self.sink is sink:
            if not sink.flow_data(self.buffer.popleft()):
                self.held += 1
        if sink is not None and self.eof and self.sink is sink:
            sink.flow_ended()

    def release(self) -> None:
        self.released += 1

    def write(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            self.heads.append(data)
            self.answer(self, data)

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Dialer:
    def __init__(self) -> None:
        self.answers: list[Callable[[MemStream, bytes], None]] = []
        self.streams: list[MemStream] = []

    async def open(self, app, principal) -> MemStream:
        stream = MemStream(self.answers.pop(0) if self.answers else answer_now)
        self.streams.append(stream)
        return stream


def answer_now(stream: MemStream, head: bytes) -> None:
    stream.feed(OK)


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.writes = 0
        self.aborted = False
        self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data: bytes) -> None:
        self.out += data
        self.writes += 1

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed or self.aborted

    def abort(self):
        self.aborted = True


class Allow:
    def authorize(self, app, principal, facts):
        return Verdict(allowed=True, groups=("g-eng",))


class NoSignIn:
    async def sign_in(self, *args):
        raise SignInError("auth_failed", "test")

    refresh = sign_in

    async def sign_out(self, *args):
        return None


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, door: FrontDoor, dialer: Dialer, cookie: str,
                 records: list[TransactionRecord]) -> None:
        self.loop, self.door, self.dialer, self.cookie, self.records = loop, door, dialer, cookie, records

    def request(self, path: str = "/x", method: str = "GET") -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: app.test\r\nCookie: {COOKIE}={self.cookie}\r\n\r\n").encode()

    def client(self) -> tuple[H1Connection, Transport]:
        conn = H1Connection(self.door)
        transport = Transport()
        conn.connection_made(transport)
        return conn, transport

    async def until(self, check: Callable[[], bool], what: str) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async def pooled(self) -> tuple[H1Connection, Transport, MemStream]:
        """A client connection whose session has one idle pooled backend connection (its stream)."""
        conn, transport = self.client()
        await self.warm(conn, transport)
        return conn, transport, self.dialer.streams[-1]

    async def warm(self, conn: H1Connection, transport: Transport) -> None:
        """One request on the ordinary path, which opens the pooled backend connection."""
        before = len(self.records)
        conn.data_received(self.request("/warm"))
        await self.until(lambda: len(self.records) > before, "the first answer")
        assert transport.out.endswith(b"hello") and len(self.door.pool) == 1
        transport.out.clear()


@pytest.fixture
def harness(tmp_path):
    pki = make_pki(tmp_path)
    loop = uvloop.new_event_loop()
    keys = KeyRing.generate()
    dialer = Dialer()
    records: list[TransactionRecord] = []

    async def make() -> FrontDoor:
        door = FrontDoor(WebSettings(auth_host="auth.test", app_rate=1e9, edge_rate=1e9, idle_timeout=0.5,
                                     backend_timeout=0.4, header_timeout=0.3),
                         authorizer=Allow(), dialer=dialer, sign_in=NoSignIn(), cookie_keys=keys,
                         signer=AssertionSigner.generate(), certificate=(pki.door_cert, pki.door_key))
        door.set_apps([WebApp(name="app", external_url="https://app.test", internal_url="http://app.internal:80")])
        door.on_record = records.append
        return door

    door = loop.run_until_complete(make())
    now = int(time.time())
    principal = Principal(user_id="u-1", upn="alice@corp.example", session_id="s-1", amr=("pwd",), auth_time=now,
                          expires=now + 3600)
    cookie = Sealer(keys).seal("app.test", AppSession(principal, now + 3600, now))
    yield Harness(loop, door, dialer, cookie, records)
    loop.close()


def test_pooled_request_is_served_in_callbacks(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: asyncio.get_running_loop().call_soon(s.feed, OK)
        direct = harness.door.counters["web_direct"]
        conn.data_received(harness.request("/second?q=1"))
        assert harness.door.counters["web_direct"] == direct + 1 and harness.door.in_flight == 1
        await harness.until(lambda: transport.out.endswith(b"hello"), "the answer")
        assert transport.out.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: keep-alive" in transport.out
        assert stream.heads[-1].startswith(b"GET /second?q=1 HTTP/1.1\r\n")
        assert b"x-ferryman-jwt-assertion: " in stream.heads[-1] and b"cookie" not in stream.heads[-1].lower()
        rec = harness.records[-1]
        assert (rec.status, rec.path, rec.action, rec.bytes_out, rec.connector) == (200, "/second", "allow", 5,
                                                                                    "mem-connector")
        assert harness.door.in_flight == 0 and len(harness.door.pool) == 1 and stream.sink is None
        assert len(harness.dialer.streams) == 1  # the same backend connection again
        # answered while the request was being parsed (the bytes were there at attach): still idle-timed
        transport.out.clear()
        stream.answer = answer_now
        conn.data_received(harness.request("/third"))
        assert transport.out.endswith(b"hello") and not conn.queue and conn.deadline > 0
        await harness.until(lambda: transport.closed, "the idle connection to close")
        assert harness.door.counters["web_idle_closed"] == 1

    harness.loop.run_until_complete(run())


def test_pipelined_requests_behind_a_callback_request_keep_their_order(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        pending: list[MemStream] = []
        stream.answer = lambda s, head: pending.append(s)
        conn.data_received(harness.request("/a") + harness.request("/b") + harness.request("/c"))
        await asyncio.sleep(0.05)
        assert transport.out == b"" and len(conn.queue) == 3 and conn.queue[0].direct is not None
        first = pending.pop()
        first.answer = answer_now  # /b and /c: answered at once, on the ordinary path (they were queued)
        first.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
        await harness.until(lambda: transport.out.count(b"HTTP/1.1 200") == 3, "three answers")
        bodies = [part.rsplit(b"\r\n\r\n", 1)[1] for part in transport.out.split(b"HTTP/1.1 ")[1:]]
        assert bodies == [b"A", b"hello", b"hello"]
        assert [r.path for r in harness.records[-3:]] == ["/a", "/b", "/c"]

    harness.loop.run_until_complete(run())


def test_pooled_connection_the_backend_ended_is_not_used(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, old = await harness.pooled()
        old.end()  # the connector ended the idle flow (the backend closed its connection)
        conn.data_received(harness.request("/after"))
        await harness.until(lambda: transport.out.endswith(b"hello"), "the answer")
        assert old.closed and len(harness.dialer.streams) == 2 and harness.door.counters["web_backend_retry"] == 0

    harness.loop.run_until_complete(run())


def test_pooled_connection_closed_unanswered_goes_to_the_ordinary_path_once(harness: Harness) -> None:
    """The backend closes the pooled connection at the request, before any answer (its idle
    timeout crossing the request): already while the request begins (the stream has ended at
    attach), the request goes to the runner, which sends it once more on a new connection."""
    async def run() -> None:
        conn, transport, old = await harness.pooled()
        old.answer = lambda s, head: s.end()
        harness.dialer.answers.append(lambda s, head: s.end())  # the new connection closes too: no third try
        conn.data_received(harness.request("/after"))
        await harness.until(lambda: b"502" in transport.out[:20], "the 502 page")
        assert old.closed and len(harness.dialer.streams) == 2 and harness.door.counters["web_backend_retry"] == 1
        assert harness.records[-1].status == 502 and harness.records[-1].code == "backend_closed"
        assert harness.door.in_flight == 0 and not transport.closed  # the client connection goes on
        transport.out.clear()
        conn.data_received(harness.request("/fresh"))  # nothing pooled: a new connection, which answers
        await harness.until(lambda: transport.out.endswith(b"hello"), "the answer")
        assert len(harness.dialer.streams) == 3 and harness.records[-1].status == 200

    harness.loop.run_until_complete(run())


def test_a_post_is_not_retried(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: s.end()
        conn.data_received(harness.request("/form", "POST"))
        await harness.until(lambda: b"502" in transport.out[:20], "the 502 page")
        assert harness.records[-1].status == 502 and harness.records[-1].code == "backend_closed"
        assert len(harness.dialer.streams) == 1 and harness.door.counters["web_backend_retry"] == 0

    harness.loop.run_until_complete(run())


def test_client_that_stops_reading_holds_the_backend_back_then_is_cut(harness: Harness) -> None:
    """A piece's credit goes back once it is written to the client; while the client's socket
    is full it is held (the connector stops at the window), for at most idle_timeout."""
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: s.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
        conn.data_received(harness.request("/slow"))
        assert stream.held == 1 and stream.released == 0
        await harness.until(lambda: transport.out.endswith(b"ab"), "the first piece")
        assert stream.released == 1
        conn.pause_writing()  # the client's socket buffer is full
        stream.feed(b"cd")
        await harness.until(lambda: transport.out.endswith(b"cd"), "the second piece")
        await asyncio.sleep(0.02)
        assert stream.held == 2 and stream.released == 1  # written, but its credit is held
        conn.resume_writing()
        assert stream.released == 2
        conn.pause_writing()
        stream.feed(b"e")
        await harness.until(lambda: transport.aborted, "the client to be cut")  # idle_timeout 0.5 s
        assert harness.door.counters["web_client_write_timeout"] == 1 and stream.closed
        assert harness.records[-1].status == 200 and harness.door.in_flight == 0 and len(harness.door.pool) == 0

    harness.loop.run_until_complete(run())


def test_backend_that_does_not_answer_in_time_gets_504(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: None
        conn.data_received(harness.request("/stuck"))
        await harness.until(lambda: b"504" in transport.out[:20], "the 504 page")  # backend_timeout 0.4 s
        assert b"did not answer within 0.4 seconds" in transport.out
        rec = harness.records[-1]
        assert (rec.status, rec.code) == (504, "backend_timeout") and harness.dialer.streams[0].closed
        assert harness.door.counters["web_backend_timeout"] == 1 and len(harness.door.pool) == 0

    harness.loop.run_until_complete(run())


def test_backend_breaking_off_mid_response_cuts_the_client(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: s.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        conn.data_received(harness.request("/broken"))
        stream.end()
        assert transport.aborted and transport.out.endswith(b"partial")
        rec = harness.records[-1]
        assert (rec.status, rec.code, rec.bytes_out) == (200, "backend_error", 7) and stream.closed

    harness.loop.run_until_complete(run())


def test_malformed_backend_response_is_a_502_page(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: s.feed(b"HTTP/1.1 2x0 NOPE\r\n\r\n")
        conn.data_received(harness.request("/garbled"))
        assert transport.out.startswith(b"HTTP/1.1 502 ") and harness.records[-1].status == 502
        assert harness.door.in_flight == 0 and len(harness.door.pool) == 0

    harness.loop.run_until_complete(run())


def test_client_gone_mid_response_closes_the_backend_connection(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: s.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        conn.data_received(harness.request("/left"))
        await harness.until(lambda: transport.out.endswith(b"some"), "the first piece")
        conn.connection_lost(None)
        assert stream.closed and len(harness.door.pool) == 0 and harness.door.in_flight == 0
        assert harness.records[-1].status == 200 and harness.records[-1].bytes_out == 4
        stream.feed(b"more")  # late bytes of a flow whose request is over: dropped
        assert harness.records[-1].path == "/left" and len(harness.records) == 2

    harness.loop.run_until_complete(run())


def test_pieces_of_one_read_go_to_the_client_in_one_write(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"

        def burst(s: MemStream) -> None:  # a hostile or bursty connector: many tiny frames in one read
            for _ in range(1000):
                s.feed(b"x")

        stream.answer = lambda s, h: (s.feed(head), asyncio.get_running_loop().call_soon(burst, s))
        writes = transport.writes
        conn.data_received(harness.request("/burst"))
        await harness.until(lambda: transport.out.endswith(b"x" * 1000), "the first half")
        assert transport.writes - writes == 1
        burst(stream)  # the second half ends the response: head of nothing, body and end in one write
        assert transport.writes - writes == 2 and transport.out.endswith(b"x" * 2000)
        assert harness.records[-1].bytes_out == 2000 and len(harness.door.pool) == 1

    harness.loop.run_until_complete(run())


def test_complete_response_waits_for_the_client_to_take_it(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: None
        conn.data_received(harness.request("/one") + harness.request("/two"))
        conn.pause_writing()
        stream.feed(OK)  # the whole response, into a socket buffer that is full
        assert len(harness.door.pool) == 1 and harness.door.in_flight == 1  # the backend's part is over
        await asyncio.sleep(0.05)
        assert len(conn.queue) == 2 and len(stream.heads) == 2  # /two waits, as after the coroutine path's end
        stream.answer = answer_now
        conn.resume_writing()
        await harness.until(lambda: len(harness.records) == 3, "the second answer")
        assert [r.path for r in harness.records[-2:]] == ["/one", "/two"] and harness.door.in_flight == 0
        transport.out.clear()
        stream.answer = lambda s, head: None
        conn.data_received(harness.request("/three"))
        conn.pause_writing()
        stream.feed(OK)
        await harness.until(lambda: transport.aborted, "the stalled client to be cut")  # idle_timeout 0.5 s
        assert harness.door.counters["web_client_write_timeout"] == 1 and harness.records[-1].path == "/three"
        assert harness.door.in_flight == 0

    harness.loop.run_until_complete(run())


def test_partial_next_head_behind_an_answer_is_header_timed(harness: Harness) -> None:
    """A request and the start of the next in one read: once the first is answered, the rest of
    the second head must come within header_timeout (on either path), or the connection goes."""
    async def run() -> None:
        for warm in (True, False):
            conn, transport = harness.client()
            if warm:
                await harness.warm(conn, transport)  # pooled: the first request is served in callbacks
            else:
                harness.door.pool.close()
            conn.data_received(harness.request("/first") + b"GET /second HTTP/1.1\r\nHo")
            await harness.until(lambda: transport.out.endswith(b"hello"), "the first answer")
            conn.data_received(b"st: app")  # trickling
            await harness.until(lambda: transport.closed or transport.aborted, "the connection to go")
            assert b"408" in transport.out.split(b"hello", 1)[1][:20]
        assert harness.door.counters["web_header_timeout"] == 2

    harness.loop.run_until_complete(run())


def test_no_request_is_served_after_an_answer_closed_the_connection(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        harness.door.draining = True  # answers close their connections
        conn.data_received(harness.request("/one") + harness.request("/two"))
        assert transport.closed and transport.out.endswith(b"hello") and transport.out.count(b"HTTP/1.1 ") == 1
        await asyncio.sleep(0.05)
        assert len(stream.heads) == 2 and b"/two" not in stream.heads[-1]  # the warm-up's and /one's
        assert [r.path for r in harness.records] == ["/warm", "/one"]

    harness.loop.run_until_complete(run())


def test_request_whose_client_closes_while_the_backend_fails_is_recorded(harness: Harness) -> None:
    async def run() -> None:
        conn, transport, stream = await harness.pooled()
        stream.answer = lambda s, head: None
        conn.data_received(harness.request("/closing"))
        conn.close()  # the edge closes the client connection; connection_lost has not come yet
        stream.end()  # no answer: not retried for a client that is gone
        assert harness.records[-1].path == "/closing" and harness.door.counters["web_backend_retry"] == 0
        assert harness.door.in_flight == 0 and len(harness.dialer.streams) == 1

    harness.loop.run_until_complete(run())
