"""HTTP/1.1 server side of the front door: an asyncio Protocol around httptools (llhttp).

Parser choice, measured on this machine (2 cores, Python 3.11, idle, ``bench/test_http_parse_bench.py``,
pytest-benchmark medians):

==========================================  ===========  ===========  =======
workload                                    httptools    h11          ratio
==========================================  ===========  ===========  =======
one browser request head (13 lines)         2.9 µs       50 µs        17×
16 pipelined heads in one read              34 µs        747 µs       22×
1 MiB body, Content-Length, 64 KiB reads    50 µs        204 µs       4×
1 MiB body, chunked (4 KiB chunks)          82 µs        1679 µs      20×
==========================================  ===========  ===========  =======

httptools is picked: a request head costs 3 µs instead of 50 µs (h11 alone would be about
as much as the whole rest of a proxied request, ~50 µs in ``bench/test_web_request_bench.py``),
and chunked bodies stream 20× cheaper. llhttp is also strict where it matters for a proxy: it
refuses ``Transfer-Encoding`` together with ``Content-Length``, bare CR/LF and malformed
chunk sizes (request smuggling). What httptools lacks, this module adds: limits on the
request line and header block (httptools would buffer a header without end), timeouts,
pipelining order and back-pressure. The backend side (``backend.py``) uses httptools'
response parser for the same reasons.

Behaviour:

- Keep-alive (HTTP/1.1 default; HTTP/1.0 connections close after one response) and
  pipelining: requests are answered strictly in order by one task per connection; while
  ``pipeline_depth`` requests wait, the socket is not read.
- Limits: request target > ``max_url_length`` → 414; head > ``max_header_block`` bytes
  or > ``max_headers`` lines → 431; declared ``Content-Length`` > ``max_body_size`` → 413
  before any body is read; a chunked body growing past it → 413 (or the connection is cut
  if the response had started). Malformed requests → 400; ``CONNECT`` and
  ``absolute-form``/``*`` targets → 400/405. Every refusal closes the connection after its page.
- Timeouts: the head of a request must arrive within ``header_timeout`` (408, then close);
  a keep-alive connection idle for ``idle_timeout`` is closed; a request body that stalls
  for ``idle_timeout`` gets 408; a client that does not read its response for
  ``idle_timeout`` is cut.
- ``Expect: 100-continue``: ``100 Continue`` is sent when the handler first reads the body,
  so a request refused before that (sign-in, policy, 413) never uploads its body; the
  connection is then closed because the body was not read.
- Request bodies stream through a bounded buffer (``buffer_size``; above it the socket is
  paused). Request trailers are read and dropped. Responses are ``Content-Length`` framed
  when the length is known, chunked otherwise; head and first body piece go out in one write.
- ``Upgrade: websocket``: after the handler's ``upgrade`` (101) the connection becomes a raw
  byte stream (``H1Upgraded``) with the same back-pressure.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from .exchange import BodyTooLarge, ClientGone, ClientTimeout, Headers, Request, normalize_host
from .pages import error_page, html_headers, reason_phrase

log = logging.getLogger("ferryman.edge.web")

Handler = Callable[[Request, Any], Awaitable[None]]


# Response header names the connection sets itself (framing), and Content-Length, which it reads.
_OWN_FRAMING = frozenset({b"transfer-encoding", b"keep-alive", b"connection", b"content-length"})


class _Refuse(Exception):
    def __init__(self, status: int, reason: str, code: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code


class H1Body:
    """The request body of one exchange, buffered up to ``buffer_size`` bytes."""

    __slots__ = ("conn", "chunks", "size", "received", "complete", "waiter", "expect_continue", "error",
                 "discard", "limit", "exchange")

    def __init__(self, conn: H1Connection, exchange: H1Exchange, expect_continue: bool, complete: bool,
                 limit: int) -> None:
        self.conn = conn
        self.exchange = exchange
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.received = 0
        self.complete = complete
        self.waiter: asyncio.Future[None] | None = None
        self.expect_continue = expect_continue
        self.error: BaseException | None = None
        self.discard = False
        self.limit = limit

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            self.error = BodyTooLarge()
            self.conn.counters["web_body_too_large"] += 1
            self._wake()
            return
        if self.discard:
            return
        self.chunks.append(data)
        self.size += len(data)
        self._wake()

    def end(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self) -> bytes:
        if self.expect_continue:
            self.expect_continue = False
            responder = self.exchange.responder
            if responder is None or not responder.started:
                self.conn.send_continue()
        while True:
            if self.chunks:
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.size = 0
                self.conn.body_drained()
                return data
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self.waiter = self.conn.loop.create_future()
            try:
                async with asyncio.timeout(self.conn.settings.idle_timeout):
                    await self.waiter
            except TimeoutError:
                raise ClientTimeout() from None
            finally:
                self.waiter = None


class H1Responder:
    """The response of one exchange (see ``exchange.Responder``)."""

    __slots__ = ("conn", "exchange", "started", "finished", "bytes_sent", "chunked", "pending", "no_body",
                 "upgraded", "status")

    def __init__(self, conn: H1Connection, exchange: H1Exchange) -> None:
        self.conn = conn
        self.exchange = exchange
        self.started = False
        self.finished = False
        self.bytes_sent = 0
        self.chunked = False
        self.pending = b""
        self.no_body = False
        self.upgraded = False
        self.status = 0

    def _head(self, status: int, headers: Headers) -> bytes:
        ex = self.exchange
        self.status = status
        self.no_body = ex.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if ex.refusal is not None or ex.body is not None and not ex.body.complete:
            ex.keep_alive = False  # a body not (yet) read to its end: close after this response
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
        has_length = False
        for name, value in headers:
            if name in _OWN_FRAMING:
                if name == b"content-length":
                    has_length = True
                elif name != b"connection" or status != 101:
                    continue
            lines += (name, b": ", value, b"\r\n")
        if not self.no_body and not has_length:
            if ex.version == "HTTP/1.1":
                self.chunked = True
            else:
                ex.keep_alive = False  # close-delimited for an HTTP/1.0 client
        if self.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if status != 101:
            lines.append(b"connection: keep-alive\r\n" if ex.keep_alive else b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # The writes themselves are synchronous (``begin``/``push``/``finish``/``reply``: what the
    # front door's callback-driven path uses); the coroutines add the wait for the client to take
    # the bytes (``H1Connection.drain``).
    def begin(self, status: int, headers: Headers) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.pending = self._head(status, headers)

    def push(self, data: bytes) -> None:
        if self.finished or self.conn.closed:
            raise ClientGone()
        if self.no_body or not data:
            if self.pending:
                self.conn.write(self.pending)
                self.pending = b""
            return
        self.bytes_sent += len(data)
        if self.chunked:
            data = b"%x\r\n" % len(data) + data + b"\r\n"
        if self.pending:
            data = self.pending + data
            self.pending = b""
        self.conn.write(data)

    def finish(self, trailers: Headers | None = None, data: bytes = b"") -> None:
        """End the response, with its last piece ``data`` (head, piece and end in one write)."""
        if self.finished:
            return
        if self.conn.closed:
            raise ClientGone()
        out = self.pending
        self.pending = b""
        if data and not self.no_body:
            self.bytes_sent += len(data)
            out += (b"%x\r\n" % len(data) + data + b"\r\n") if self.chunked else data
        if self.chunked:
            out += b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers or ()) + b"\r\n"
        self.finished = True
        if out:
            self.conn.write(out)

    def reply(self, status: int, headers: Headers, body: bytes = b"") -> None:
        self.begin(status, headers)
        self.finish(None, body)

    async def start(self, status: int, headers: Headers, *, end: bool = False) -> None:
        self.begin(status, headers)
        if end:
            await self.end()

    async def send(self, data: bytes) -> None:
        self.push(data)
        if data and not self.no_body:
            await self.conn.drain()

    async def end(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self.finish(trailers)
        await self.conn.drain()

    async def respond(self, status: int, headers: Headers, body: bytes = b"") -> None:
        self.reply(status, headers, body)
        await self.conn.drain()

    @property
    def held(self) -> bool:
        """The client does not take bytes now (its socket's write buffer is above its limit)."""
        return self.conn.write_paused

    def settle(self) -> None:
        """A request served in callbacks (``proxy.Direct``) has ended: on to the next one."""
        self.conn.direct_done(self.exchange)

    @property
    def gone(self) -> bool:
        """The client connection is closed or closing: nothing more reaches it."""
        return self.conn.closed

    def hand_back(self) -> None:
        """A request begun in callbacks goes to the connection's runner (``request.plan``)."""
        self.conn.direct_fallback(self.exchange)

    def close_after(self) -> None:
        """The connection closes once this response is out (it is not kept alive)."""
        self.exchange.keep_alive = False

    async def upgrade(self, status: int, headers: Headers) -> H1Upgraded:
        if self.exchange.upgrade is None:
            raise RuntimeError("this request did not ask for an upgrade")
        self.started = self.finished = self.upgraded = True
        self.status = status
        self.conn.write(self._head(status, headers))
        self.exchange.keep_alive = False
        return self.exchange.upgrade

    def abort(self) -> None:
        self.finished = True
        self.conn.abort()


class H1Upgraded:
    """The client side of an upgraded (WebSocket) HTTP/1.1 connection, as a ``ByteStream``."""

    peer = ""

    def __init__(self, conn: H1Connection) -> None:
        self.conn = conn
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)
            if self.size > self.conn.settings.buffer_size:
                self.conn.pause(True, "upgrade")
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self, max_bytes: int) -> bytes:
        while not self.chunks:
            if self.eof or self.conn.closed:
                return b""
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        data = self.chunks.popleft()
        if len(data) > max_bytes:
            self.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self.size -= len(data)
        if self.size <= self.conn.settings.buffer_size // 4:
            self.conn.pause(False, "upgrade")
        return data

    def write(self, data: bytes) -> None:
        if not self.conn.closed:
            self.conn.write(data)

    async def drain(self) -> None:
        await self.conn.drain()

    def write_eof(self) -> None:
        self.conn.close()  # TLS cannot half-close: the other direction has ended, so the splice ends

    def close(self) -> None:
        self.conn.close()


class H1Exchange:
    __slots__ = ("request", "responder", "body", "method", "version", "keep_alive", "refusal", "upgrade", "direct")

    def __init__(self) -> None:
        self.request: Request | None = None
        self.responder: H1Responder | None = None
        self.body: H1Body | None = None
        self.method = "GET"
        self.version = "HTTP/1.1"
        self.keep_alive = True
        self.refusal: _Refuse | None = None
        self.upgrade: H1Upgraded | None = None
        self.direct: Any = None  # proxy.Direct while the request is served in callbacks


class H1Connection(asyncio.Protocol):
    """One client connection speaking HTTP/1.1 (after TLS and ALPN)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.settings = server.settings
        self.counters = server.counters
        self.handler: Handler = server.handle
        self.begin: Callable[[Request, H1Responder], Any] | None = getattr(server, "begin", None)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.queue: collections.deque[H1Exchange] = collections.deque()
        self.parsing: H1Exchange | None = None
        self.runner: asyncio.Task[None] | None = None
        self.idle: asyncio.Future[None] | None = None  # what the runner waits on between requests
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.deadline_head = False
        self.in_head = False
        self.head_bytes = 0
        self.url = b""
        self.headers: Headers = []
        self.header_bytes = 0
        self.paused: set[str] = set()
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.upgraded: H1Upgraded | None = None
        self.upgrading: H1Exchange | None = None
        self.stop_input = False
        self.source_ip = ""
        self.source_port = 0
        self.tls_context = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio's or uvloop's TLS transport
        transport.set_write_buffer_limits(high=self.settings.buffer_size, low=self.settings.buffer_size // 4)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.source_ip, self.source_port = str(peer[0]), int(peer[1])
        sslobj = transport.get_extra_info("ssl_object")
        self.tls_context = sslobj.context if sslobj is not None else None
        self._arm(self.settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        direct = self.queue[0].direct if self.queue else None
        if direct is not None:
            direct.client_gone()
        self._disarm()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for ex in self.queue:
            if ex.body is not None:
                ex.body.fail(ClientGone())
        if self.upgraded is not None:
            self.upgraded.feed_eof()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ClientGone())
        if self.runner is not None and not self.runner.done() and self.upgraded is None:
            self.runner.cancel()
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        if self.queue:
            direct = self.queue[0].direct
            if direct is not None:
                direct.client_resumed()

    def data_received(self, data: bytes) -> None:
        if self.upgraded is not None:
            self.upgraded.feed(data)
            return
        if self.stop_input or self.closed:
            return
        if not self.in_head and self.parsing is None:
            self.in_head = True
            self.head_bytes = 0
            self._arm(self.settings.header_timeout, head=True)
        head_at_start = self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            ex, self.upgrading = self.upgrading, None
            self.parsing = None
            if ex is not None and ex.upgrade is not None:
                self.upgraded = ex.upgrade
                ex.upgrade.feed(data[offset:])
            self.stop_input = True
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                return
            if isinstance(cause, _Refuse):
                self._refuse(cause)
            else:
                log.warning("HTTP/1.1 request handling failed: %r", cause)
                self._refuse(_Refuse(400, "The request could not be read.", "bad_request"))
            return
        except httptools.HttpParserError as exc:
            self.counters["web_bad_request"] += 1
            detail = str(exc).split(":")[-1].strip() or "malformed request"
            self._refuse(_Refuse(400, f"The request is not valid HTTP/1.1 ({detail}).", "bad_request"))
            return
        if self.in_head:
            # a head that began inside this chunk is counted from the next chunk on (at most one read more)
            self.head_bytes += len(data) if head_at_start else 0
            if self.head_bytes > self.settings.max_header_block:
                self.counters["web_header_too_large"] += 1
                self._refuse(_Refuse(431, f"The request's headers are larger than {self.settings.max_header_block} "
                                          "bytes.", "header_too_large"))

    # ------------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        if not self.queue and not self.deadline_head:
            # a head begun in the read that ended the last one (answered already, in callbacks)
            self._arm(self.settings.header_timeout, head=True)
        self.in_head = True
        self.head_bytes = 0
        self.url = b""
        self.headers = []
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.settings.max_url_length:
            self.counters["web_url_too_long"] += 1
            raise _Refuse(414, f"The address is longer than {self.settings.max_url_length} bytes.", "url_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is not None:  # trailers of a chunked body: read and dropped
            self.header_bytes += len(name) + len(value) + 4
            if self.header_bytes > self.settings.max_header_block:
                raise _Refuse(431, "The request's trailers are too large.", "header_too_large")
            return
        self.headers.append((name.lower(), value))  # sizes: per read while the head is incomplete, summed at its end
        if len(self.headers) > self.settings.max_headers:
            self.counters["web_header_too_large"] += 1
            raise _Refuse(431, f"The request has more than {self.settings.max_headers} header lines.",
                          "too_many_headers")

    def on_headers_complete(self) -> None:
        if self.closed or self.stop_input:
            raise _Stop()  # closed by an answer given in this read (in callbacks): nothing more is served
        self.in_head = False
        self._disarm()
        parser = self.parser
        ex = H1Exchange()
        ex.method = method = parser.get_method().decode("ascii", "replace")
        ex.version = "HTTP/" + parser.get_http_version()
        ex.keep_alive = parser.should_keep_alive() and ex.version == "HTTP/1.1" and not self.server.draining
        headers = self.headers
        target = self.url.decode("latin-1")
        hosts: list[bytes] = []
        content_length: int | None = None
        chunked = expect = False
        upgrade_tokens = b""
        size = len(self.url)
        for n, v in headers:  # one pass over the header lines
            size += len(n) + len(v) + 4
            if n == b"host":
                hosts.append(v)
            elif n == b"content-length":
                content_length = int(v)  # llhttp has checked it is a number and not repeated differently
            elif n == b"transfer-encoding":
                chunked = True
            elif n == b"expect":
                expect = v.lower() == b"100-continue"
            elif n == b"upgrade":
                upgrade_tokens += v.lower() + b","
        has_body = chunked or bool(content_length)
        host = normalize_host(hosts[0]) if len(hosts) == 1 else ""
        refusal: _Refuse | None = None
        if size > self.settings.max_header_block:
            self.counters["web_header_too_large"] += 1
            refusal = _Refuse(431, f"The request's headers are larger than {self.settings.max_header_block} bytes.",
                              "header_too_large")
        elif method == "CONNECT":
            refusal = _Refuse(405, "CONNECT is not served here: this is not a forward proxy.", "method_not_allowed")
        elif not target.startswith("/"):
            refusal = _Refuse(400, "The request target must be a path (origin form).", "bad_target")
        elif not host:
            refusal = _Refuse(400, "The request needs exactly one valid Host header.", "bad_host")
        elif content_length is not None and content_length > self.settings.max_body_size:
            self.counters["web_body_too_large"] += 1
            refusal = _Refuse(413, f"The request body is larger than {self.settings.max_body_size} bytes.",
                              "body_too_large")
        if refusal is not None:
            ex.refusal = refusal
            ex.keep_alive = False
            self.stop_input = True
            self.queue.append(ex)
            self._run()
            raise _Stop()
        body = H1Body(self, ex, expect_continue=expect and has_body and ex.version == "HTTP/1.1",
                      complete=not has_body, limit=self.settings.max_body_size)
        websocket = parser.should_upgrade() and method == "GET" and b"websocket" in upgrade_tokens
        if parser.should_upgrade():
            ex.upgrade = H1Upgraded(self)
            ex.keep_alive = False
            self.upgrading = ex  # llhttp completes the message before it reports the upgrade
        ex.body = body
        ex.request = Request(method=method, target=target, host=host, headers=headers,
                             version=ex.version, source_ip=self.source_ip, source_port=self.source_port, body=body,
                             content_length=content_length, has_body=has_body, websocket=websocket,
                             tls_context=self.tls_context, start=time.time())
        ex.responder = H1Responder(self, ex)
        self.parsing = ex
        self.queue.append(ex)
        if len(self.queue) >= self.settings.pipeline_depth:
            self.pause(True, "pipeline")
        if not has_body and ex.upgrade is None and len(self.queue) == 1 and not self.write_paused \
                and self.begin is not None:
            # nothing ahead of it and the client takes its bytes: served in callbacks if it can be
            direct = self.begin(ex.request, ex.responder)
            if direct is not None:
                if not direct.over:  # (it may have ended, or gone to the runner, while beginning)
                    ex.direct = direct
                return
        self._run()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.body is None:
            return
        ex.body.feed(body)
        if ex.body.error is not None:
            self.stop_input = True
            raise _Stop()
        if ex.body.size > self.settings.buffer_size:
            self.pause(True, "body")

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        self.in_head = False
        if ex is not None and ex.body is not None:
            ex.body.end()
        if not self.queue:
            self._arm_between()  # answered already (in callbacks): idle from now

    # ------------------------------------------------------------------ exchanges
    def _run(self) -> None:
        """Have the connection's one runner task serve the queue (it waits between requests
        instead of ending, so a keep-alive request costs no task of its own)."""
        idle = self.idle
        if idle is not None:
            self.idle = None
            if not idle.done():
                idle.set_result(None)
        elif self.runner is None or self.runner.done():
            self.runner = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            await self._serve_queue()
            if self.closed or self.upgraded is not None or self.stop_input:
                return
            if not self.queue or self.queue[0].direct is not None:
                self.idle = self.loop.create_future()
                try:
                    await self.idle
                finally:
                    self.idle = None

    async def _serve_queue(self) -> None:
        while self.queue and not self.closed:
            ex = self.queue[0]
            if ex.direct is not None:
                return  # served in callbacks; its end runs the queue on (``direct_done``)
            if ex.refusal is not None:
                r = ex.refusal
                body = error_page(r.status, r.reason, r.code)
                try:
                    await H1Responder(self, ex).respond(r.status, html_headers(body), body)
                except ClientGone:
                    pass
                self.server.refused(r.status, r.code, self.source_ip)
                self.close()
                return
            assert ex.request is not None and ex.responder is not None
            resp = ex.responder
            try:
                await self.handler(ex.request, resp)
            except ClientGone:
                self.abort()
                return
            except asyncio.CancelledError:
                self.abort()
                raise
            except Exception:  # noqa: BLE001 - one request's failure must not end the process
                log.exception("web request failed: %s %s", ex.method, ex.request.path)
                if not resp.started:
                    page = error_page(500, "The edge could not handle this request.", "internal_error")
                    try:
                        await resp.respond(500, html_headers(page), page)
                    except ClientGone:
                        pass
                self.abort()
                return
            if resp.upgraded:
                return  # the splice has ended; the connection goes with it
            if not self._finished(ex):
                return
        self._arm_between()

    def _arm_between(self) -> None:
        """No request is being answered: the connection idles, or the next head (begun in the same
        read as the last request, then trickling) must arrive within ``header_timeout``."""
        if self.closed or self.parsing is not None:
            return
        if self.in_head:
            self._arm(self.settings.header_timeout, head=True)
        else:
            self._arm(self.settings.idle_timeout)

    def _finished(self, ex: H1Exchange) -> bool:
        """An exchange's handler is done: True when the connection goes on to the next request."""
        assert ex.responder is not None
        if not ex.responder.finished:
            self.abort()
            return False
        self.queue.popleft()
        if ex.body is not None and not ex.body.complete:
            ex.keep_alive = False  # the body was not read: the stream cannot be re-synchronised
        if not ex.keep_alive:
            self.close()
            return False
        if len(self.queue) < self.settings.pipeline_depth:
            self.pause(False, "pipeline")
        return True

    def direct_done(self, ex: H1Exchange) -> None:
        ex.direct = None
        if self.closed or not self.queue or self.queue[0] is not ex:
            return
        if not self._finished(ex):
            return
        if self.queue:
            self._run()
        else:
            self._arm_between()

    def direct_fallback(self, ex: H1Exchange) -> None:
        ex.direct = None
        if not self.closed:
            self._run()

    def send_continue(self) -> None:
        if not self.closed:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def body_drained(self) -> None:
        if "body" in self.paused:
            self.pause(False, "body")

    def _refuse(self, refusal: _Refuse) -> None:
        if self.stop_input:
            return
        self.stop_input = True
        ex = self.parsing
        if ex is not None and ex.body is not None:
            ex.body.fail(ClientGone())
        self.parsing = None
        ex = H1Exchange()
        ex.refusal = refusal
        ex.keep_alive = False
        self.queue.append(ex)
        self._run()

    # ------------------------------------------------------------------ transport helpers
    def pause(self, on: bool, why: str) -> None:
        if self.closed or self.transport is None:
            return
        before = bool(self.paused)
        if on:
            self.paused.add(why)
        else:
            self.paused.discard(why)
        if before != bool(self.paused):
            if self.paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone()
        if not self.write_paused:
            return
        self.drain_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                await self.drain_waiter
        except TimeoutError:
            self.counters["web_client_write_timeout"] += 1
            self.abort()
            raise ClientGone() from None
        finally:
            self.drain_waiter = None

    def _arm(self, seconds: float, head: bool = False) -> None:
        """Set the connection's one deadline. The timer is moved only when it would fire too late;
        a timer that fires early re-arms itself (no cancel/create per request)."""
        deadline = self.loop.time() + seconds
        self.deadline = deadline
        self.deadline_head = head
        if self.timer is None or self.timer.when() > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._timeout)

    def _disarm(self) -> None:
        self.deadline = 0.0
        self.deadline_head = False

    def _timeout(self) -> None:
        self.timer = None
        if self.closed or self.upgraded is not None or not self.deadline:
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._timeout)
            return
        head = self.deadline_head
        self.deadline = 0.0
        if head and self.in_head:
            self.counters["web_header_timeout"] += 1
            self._refuse(_Refuse(408, f"The request's headers did not arrive within {self.settings.header_timeout:g} "
                                      "seconds.", "header_timeout"))
        elif not self.queue:
            self.counters["web_idle_closed"] += 1
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.closed = True
            self.transport.abort()
        self.closed = True


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the exchange already holds the refusal)."""
