"""WebSockets through the front door: handshake helpers, the byte splice, the live registry.

After the handshake (HTTP/1.1 ``Upgrade`` → backend ``101``, or RFC 8441 extended CONNECT
on an HTTP/2 stream → backend ``101`` → ``200`` on the stream), WebSocket frames are
copied as bytes both ways (``splice``): the edge does not parse frames, so extensions
negotiated between browser and backend (``permessage-deflate``) keep working. For an
HTTP/2 client the edge makes its own ``Sec-WebSocket-Key`` for the backend and checks the
backend's ``Sec-WebSocket-Accept`` (RFC 6455 §4.1).

The splice has back-pressure (each direction writes and waits for the other side to
drain before reading more) and its own idle timeout (``websocket_idle_timeout``: nothing
either way for that long closes both sides).

``LiveSockets`` registers every open WebSocket by sign-in session. The edge cuts a
session's WebSockets with ``cut_session`` (sign-out, revocation), and the front door
re-authorizes all live WebSockets every ``websocket_recheck`` seconds through the
``Authorizer`` (a user disabled, a device revoked, a policy that now denies), so access
withdrawn from the snapshot ends open WebSockets within that interval plus the time to
close — well under 5 seconds with the default of 2.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from .exchange import normalize_host
from .model import ByteStream, Principal, RequestFacts, WebApp

log = logging.getLogger("ferryman.edge.web")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_SIZE = 65536


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def origin_is_own(origin: bytes, host: str) -> bool:
    """Whether a WebSocket handshake's ``Origin`` is the app's own (``https://`` + its normalised
    ``host``), or absent (not a browser: it must still hold the app's session cookie).

    A cookie is not a defence against cross-site WebSocket hijacking: WebSockets are not
    subject to CORS, and with ``SameSite=Lax`` (the default) a page on any *sibling* host of
    the same site (another published app, a passthrough app) sends the app's cookie with its
    handshake; with ``SameSite=None`` any site does. Browsers always send ``Origin`` on a
    WebSocket handshake, so an ``Origin`` naming another host (or ``null``) is refused."""
    if not origin:
        return True
    text = origin.strip().lower()
    if not text.startswith(b"https://"):
        return False
    return normalize_host(text[len(b"https://"):]) == host


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


class LiveSocket:
    """One open WebSocket: who, where, and how to end it."""

    __slots__ = ("app", "principal", "facts", "cut", "reason", "started", "last_check")

    def __init__(self, app: WebApp, principal: Principal | None, facts: RequestFacts) -> None:
        self.app = app
        self.principal = principal
        self.facts = facts
        self.cut = asyncio.Event()
        self.reason = ""
        self.started = time.monotonic()
        self.last_check = self.started

    def end(self, reason: str) -> None:
        if not self.cut.is_set():
            self.reason = reason
            self.cut.set()


class LiveSockets:
    def __init__(self) -> None:
        self._by_session: dict[str, set[LiveSocket]] = {}
        self._all: set[LiveSocket] = set()

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[LiveSocket]:
        return iter(list(self._all))

    def add(self, sock: LiveSocket) -> None:
        self._all.add(sock)
        if sock.principal is not None:
            self._by_session.setdefault(sock.principal.session_id, set()).add(sock)

    def remove(self, sock: LiveSocket) -> None:
        self._all.discard(sock)
        if sock.principal is not None:
            group = self._by_session.get(sock.principal.session_id)
            if group is not None:
                group.discard(sock)
                if not group:
                    del self._by_session[sock.principal.session_id]

    def cut_session(self, session_id: str, reason: str) -> int:
        """End every WebSocket of a sign-in session; how many were open."""
        socks = list(self._by_session.get(session_id, ()))
        for sock in socks:
            sock.end(reason)
        return len(socks)

    def cut_where(self, predicate: Callable[[LiveSocket], bool], reason: str) -> int:
        n = 0
        for sock in list(self._all):
            if predicate(sock):
                sock.end(reason)
                n += 1
        return n


async def _pump(src: ByteStream, dst: ByteStream, counter: list[int], index: int, activity: list[float]) -> None:
    while True:
        data = await src.read(READ_SIZE)
        if not data:
            return
        counter[index] += len(data)
        activity[0] = time.monotonic()
        dst.write(data)
        await dst.drain()


async def splice(client: ByteStream, backend: ByteStream, live: LiveSocket, idle_timeout: float) -> tuple[int, int, str]:
    """Copy bytes both ways until both sides have ended, the idle timeout passes or the socket is cut.

    When one side ends its direction, the other side's direction is ended too (half-close:
    a WebSocket close frame from the browser still gets the backend's answering close
    frame). Returns (bytes client→backend, bytes backend→client, why it ended).
    """
    counter = [0, 0]
    activity = [time.monotonic()]
    up = asyncio.ensure_future(_pump(client, backend, counter, 0, activity))
    down = asyncio.ensure_future(_pump(backend, client, counter, 1, activity))
    cut = asyncio.ensure_future(live.cut.wait())
    reason = "closed"
    pending = {up, down, cut}
    try:
        while True:
            remaining = idle_timeout - (time.monotonic() - activity[0])
            if remaining <= 0:
                reason = "idle_timeout"
                break
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if cut in done:
                reason = live.reason or "cut"
                break
            if any(task.exception() is not None for task in done):
                reason = "error"
                break
            if up in done:
                backend.write_eof()
            if down in done:
                client.write_eof()
            if up.done() and down.done():
                break
    finally:
        for task in (up, down, cut):
            task.cancel()
        await asyncio.gather(up, down, cut, return_exceptions=True)
        backend.close()
        client.close()
    return counter[0], counter[1], reason
