"""The backend side of the proxy: HTTP/1.1 over the dialer's byte stream, TLS, keep-alive pool.

- ``TlsStream`` runs TLS over any ``ByteStream`` (the dialer's tunnel flow) with
  ``ssl.MemoryBIO``: SNI and hostname verification use the app's internal host; the
  certificate is verified against the system store or the app's CA bundle unless the app
  turns verification off.
- ``BackendConnection`` writes one request head (``write_head``), streams a body
  (``Content-Length`` or chunked) and reads the response with httptools' response parser
  (``read_head`` / ``read_body``), skipping ``1xx`` interim responses; one parser serves a
  keep-alive connection's responses one after another, and bytes past a response (the
  backend out of step) make the connection not reusable. Limits: a response head above
  ``max_header_block`` bytes is a 502; a read that waits longer than the app's backend
  timeout is a 504 (``BackendTimeout``; one lazily moved timer per connection, not one per read).
- ``Pool`` keeps idle connections for reuse. Key: (app, sign-in session) — a connection
  opened for one user's session never carries another session's request, concurrently or
  later. Reason: backends bind state to connections (NTLM/Negotiate authenticate the TCP
  connection; some frameworks cache the first request's identity), so a shared connection
  could answer user B with user A's rights; the flow under it was granted for one user's
  decision. Passthrough apps (no user) share one anonymous key. A connection serves one
  request at a time (it is out of the pool while used). Bounds: ``pool_idle_per_key`` per
  key, ``pool_idle_total`` overall (oldest idle closed first), ``pool_idle_timeout``
  seconds idle. A request without a body that fails on a reused connection before any
  response byte (the backend closed it while idle) is retried once, on a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Protocol

import httptools

from .exchange import Headers
from .model import ByteStream

READ_SIZE = 65536


class BackendError(Exception):
    """The backend broke the exchange (closed, malformed response); ``status`` is 502."""

    status = 502
    code = "backend_error"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"


class BackendClosedEarly(BackendError):
    """Closed before any byte of a response: on a reused connection, the request may be retried."""

    code = "backend_closed"


class SocketStream(asyncio.Protocol):
    """A ``ByteStream`` over a TCP connection (a backend reached without a tunnel), read by
    ``read`` or, after ``attach``, handed to a sink as it arrives. Bytes not yet read are bounded:
    past ``READ_SIZE * 4`` (or while a sink holds them back) the socket is not read."""

    def __init__(self, peer: str = "") -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.write_paused = False
        self.drainer: asyncio.Future[None] | None = None
        self.sink: FlowSink | None = None
        self.read_paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            if not sink.flow_data(data):
                self._pause_reading(True)
            return
        self.chunks.append(data)
        self.size += len(data)
        if self.size > READ_SIZE * 4:
            self._pause_reading(True)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._ended()
        return True  # the backend may still be reading (a request body): the socket closes with ``close``

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.closed = True
        self._ended()
        self.write_paused = False
        if self.drainer is not None and not self.drainer.done():
            self.drainer.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drainer is not None and not self.drainer.done():
            self.drainer.set_result(None)

    def _ended(self) -> None:
        if self.sink is not None:
            self.sink.flow_ended()
        else:
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _pause_reading(self, on: bool) -> None:
        if on != self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = on
            if on:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # ByteStream
    async def read(self, max_bytes: int) -> bytes:
        while not self.chunks:
            if self.eof:
                return b""
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        data = self.chunks.popleft()
        if len(data) > max_bytes:
            self.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self.size -= len(data)
        if self.size <= READ_SIZE:
            self._pause_reading(False)
        return data

    def attach(self, sink: FlowSink | None) -> None:
        """Hand what arrives to ``sink`` (``None``: back to ``read``), first what is buffered."""
        self.sink = sink
        if sink is None:
            self._pause_reading(self.size > READ_SIZE * 4)
        else:
            self._deliver(sink)

    def release(self) -> None:
        """The sink takes bytes again after it held them back."""
        if self.sink is not None:
            self._deliver(self.sink)

    def _deliver(self, sink: FlowSink) -> None:
        while self.chunks and self.sink is sink:
            data = self.chunks.popleft()
            self.size -= len(data)
            if not sink.flow_data(data):
                self._pause_reading(True)
                return
        if self.sink is not sink:
            return
        self._pause_reading(False)
        if self.eof:
            sink.flow_ended()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        # a connection that has gone shows at the next read (b"": closed early, or mid-response)
        while self.write_paused and not self.closed:
            self.drainer = asyncio.get_running_loop().create_future()
            try:
                await self.drainer
            finally:
                self.drainer = None

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_socket_stream(host: str, port: int, peer: str = "") -> SocketStream:
    """A ``SocketStream`` to ``host:port``; ``OSError`` when it cannot be reached."""
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(lambda: SocketStream(peer), host, port)
    return stream


class ResponseSink(Protocol):
    """Who reads a ``BackendConnection``'s response in callbacks (``attach``)."""

    def backend_progress(self) -> bool: ...

    def backend_failed(self, exc: BackendError) -> None: ...

    def backend_expired(self, timeout: float) -> None: ...


class FlowSink(Protocol):
    """What a stream's ``attach`` hands its bytes to (``BackendConnection`` in callback mode)."""

    def flow_data(self, data: bytes) -> bool:
        """One piece; False: hold the rest back (tunnel credit, socket reads) until ``release``."""

    def flow_ended(self) -> None:
        """The stream ended: closed, reset or cut."""


class TlsStream:
    """TLS client over a ``ByteStream`` (memory BIOs: works over a tunnel flow as over a socket)."""

    def __init__(self, raw: ByteStream, context: ssl.SSLContext, server_hostname: str) -> None:
        self.raw = raw
        self.peer = getattr(raw, "peer", "")
        self.relay_edge = getattr(raw, "relay_edge", "")
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=False, server_hostname=server_hostname)
        self.closed = False

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.raw.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                await self.raw.drain()
                data = await self.raw.read(READ_SIZE)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
        self._flush()
        await self.raw.drain()

    async def read(self, max_bytes: int) -> bytes:
        while True:
            try:
                return self.obj.read(max_bytes)
            except ssl.SSLWantReadError:
                self._flush()
                data = await self.raw.read(READ_SIZE)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError:
                return b""

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.obj.write(data)
        except ssl.SSLError as exc:
            raise BackendError(f"TLS to the backend failed ({exc.reason or exc})") from None
        self._flush()

    async def drain(self) -> None:
        await self.raw.drain()

    def write_eof(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass
        self._flush()

    def close(self) -> None:
        self.closed = True
        self.raw.close()


def client_context(verify: bool, ca_pem: str = "") -> ssl.SSLContext:
    """The TLS context for an app's backend: verified (system store or ``ca_pem``) unless ``verify`` is off."""
    ctx = ssl.create_default_context(cadata=ca_pem or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ResponseHead:
    __slots__ = ("status", "headers", "version", "content_length", "chunked")

    def __init__(self, status: int, headers: Headers, version: str) -> None:
        self.status = status
        self.headers = headers
        self.version = version
        self.content_length: int | None = None
        self.chunked = False
        for n, v in headers:
            if n == b"content-length":
                try:
                    self.content_length = int(v)
                except ValueError:
                    self.content_length = None
            elif n == b"transfer-encoding":
                self.chunked = True


class BackendConnection:
    """One HTTP/1.1 connection to a backend; one request at a time."""

    def __init__(self, stream: ByteStream, key: tuple[str, str], max_head: int) -> None:
        self.stream = stream
        self.key = key
        self.peer = getattr(stream, "peer", "")
        self.relay_edge = getattr(stream, "relay_edge", "")
        self.max_head = max_head
        self.requests = 0
        self.idle_since = 0.0
        self.reusable = False
        self.closed = False
        self.parser: httptools.HttpResponseParser | None = None
        self._deadline = 0.0  # of the read under way (``_read``)
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task | None = None
        self._expired = False
        self._timeout = 0.0
        self._sink: ResponseSink | None = None  # callback mode (``attach``)
        # taken at the first read, then kept: asyncio.get_running_loop() and current_task()
        # without a loop cost a getpid() system call each on Python 3.11
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset_parser()

    def _reset_parser(self) -> None:
        # llhttp parses one response after another on a keep-alive connection: a parser is made
        # anew only for the first response and after one that was not read to a clean end
        # (``finished_cleanly``: a connection that ended any other way is not reused anyway).
        if self.parser is None or not self.finished_cleanly():
            self.parser = httptools.HttpResponseParser(self)
        self.head: ResponseHead | None = None
        self.interim = False
        self.headers: Headers = []
        self.trailers: Headers = []
        self.head_size = 0
        self.chunks: list[bytes] = []
        self.complete = False
        self.upgrade_tail: bytes | None = None
        self.got_bytes = False
        self.head_only = False
        self.keep_alive = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the response: out of step, they are not read (``_feed``)
            raise _OutOfStep()
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is not None:
            self.head_size += len(name) + len(value) + 4
            if self.head_size > self.max_head:
                raise BackendError(f"the backend's response trailers are larger than {self.max_head} bytes")
            self.trailers.append((name.lower(), value))
        else:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: skipped
            return
        size = 0
        for n, v in self.headers:
            size += len(n) + len(v) + 4
        if size > self.max_head:
            raise BackendError(f"the backend's response headers are larger than {self.max_head} bytes")
        self.head = ResponseHead(status, self.headers, "HTTP/" + self.parser.get_http_version())
        if self.head_only:
            raise _HeadDone()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is done
        self.complete = True

    # ------------------------------------------------------------------ request
    def write_head(self, method: str, target: str, headers: Headers) -> None:
        self.requests += 1
        self._reset_parser()
        self.head_only = method == "HEAD"
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
        for n, v in headers:
            lines += (n, b": ", v, b"\r\n")
        lines.append(b"\r\n")
        self.stream.write(b"".join(lines))

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.upgrade_tail = data[offset:]
            self.complete = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                self.complete = True
                return
            if isinstance(cause, _OutOfStep):
                self.keep_alive = False  # never reused: what follows could answer a later request
                return
            if isinstance(cause, BackendError):
                raise cause from None
            raise BackendError("the backend's response could not be read") from None
        except httptools.HttpParserError as exc:
            raise BackendError(f"the backend sent a malformed HTTP response ({exc})") from None

    def _arm(self, timeout: float) -> None:
        """Set the deadline of what the connection waits for. One timer per connection, moved only
        when it would fire too late (a timer that fires early re-arms itself): a read costs no
        timer of its own."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        deadline = loop.time() + timeout
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)

    async def _read(self, timeout: float) -> bytes:
        """The next bytes of the backend (``b""`` at its end) within ``timeout`` seconds. On expiry
        the waiting task is cancelled and the cancellation becomes ``BackendTimeout``, as
        ``asyncio.timeout`` does."""
        self._arm(timeout)
        task = asyncio.current_task(self._loop)
        self._reader = task
        try:
            return await self.stream.read(READ_SIZE)
        except asyncio.CancelledError:
            if self._expired and task is not None and task.uncancel() == 0:
                raise BackendTimeout(f"the application did not answer within {timeout:g} seconds") from None
            raise
        finally:
            self._reader = None
            self._expired = False

    def _expire(self) -> None:
        self._timer = None
        if self.closed or (self._reader is None and self._sink is None):
            return  # idle (in the pool or between reads): the next read arms it again
        loop = self._loop
        assert loop is not None  # set by the read that armed the timer
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        if self._reader is not None:
            self._expired = True
            self._reader.cancel()
        elif self._sink is not None:
            self._sink.backend_expired(self._timeout)

    # ------------------------------------------------------------------ callback mode
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the connection was first read or attached on."""
        assert self._loop is not None
        return self._loop

    def can_attach(self) -> bool:
        return hasattr(self.stream, "attach")

    def attach(self, sink: ResponseSink, timeout: float) -> None:
        """Read the response in callbacks instead of ``read_head``/``read_body``: after every
        piece of it ``sink.backend_progress()`` looks at ``head``, ``chunks`` and ``complete``
        (and returns False while it cannot pass bytes on: the stream then holds the backend back
        until ``release``); ``sink.backend_failed(exc)`` when the response breaks, and
        ``sink.backend_expired(timeout)`` when nothing arrived within ``timeout`` seconds
        (``extend`` moves that deadline)."""
        self._sink = sink
        self._arm(timeout)
        self.stream.attach(self)  # type: ignore[attr-defined]  # checked by can_attach

    def detach(self) -> None:
        if self._sink is not None:
            self._sink = None
            if not self.closed:
                self.stream.attach(None)  # type: ignore[attr-defined]

    def extend(self, timeout: float) -> None:
        self._arm(timeout)

    def release(self) -> None:
        self.stream.release()  # type: ignore[attr-defined]

    def flow_data(self, data: bytes) -> bool:
        sink = self._sink
        if sink is None or self.closed:
            return True
        self._deadline = self._loop.time() + self._timeout  # type: ignore[union-attr]
        try:
            self._take(data)
        except BackendError as exc:
            sink.backend_failed(exc)
            return True
        return sink.backend_progress()

    def flow_ended(self) -> None:
        sink = self._sink
        if sink is None or self.closed or self.complete:
            return
        failure = self._ended()
        if failure is None:
            sink.backend_progress()
        else:
            sink.backend_failed(failure)

    # ------------------------------------------------------------------ reading (both modes)
    def _take(self, data: bytes) -> None:
        """Parse the next bytes of the response; the head's size is bounded read by read."""
        if self.head is not None:
            self._feed(data)
            return
        self.got_bytes = True
        self._feed(data)
        if self.head is None:
            self.head_size += len(data)
            if self.head_size > self.max_head:
                raise BackendError(f"the backend's response headers are larger than {self.max_head} bytes")

    def _ended(self) -> BackendError | None:
        """The backend's stream ended before the response did: what that means (None: the end of
        a close-delimited body, which ends the response and the connection)."""
        head = self.head
        if head is None:
            if not self.got_bytes:
                return BackendClosedEarly("the application closed the connection without answering")
            return BackendError("the application closed the connection in the middle of its response headers")
        if head.content_length is None and not head.chunked:
            self.complete = True
            self.reusable = False
            return None
        return BackendError("the application closed the connection in the middle of its response")

    async def read_head(self, timeout: float) -> ResponseHead:
        """The response head (``1xx`` skipped); its size is bounded by ``max_head`` (read by read)."""
        while self.head is None:
            data = await self._read(timeout)
            if not data:
                raise self._ended() or BackendError("the application closed the connection")
            self._take(data)
        return self.head

    async def read_body(self, timeout: float) -> bytes | None:
        """The next piece of the response body; ``None`` at its end."""
        while True:
            if self.chunks:
                data = b"".join(self.chunks)
                self.chunks.clear()
                return data
            if self.complete:
                return None
            data = await self._read(timeout)
            if not data:
                failure = self._ended()
                if failure is None:
                    return None
                raise failure
            self._take(data)

    def finished_cleanly(self) -> bool:
        """The response ended on a message boundary and the backend keeps the connection open."""
        return self.complete and self.keep_alive and not self.head_only and self.upgrade_tail is None \
            and not self.chunks

    def usable(self) -> bool:
        """Not closed here, and its stream (under TLS: the stream below) not known to be over —
        a tunnel flow is when its connector went away, reset or ended it, a socket when the
        backend closed it — nor on its way out (a tunnel flow whose tunnel drains: it closes
        once its flows have ended)."""
        if self.closed:
            return False
        stream = getattr(self.stream, "raw", self.stream)
        return not getattr(stream, "closed", False) and not getattr(stream, "eof", False) \
            and not getattr(stream, "draining", False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sink = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.stream.close()


class _HeadDone(Exception):
    """A response to HEAD has no body whatever its headers say."""


class _OutOfStep(Exception):
    """The backend sent more than the response to the request (another response, say)."""


class Pool:
    """Idle backend connections per (app, session) key (see the module docstring)."""

    def __init__(self, per_key: int, total: int, idle_timeout: float) -> None:
        self.per_key = per_key
        self.total = total
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, str], collections.deque[BackendConnection]] = {}
        self._order: collections.OrderedDict[int, BackendConnection] = collections.OrderedDict()
        self.reused = 0
        self.opened = 0

    def __len__(self) -> int:
        return len(self._order)

    def acquire(self, key: tuple[str, str], now: float | None = None) -> BackendConnection | None:
        now = time.monotonic() if now is None else now
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used first: the least likely to have been closed
            self._order.pop(id(conn), None)
            if not idle:
                del self._idle[key]
            if now - conn.idle_since < self.idle_timeout and conn.usable():
                self.reused += 1
                return conn
            conn.close()
            idle = self._idle.get(key)
        return None

    def release(self, conn: BackendConnection, now: float | None = None) -> None:
        if conn.closed or not conn.reusable or self.per_key <= 0 or self.total <= 0:
            conn.close()
            return
        conn.idle_since = time.monotonic() if now is None else now
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = collections.deque()
        elif len(idle) >= self.per_key:
            old = idle.popleft()
            self._order.pop(id(old), None)
            old.close()
        idle.append(conn)
        self._order[id(conn)] = conn
        while len(self._order) > self.total:
            _, old = self._order.popitem(last=False)
            q = self._idle.get(old.key)
            if q is not None:
                try:
                    q.remove(old)
                except ValueError:
                    pass
                if not q:
                    del self._idle[old.key]
            old.close()

    def sweep(self, now: float | None = None) -> int:
        """Close connections idle longer than ``idle_timeout``; how many were closed."""
        now = time.monotonic() if now is None else now
        closed = 0
        for key in list(self._idle):
            q = self._idle[key]
            while q and now - q[0].idle_since >= self.idle_timeout:
                old = q.popleft()
                self._order.pop(id(old), None)
                old.close()
                closed += 1
            if not q:
                del self._idle[key]
        return closed

    def drop(self, app: str | None = None, session: str | None = None, peer: str | None = None) -> int:
        """Close idle connections of an app, a session and/or a connector (``peer``): app removed,
        session revoked, connector gone or draining."""
        closed = 0
        for key in list(self._idle):
            if (app is None or key[0] == app) and (session is None or key[1] == session):
                q = self._idle[key]
                for conn in [c for c in q if peer is None or c.peer == peer]:
                    q.remove(conn)
                    self._order.pop(id(conn), None)
                    conn.close()
                    closed += 1
                if not q:
                    del self._idle[key]
        return closed

    def close(self) -> None:
        self.drop()
