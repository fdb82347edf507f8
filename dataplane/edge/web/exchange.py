"""One client request and its response, the same for HTTP/1.1 and HTTP/2.

``http1`` and ``http2`` parse a client's bytes into a ``Request`` (method, target, host,
lower-case header list, a streaming ``body``) and hand it with a ``Responder`` to the
front door's handler (``proxy.FrontDoorHandler.handle``). The handler never sees the wire:

- ``await request.body.read()`` gives the next piece of the request body (``b""`` at its
  end) and applies back-pressure to the client (HTTP/1.1: the socket stops being read;
  HTTP/2: the stream's window is only credited for what was read). It raises
  ``BodyTooLarge`` past ``max_body_size``, ``ClientTimeout`` when the client stalls longer
  than ``idle_timeout`` and ``ClientGone`` when it went away.
- ``Responder.start/send/end`` stream the response; ``send`` returns when the bytes may be
  sent without buffering more than the limits allow (socket write buffer, HTTP/2 flow
  control), and raises ``ClientGone`` when the client left or stopped reading for longer
  than ``idle_timeout``. ``upgrade`` switches to a raw byte stream (WebSocket: HTTP/1.1
  ``101``, RFC 8441 ``200`` on an HTTP/2 stream). ``abort`` ends the exchange abruptly
  (HTTP/1.1: the connection closes; HTTP/2: ``RST_STREAM``).
"""

from __future__ import annotations

import ssl
from typing import Protocol

from .model import ByteStream

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client closed the connection, reset the stream or stopped reading."""


class ClientTimeout(Exception):
    """The client stopped sending its request body for longer than ``idle_timeout``."""


class BodyTooLarge(Exception):
    """The request body grew past ``max_body_size``."""


class Body(Protocol):
    received: int  # bytes received so far
    complete: bool  # the whole body has been received

    async def read(self) -> bytes: ...


class Responder(Protocol):
    started: bool
    finished: bool
    bytes_sent: int

    async def start(self, status: int, headers: Headers, *, end: bool = False) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end(self, trailers: Headers | None = None) -> None: ...

    async def respond(self, status: int, headers: Headers, body: bytes = b"") -> None: ...

    async def upgrade(self, status: int, headers: Headers) -> ByteStream: ...

    def abort(self) -> None: ...


class Request:
    """A parsed client request. ``host`` is normalised (lower case, no default port) or ``""``
    when missing or malformed; ``path`` excludes the query; ``target`` is the raw origin-form
    target (path and query) as the client sent it."""

    __slots__ = ("method", "target", "path", "query", "host", "headers", "version", "source_ip", "source_port",
                 "websocket", "extended_connect", "content_length", "has_body", "body", "tls_context", "start", "plan")

    def __init__(self, *, method: str, target: str, host: str, headers: Headers, version: str, source_ip: str,
                 source_port: int, body: Body, content_length: int | None, has_body: bool,
                 websocket: bool = False, extended_connect: bool = False,
                 tls_context: ssl.SSLContext | None = None, start: float = 0.0) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.host = host
        self.headers = headers
        self.version = version
        self.source_ip = source_ip
        self.source_port = source_port
        self.body = body
        self.content_length = content_length
        self.has_body = has_body
        self.websocket = websocket
        self.extended_connect = extended_connect
        self.tls_context = tls_context
        self.start = start
        self.plan: tuple | None = None  # the edge's decision, when taken before the request's handler ran

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        for n, v in self.headers:
            if n == name:
                return v
        return default

    def header_list(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


class EmptyBody:
    """The body of a request that has none."""

    received = 0
    complete = True

    async def read(self) -> bytes:
        return b""


_HOSTS: dict[str | bytes, str] = {}
_HOSTS_MAX = 4096


def normalize_host(value: str | bytes) -> str:
    """``Host``/``:authority`` → ``host`` or ``host:port`` (lower case, no trailing dot, no ``:443``);
    ``""`` when it is not a valid host. Results are remembered (a bounded table: hosts repeat)."""
    known = _HOSTS.get(value)
    if known is not None:
        return known
    out = _normalize_host(value)
    if len(_HOSTS) >= _HOSTS_MAX:
        _HOSTS.clear()
    _HOSTS[value] = out
    return out


def _normalize_host(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return ""
    v = value.strip().lower()
    if not v or len(v) > 261:
        return ""
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return ""
        host, rest = v[:end + 1], v[end + 1:]
    else:
        host, sep, port_s = v.partition(":")
        rest = sep + port_s
        host = host.rstrip(".")
        if not host or not host.isascii() or not all(c.isalnum() or c in "-._" for c in host):
            return ""
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
            return ""
        if int(rest[1:]) == 443:
            rest = ""
        else:
            rest = f":{int(rest[1:])}"
    return host + rest
