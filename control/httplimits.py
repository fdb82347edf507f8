"""The control plane's HTTP server limits: uvicorn's httptools protocol, held to ``HttpLimits``.

``limited_protocol(limits, log_limit)`` makes the protocol class given to uvicorn as its
``http=`` option (``control.server``); every connection of that server shares one
``ConnectionGate``:

- at most ``max_connections`` connections at once, and at most ``max_waiting_per_source`` of
  one source address (IPv6: /64) that have not sent a complete request head yet (a new
  connection, or a request whose first bytes came); one more is answered 503 and closed;
- a request head must be complete within ``request_timeout`` seconds of the connection (or of
  the request's first byte, on a kept-alive connection), else the connection is closed (408
  when part of a head came): a slowloris holds nothing for long;
- its body must then be complete within ``request_timeout`` seconds plus one second per
  ``BODY_RATE`` bytes of it (a body without a length: as for ``MAX_BODY``), else the
  connection is closed (408 unless an answer has begun); until the body is complete the
  connection still counts as waiting for its source, so one source dribbling bodies holds at
  most ``max_waiting_per_source`` connections, and none for long;
- a request head (request line and headers) larger than ``max_head`` bytes is answered 431
  and the connection closed, before the parser buffers it;
- ``keepalive_timeout`` is uvicorn's own idle timeout between requests (``timeout_keep_alive``).

Refusals are logged at most ``log_limit`` lines per source address. The limits sit above the
transport, so a TLS server keeps them (a connection counts once its TLS handshake is done;
uvicorn bounds the handshake itself).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dataplane.basics.caps import ConnectionGate, HttpLimits, LogLimiter

log = logging.getLogger("ferryman.control.http")

_HEAD_END = b"\r\n\r\n"
LINGER = 1.0  # seconds a refused connection is kept half-closed, its input dropped, before it is closed
_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}
BODY_RATE = 64 * 1024  # bytes per second a request body must come at, at least, beyond request_timeout
MAX_BODY = 4 << 20  # the largest body the control plane takes (POST /v1/node/traffic): a body of unknown length


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with connection, head-time and head-size limits (the class
    attributes are set by ``limited_protocol``)."""

    limits: ClassVar[HttpLimits]
    gate: ClassVar[ConnectionGate]
    log_limit: ClassVar[LogLimiter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._key = ""
        self._admitted = False       # counted by the gate (until connection_lost)
        self._waiting = False        # counted as waiting for a request head
        self._head_open = True       # a request head is expected or under way
        self._head_bytes = 0         # bytes of the current head received so far
        self._tail = b""             # its last 3 bytes (a head end may straddle two reads)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False        # answered with an error, closing

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal, self._key = self.gate.open(self.client[0] if self.client else None)
        if refusal is not None:
            self._refuse(503, "connection refused", refusal)
            return
        self._admitted = self._waiting = True
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        """The connection leaves this protocol (and its count): uvicorn's WebSocket protocol takes it."""
        self._release()
        super().handle_websocket_upgrade()

    def _release(self) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        if self._admitted:
            self._admitted = False
            self.gate.close(self._key, self._waiting)
            self._waiting = False

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return  # answered and closing: what still comes is dropped
        limit = self.limits.max_head
        if self._head_open and self._head_bytes + len(data) > limit:
            # Does the head end within the limit? Look no further than the limit.
            if _HEAD_END not in self._tail + data[:max(0, limit - self._head_bytes)]:
                self._too_large()
                return
        super().data_received(data)
        if self._head_open and self.parser is not None and not self.transport.is_closing():
            self._head_bytes += len(data)  # a head that began inside this read is counted from its start or before
            self._tail = (self._tail + data[-3:])[-3:]
            if self._head_bytes > limit:
                self._too_large()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_bytes = 0
        self._tail = b""
        if not self._waiting and self._admitted:
            self._waiting = True
            self.gate.head_waiting(self._key)
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        self._tail = b""
        self._cancel_head_timer()
        # Still waiting (for its body) until on_message_complete, which comes at once without one.
        self._body_timer = self.loop.call_later(self._body_time(), self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        if self._waiting:
            self._waiting = False
            self.gate.head_done(self._key)
        super().on_message_complete()

    # ------------------------------------------------------------------ limits
    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.request_timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._head_open or self.transport.is_closing():
            return
        reason = f"no complete request head within {self.limits.request_timeout:g}s"
        if self._head_bytes or self._tail:
            self._refuse(408, "request head timed out", reason)
        else:
            self._refuse(0, "request head timed out", reason)

    def _body_time(self) -> float:
        """Seconds the request's body may take from the end of its head (``BODY_RATE``)."""
        length = MAX_BODY
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    length = min(int(value), MAX_BODY)
                except ValueError:
                    pass  # the parser refuses it
                break
        return self.limits.request_timeout + length / BODY_RATE

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        reason = f"request body not complete within {self._body_time():g}s of its head"
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self._refuse(0, "request body timed out", reason)  # an answer has begun: no second one
        else:
            self._refuse(408, "request body timed out", reason)

    def _too_large(self) -> None:
        self._refuse(431, "request head too large", f"request head larger than {self.limits.max_head} bytes")

    def _refuse(self, status: int, what: str, reason: str) -> None:
        """Answer ``status`` (none when 0) with ``reason`` and close; logged at most ``log_limit``
        lines per source."""
        self._cancel_head_timer()
        self._cancel_body_timer()
        self.log_limit.log(log, logging.WARNING, self._key, what, {"peer_addr": self._key, "reason": reason})
        self._refused = True
        if status:
            body = f"{reason}\n".encode()
            self.transport.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode("latin-1") + body)
            if self.transport.can_write_eof():
                # Half-close and drop what the client still sends for a moment: closing with unread
                # input would reset the connection before the client read the answer.
                self.transport.write_eof()
                self.loop.call_later(LINGER, self.transport.close)
                return
        self.transport.close()


def limited_protocol(limits: HttpLimits, log_limit: LogLimiter) -> type[LimitedHttpProtocol]:
    """A ``LimitedHttpProtocol`` class for one server: its connections share one gate."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,),
                {"limits": limits, "gate": ConnectionGate(limits), "log_limit": log_limit})
