"""Target ``webhead``: the web front door's HTTP/1.1 request heads (``dataplane.edge.web.http1``).

The bytes a browser (or anyone reaching the edge's web port) sends, in reads of fuzzed sizes, into
``H1Connection`` on a running event loop; a minimal handler reads each request's body and answers
200. Bodiless requests are offered to the server's ``begin`` first, as the front door does: by
the request target's length, one in three goes to the coroutine path, one is answered at once
inside the parser's callback and one a turn of the loop later (the front door's callback path,
``proxy.Direct``, as the connection sees it). Contract: ``data_received`` raises nothing; every
answer is for the oldest request still waiting (pipelining order) and nothing is written after
the connection closed; a malformed or over-limit request gets its 4xx page and the connection
closes — never the catch-all for an unexpected exception inside the parser callbacks ("request
handling failed") or a failed request (500); the head bytes kept stay within the settings' limits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from dataplane.edge.web import http1
from dataplane.edge.web.exchange import BodyTooLarge, ClientGone
from dataplane.edge.web.pages import html_headers
from dataplane.edge.web.settings import WebSettings

from . import Finding, Reader, RecordingTransport

SETTINGS = WebSettings(max_header_block=2048, max_headers=32, max_url_length=512, max_body_size=4096,
                       pipeline_depth=4)
_loop = asyncio.new_event_loop()


class _Log:
    """``http1``'s logger: an unexpected exception it reports is a finding."""

    def __init__(self, real: logging.Logger) -> None:
        self.real = real

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if "request handling failed" in msg:
            raise Finding(msg % args)
        self.real.warning(msg, *args, **kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        raise Finding("request failed: " + msg % args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


http1.log = _Log(http1.log)  # type: ignore[assignment]


class _Server:
    settings = SETTINGS
    draining = False  # (the front door's: HTTP/1.1 keeps connections alive)

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self.answered = 0
        self.refusals: list[int] = []

    def begin(self, request: Any, responder: Any) -> _Direct | None:
        kind = len(request.target) % 3
        if kind == 0:
            return None  # the coroutine path (``handle``)
        direct = _Direct(self, responder)
        if kind == 1:
            direct.answer()  # inside the parser's callback
        else:
            _loop.call_soon(direct.answer)
        return direct

    async def handle(self, request: Any, responder: Any) -> None:
        _in_order(responder)
        try:
            while await request.body.read():
                pass
        except BodyTooLarge:
            page = b"too large"
            await responder.respond(413, html_headers(page), page)
            return
        if len(request.target) > SETTINGS.max_url_length:
            raise Finding(f"request target of {len(request.target)} bytes served")
        self.answered += 1
        await responder.respond(200, html_headers(b"ok"), b"ok")

    def refused(self, status: int, code: str, source: str) -> None:
        self.refusals.append(status)

    def connection_closed(self, conn: Any) -> None:
        pass


def _in_order(responder: Any) -> None:
    conn = responder.conn
    if not conn.queue or conn.queue[0] is not responder.exchange:
        raise Finding("a request answered before one parsed ahead of it")


class _Direct:
    """A request served in callbacks, as ``H1Connection`` sees ``proxy.Direct``."""

    def __init__(self, server: _Server, responder: Any) -> None:
        self.server = server
        self.responder = responder
        self.over = False

    def answer(self) -> None:
        if self.over:
            return
        self.over = True
        responder = self.responder
        _in_order(responder)
        try:
            responder.reply(200, html_headers(b"ok"), b"ok")
        except ClientGone:
            responder.abort()
        self.server.answered += 1
        responder.settle()

    def client_resumed(self) -> None:
        pass

    def client_gone(self) -> None:
        if not self.over:
            self.over = True
            self.responder.abort()
            self.responder.settle()


async def _session(chunks: list[bytes]) -> None:
    server = _Server()
    conn = http1.H1Connection(server)
    transport = RecordingTransport(local=("127.0.0.1", 443))
    conn.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        if transport.closed:
            break
        conn.data_received(chunk)
        for _ in range(4):
            await asyncio.sleep(0)  # the exchange task answers
    for _ in range(4):
        await asyncio.sleep(0)
    conn.connection_lost(None)
    await asyncio.sleep(0)
    if conn.runner is not None:
        try:
            await conn.runner
        except asyncio.CancelledError:
            pass
    if any(status >= 500 for status in server.refusals):
        raise Finding(f"refused with {server.refusals}")


def one_input(data: bytes) -> None:
    r = Reader(data)
    splits = r.take(r.byte() % 16)
    stream = r.rest()
    _loop.run_until_complete(_session(Reader(splits).chunks(stream)))
