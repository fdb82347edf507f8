"""HTTP/2 server side of the front door: an asyncio Protocol around the ``h2`` state machine.

One ``H2Connection`` per client connection that chose ``h2`` by ALPN; one task per
stream runs the front door's handler with an ``H2Body`` and an ``H2Responder``.

- Settings we announce: ``MAX_CONCURRENT_STREAMS`` = ``h2_max_streams`` (streams above it
  are refused one by one with ``REFUSED_STREAM``; only a client that ignores the setting
  after acknowledging it loses the connection),
  ``INITIAL_WINDOW_SIZE`` = ``h2_stream_window``, connection window ``h2_connection_window``,
  ``MAX_HEADER_LIST_SIZE`` = twice ``max_header_block`` (decoding bound; blocks above
  ``max_header_block`` get a 431 page on their stream), ``ENABLE_CONNECT_PROTOCOL`` = 1
  (RFC 8441 WebSockets).
- Flow control both ways: received DATA is credited back (``WINDOW_UPDATE``) only when the
  handler has read it, so a stream buffers at most its window and a connection at most
  the connection window; sending waits for the peer's window and for the socket's write
  buffer (``pause_writing``), and gives up (``RST_STREAM``) when a client does not open
  its window for ``idle_timeout`` seconds.
- ``RST_STREAM`` from the client cancels that stream's task at once (the backend
  connection it used is closed, never pooled). More than ``h2_max_resets`` resets within
  10 s ends the connection with ``GOAWAY`` ``ENHANCE_YOUR_CALM`` (CVE-2023-44487).
- A protocol error by the client ends the connection with ``GOAWAY`` (h2 chooses the
  code); an error while handling one stream resets only that stream.
- Timeouts: the first request must come within ``header_timeout``; a connection without
  streams for ``idle_timeout`` gets ``GOAWAY`` and is closed.
- Frames of one loop iteration are written together (one TLS record where possible).
- Trailers: request trailers are dropped (the HTTP/1.1 backend would get them only in a
  chunked body, and they are a smuggling vector); response trailers are sent as a
  trailing ``HEADERS`` frame.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from .exchange import BodyTooLarge, ClientGone, ClientTimeout, Headers, Request, normalize_host
from .headers import is_token
from .pages import error_page, html_headers

log = logging.getLogger("ferryman.edge.web")

RESET_WINDOW = 10.0
_FORBIDDEN_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                                 b"te"})


class H2Body:
    """A stream's request body: chunks with their flow-controlled length, credited when read."""

    __slots__ = ("conn", "stream_id", "chunks", "received", "complete", "waiter", "error", "limit")

    def __init__(self, conn: H2Connection, stream_id: int, complete: bool, limit: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self.received = 0
        self.complete = complete
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.limit = limit

    def feed(self, data: bytes, flow: int) -> None:
        self.received += len(data)
        if self.received > self.limit:
            self.conn.h2.acknowledge_received_data(flow, self.stream_id)
            self.fail(BodyTooLarge())
            return
        self.chunks.append((data, flow))
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

    def release(self) -> None:
        """Credit everything still buffered (the handler will not read it)."""
        flow = sum(f for _, f in self.chunks)
        self.chunks.clear()
        if flow:
            self.conn.h2.acknowledge_received_data(flow, self.stream_id)
            self.conn.schedule_flush()

    async def read(self) -> bytes:
        while True:
            if self.chunks:
                data, flow = self.chunks.popleft()
                if flow:
                    self.conn.h2.acknowledge_received_data(flow, self.stream_id)
                    self.conn.schedule_flush()
                if data:
                    return data
                continue
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


class H2Stream:
    __slots__ = ("stream_id", "body", "task", "window_waiter", "reset", "responder", "request")

    def __init__(self, stream_id: int, body: H2Body) -> None:
        self.stream_id = stream_id
        self.body = body
        self.task: asyncio.Task[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.reset = False
        self.responder: H2Responder | None = None
        self.request: Request | None = None


class H2Responder:
    __slots__ = ("conn", "stream", "started", "finished", "bytes_sent", "no_body", "upgraded", "status", "head")

    def __init__(self, conn: H2Connection, stream: H2Stream, head: bool) -> None:
        self.conn = conn
        self.stream = stream
        self.started = False
        self.finished = False
        self.bytes_sent = 0
        self.no_body = False
        self.upgraded = False
        self.status = 0
        self.head = head

    def _check(self) -> None:
        if self.stream.reset or self.conn.closed:
            raise ClientGone()

    async def start(self, status: int, headers: Headers, *, end: bool = False) -> None:
        self._check()
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        self.no_body = self.head or status in (204, 304)
        out = [(b":status", str(status).encode())]
        out.extend((n, v) for n, v in headers if n not in _FORBIDDEN_RESPONSE)
        end = end or self.no_body
        try:
            self.conn.h2.send_headers(self.stream.stream_id, out, end_stream=end)
        except h2.exceptions.StreamClosedError:
            raise ClientGone() from None
        if end:
            self.finished = True
        self.conn.schedule_flush()

    async def send(self, data: bytes) -> None:
        if self.no_body or not data:
            return
        view = memoryview(data)
        sid = self.stream.stream_id
        conn = self.conn
        while view:
            self._check()
            if self.finished:
                raise ClientGone()
            try:
                window = conn.h2.local_flow_control_window(sid)
            except h2.exceptions.StreamClosedError:
                raise ClientGone() from None
            if window <= 0 or conn.write_paused:
                await conn.wait_writable(self.stream, window <= 0)
                continue
            n = min(window, conn.h2.max_outbound_frame_size, len(view))
            try:
                conn.h2.send_data(sid, view[:n].tobytes())
            except h2.exceptions.StreamClosedError:
                raise ClientGone() from None
            self.bytes_sent += n
            view = view[n:]
            conn.schedule_flush()
        if conn.write_paused:
            await conn.wait_writable(self.stream, False)

    async def end(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self._check()
        self.finished = True
        try:
            if trailers:
                self.conn.h2.send_headers(self.stream.stream_id, [(n, v) for n, v in trailers
                                                                  if n not in _FORBIDDEN_RESPONSE
                                                                  and not n.startswith(b":")], end_stream=True)
            else:
                self.conn.h2.end_stream(self.stream.stream_id)
        except h2.exceptions.StreamClosedError:
            raise ClientGone() from None
        self.conn.schedule_flush()

    async def respond(self, status: int, headers: Headers, body: bytes = b"") -> None:
        await self.start(status, headers, end=not body)
        if body and not self.finished:
            await self.send(body)
            await self.end()

    async def upgrade(self, status: int, headers: Headers) -> H2Tunnel:
        await self.start(200, headers)
        self.upgraded = True
        return H2Tunnel(self)

    def abort(self) -> None:
        self.finished = True
        self.conn.reset_stream(self.stream, ErrorCodes.CANCEL)


class H2Tunnel:
    """An RFC 8441 extended-CONNECT stream as a ``ByteStream`` (WebSocket frames both ways)."""

    peer = ""

    def __init__(self, responder: H2Responder) -> None:
        self.responder = responder
        self.body = responder.stream.body
        self._pending: list[bytes] = []

    async def read(self, max_bytes: int) -> bytes:
        try:
            data = await self.body.read()
        except (ClientTimeout, ClientGone, BodyTooLarge):
            return b""
        return data

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    async def drain(self) -> None:
        while self._pending:
            data = self._pending.pop(0)
            await self.responder.send(data)

    def write_eof(self) -> None:
        if not self.responder.finished and not self.responder.stream.reset:
            self.responder.finished = True
            try:
                self.responder.conn.h2.end_stream(self.responder.stream.stream_id)
            except h2.exceptions.H2Error:
                pass
            self.responder.conn.schedule_flush()

    def close(self) -> None:
        if not self.responder.finished:
            self.responder.abort()


class H2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2 (after TLS and ALPN ``h2``)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.settings = server.settings
        self.counters = server.counters
        self.loop = asyncio.get_running_loop()
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                                           normalize_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.write_paused = False
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.resets: collections.deque[float] = collections.deque()
        self.writable = asyncio.Event()
        self.writable.set()
        self.source_ip = ""
        self.source_port = 0
        self.tls_context = None
        self.seen_request = False

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio's or uvloop's TLS transport
        transport.set_write_buffer_limits(high=self.settings.buffer_size, low=self.settings.buffer_size // 4)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.source_ip, self.source_port = str(peer[0]), int(peer[1])
        sslobj = transport.get_extra_info("ssl_object")
        self.tls_context = sslobj.context if sslobj is not None else None
        s = self.settings
        # h2 enforces its stream limit as a connection error; a client may rightly open more streams
        # before it has seen our SETTINGS, so h2 gets the limit only once the client acknowledged it
        # (update_settings) and, until then, this class refuses the streams above it one by one.
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max(100, s.h2_max_streams),
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.h2_stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2 * s.max_header_block,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        self.h2.initiate_connection()
        if s.h2_max_streams < 100:
            self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.h2_max_streams})
        if s.h2_connection_window > 65535:
            self.h2.increment_flow_control_window(s.h2_connection_window - 65535)
        self.flush()
        self._arm(s.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.writable.set()
        for stream in list(self.streams.values()):
            stream.reset = True
            stream.body.fail(ClientGone())
            if stream.window_waiter is not None and not stream.window_waiter.done():
                stream.window_waiter.set_result(None)
            if stream.task is not None and not stream.task.done() and not (
                    stream.responder is not None and stream.responder.upgraded):
                stream.task.cancel()
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.counters["web_h2_protocol_error"] += 1
            log.info("HTTP/2 protocol error from %s: %s", self.source_ip, exc)
            self.flush()
            self.close()
            return
        try:
            self._events(events)
        except Exception:  # noqa: BLE001 - a bug here must cost this connection only, with a log
            log.exception("HTTP/2 connection from %s failed", self.source_ip)
            self.close()
            return
        self.flush()

    def _events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None or stream.body.error is not None:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    stream.body.feed(event.data, event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body.end()
            elif isinstance(event, h2.events.StreamReset):
                self._stream_reset(event.stream_id)
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self._wake_senders(getattr(event, "stream_id", 0))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.close()
                return

    # ------------------------------------------------------------------ streams
    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        self.seen_request = True
        self._disarm()
        s = self.settings
        if len(self.streams) >= s.h2_max_streams:
            self.counters["web_h2_refused_stream"] += 1
            try:
                self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            except h2.exceptions.StreamClosedError:
                pass  # the client reset it in the same read
            return
        pseudo: dict[bytes, bytes] = {}
        headers: Headers = []
        size = 0
        for name, value in event.headers:
            size += len(name) + len(value) + 32
            if name.startswith(b":"):
                pseudo[name] = value
            else:
                headers.append((name, value))
        ended = event.stream_ended is not None
        body = H2Body(self, sid, complete=ended, limit=s.max_body_size)
        stream = H2Stream(sid, body)
        self.streams[sid] = stream
        method = pseudo.get(b":method", b"GET").decode("ascii", "replace")
        target = pseudo.get(b":path", b"").decode("latin-1")
        authority = pseudo.get(b":authority") or next((v for n, v in headers if n == b"host"), b"")
        protocol = pseudo.get(b":protocol", b"")
        content_length = None
        for n, v in headers:
            if n == b"content-length":
                try:
                    content_length = int(v)
                except ValueError:
                    content_length = -1
        responder = H2Responder(self, stream, head=method == "HEAD")
        stream.responder = responder
        refusal: tuple[int, str, str] | None = None
        if size > s.max_header_block:
            self.counters["web_header_too_large"] += 1
            refusal = (431, f"The request's headers are larger than {s.max_header_block} bytes.", "header_too_large")
        elif len(headers) > s.max_headers:
            self.counters["web_header_too_large"] += 1
            refusal = (431, f"The request has more than {s.max_headers} header fields.", "too_many_headers")
        elif len(target) > s.max_url_length:
            self.counters["web_url_too_long"] += 1
            refusal = (414, f"The address is longer than {s.max_url_length} bytes.", "url_too_long")
        elif method == "CONNECT" and protocol != b"websocket":
            refusal = (405, "CONNECT is not served here: this is not a forward proxy.", "method_not_allowed")
        elif not target.startswith("/"):
            refusal = (400, "The request target must be a path.", "bad_target")
        elif not request_line_safe(pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"")):
            refusal = (400, "The request's :method or :path has characters a request line cannot carry "
                            "(spaces, controls or non-ASCII).", "bad_target")
        elif not normalize_host(authority):
            refusal = (400, "The request needs a valid :authority.", "bad_host")
        elif content_length is not None and (content_length < 0 or content_length > s.max_body_size):
            self.counters["web_body_too_large"] += 1
            refusal = (413, f"The request body is larger than {s.max_body_size} bytes.", "body_too_large")
        if refusal is not None:
            stream.task = self.loop.create_task(self._refuse(stream, *refusal))
            return
        websocket = method == "CONNECT" and protocol == b"websocket"
        request = Request(method="GET" if websocket else method, target=target, host=normalize_host(authority),
                          headers=headers, version="HTTP/2", source_ip=self.source_ip, source_port=self.source_port,
                          body=body, content_length=content_length, has_body=not ended and not websocket,
                          websocket=websocket, extended_connect=websocket, tls_context=self.tls_context,
                          start=time.time())
        stream.request = request
        stream.task = self.loop.create_task(self._serve(stream, request, responder))

    async def _refuse(self, stream: H2Stream, status: int, reason: str, code: str) -> None:
        page = error_page(status, reason, code)
        try:
            await stream.responder.respond(status, html_headers(page), page)
        except ClientGone:
            pass
        self.server.refused(status, code, self.source_ip)
        self._finish(stream)

    async def _serve(self, stream: H2Stream, request: Request, responder: H2Responder) -> None:
        try:
            await self.server.handle(request, responder)
            if not responder.finished:
                responder.abort()
        except (ClientGone, asyncio.CancelledError):
            if not responder.finished and not stream.reset:
                responder.abort()
        except Exception:  # noqa: BLE001 - one stream's failure resets that stream only
            log.exception("web request failed: %s %s", request.method, request.path)
            if not responder.started and not stream.reset:
                page = error_page(500, "The edge could not handle this request.", "internal_error")
                try:
                    await responder.respond(500, html_headers(page), page)
                except ClientGone:
                    pass
            elif not responder.finished:
                responder.abort()
        finally:
            self._finish(stream)

    def _finish(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        stream.body.release()
        if not stream.reset and not self.closed and not stream.body.complete:
            # the response is complete but the client is still sending: stop it (RFC 9113 §8.1)
            try:
                self.h2.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
            except h2.exceptions.H2Error:
                pass
        self.schedule_flush()
        if not self.streams and not self.closed:
            self._arm(self.settings.idle_timeout)

    def _stream_reset(self, stream_id: int) -> None:
        now = time.monotonic()
        self.resets.append(now)
        while self.resets and self.resets[0] < now - RESET_WINDOW:
            self.resets.popleft()
        if len(self.resets) > self.settings.h2_max_resets:
            self.counters["web_h2_reset_flood"] += 1
            log.warning("HTTP/2 client %s reset more than %d streams in %gs: closing", self.source_ip,
                        self.settings.h2_max_resets, RESET_WINDOW)
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self.flush()
            self.close()
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.reset = True
        stream.body.fail(ClientGone())
        if stream.window_waiter is not None and not stream.window_waiter.done():
            stream.window_waiter.set_result(None)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        if stream.reset or self.closed:
            return
        stream.reset = True
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except h2.exceptions.H2Error:
            pass
        self.schedule_flush()

    def _wake_senders(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            targets = [stream] if stream is not None else []
        else:
            targets = list(self.streams.values())
        for stream in targets:
            if stream.window_waiter is not None and not stream.window_waiter.done():
                stream.window_waiter.set_result(None)

    async def wait_writable(self, stream: H2Stream, for_window: bool) -> None:
        """Wait for the peer's window (``for_window``) or the socket; ``ClientGone`` after ``idle_timeout``."""
        self.flush()
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                if for_window:
                    stream.window_waiter = self.loop.create_future()
                    try:
                        await stream.window_waiter
                    finally:
                        stream.window_waiter = None
                else:
                    await self.writable.wait()
        except TimeoutError:
            self.counters["web_client_write_timeout"] += 1
            self.reset_stream(stream, ErrorCodes.CANCEL)
            raise ClientGone() from None
        if stream.reset or self.closed:
            raise ClientGone()

    # ------------------------------------------------------------------ output
    def schedule_flush(self) -> None:
        if not self.flush_scheduled and not self.closed:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, self._timeout)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timeout(self) -> None:
        self.timer = None
        if self.closed or self.streams:
            return
        self.counters["web_header_timeout" if not self.seen_request else "web_idle_closed"] += 1
        self.close()

    def close(self) -> None:
        """End the connection: ``GOAWAY`` (unless one was sent or received) and close after the buffered bytes."""
        if not self.closed and self.transport is not None:
            if self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
                try:
                    self.h2.close_connection(ErrorCodes.NO_ERROR)
                except h2.exceptions.ProtocolError:
                    pass
            self.flush()
            self.closed = True
            self.transport.close()


_VISIBLE = re.compile(rb"[\x21-\x7e]*")


def request_line_safe(method: bytes, path: bytes) -> bool:
    """Whether ``:method`` and ``:path`` can be written into an HTTP/1.1 request line unchanged.

    The h2 library lets through spaces, tabs and bytes above 0x7e in these two pseudo-headers
    (it refuses CR, LF and NUL); the backend request is HTTP/1.1, where a space would end the
    target and start another request-line field (``GET /a HTTP/1.1 HTTP/1.1``). The method must
    be a token (RFC 9110 §9.1); the path only visible ASCII (RFC 3986: anything else is
    percent-encoded), as llhttp demands of an HTTP/1.1 client."""
    return is_token(method) and _VISIBLE.fullmatch(path) is not None

