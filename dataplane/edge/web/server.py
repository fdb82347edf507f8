"""``FrontDoor``: the edge's HTTPS listener for published web apps, and what the edge calls.

Build one with the settings and the four outside pieces (``Authorizer``,
``BackendDialer``, ``SignIn``, optionally ``OidcSignIn``), the edges' cookie keys
(``KeyRing``), the assertion key (``AssertionSigner``) and the default certificate; give
it the apps (``set_apps``, again on every configuration change) and ``await start(host,
port)``.

TLS: one default context (the edge's certificate) whose ``sni_callback`` switches to the
context of an app's custom-domain certificate when the client's SNI names that app's
host; every context offers ALPN ``h2`` and ``http/1.1`` (TLS 1.2+) and the handshake must
finish within ``header_timeout``. After the handshake the connection becomes an
``H2Connection`` or an ``H1Connection`` by the ALPN result. Past ``max_connections``
open client connections, new ones are closed at once (counted).

``set_cookie_keys`` rotates the edges' cookie keys. For the edge (continuous access): ``revoke_session(sid)`` refuses a session's cookies on
this edge at once, ``cut_session(sid)`` ends its WebSockets and idle backend
connections, ``recheck()`` re-authorizes every live WebSocket now (also run every
``websocket_recheck`` seconds). ``counters`` holds every refusal and event by name (for
Prometheus); ``jwks()`` is the assertion keys' JWKS document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import msgspec

from .assertion import AssertionSigner, jwks
from .backend import Pool
from .exchange import normalize_host
from .http1 import H1Connection
from .http2 import H2Connection
from .limits import TokenBucket
from .model import Authorizer, BackendDialer, OidcSignIn, SignIn, TransactionRecord, WebApp, WebAppError
from .proxy import Proxy
from .routes import Route, build_routes, server_context
from .session import KeyRing, RevokedSessions, Sealer
from .settings import WebSettings
from .signin import SsoPages
from .websocket import LiveSockets

log = logging.getLogger("ferryman.edge.web")

SWEEP_INTERVAL = 5.0


class _Accept(asyncio.Protocol):
    """Picks HTTP/2 or HTTP/1.1 by ALPN once TLS is up, then steps aside."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        door = self.door
        if len(door.connections) >= door.settings.max_connections or door.closing:
            door.counters["web_connections_refused"] += 1
            transport.abort()
            return
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        proto: asyncio.Protocol = H2Connection(door) if alpn == "h2" else H1Connection(door)
        door.connections.add(proto)
        door.counters["web_connections_h2" if alpn == "h2" else "web_connections_h1"] += 1
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced before any data
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class FrontDoor:
    def __init__(self, settings: WebSettings, *, authorizer: Authorizer, dialer: BackendDialer, sign_in: SignIn,
                 cookie_keys: KeyRing, signer: AssertionSigner, certificate: tuple[str, str],
                 on_record: Callable[[TransactionRecord], None] | None = None, oidc: OidcSignIn | None = None,
                 previous_signers: Sequence[AssertionSigner] = ()) -> None:
        if not settings.auth_host or not normalize_host(settings.auth_host):
            raise ValueError("the front door needs auth_host, the external host[:port] of the sign-in site")
        self.settings = settings
        self.authorizer = authorizer
        self.dialer = dialer
        self.on_record = on_record
        self.signer = signer
        self.previous_signers = tuple(previous_signers)
        self.issuer = settings.assertion_issuer or f"https://{normalize_host(settings.auth_host)}"
        self.counters: Counter[str] = Counter()
        self.routes: dict[str, Route] = {}
        self._sni: dict[str, ssl.SSLContext] = {}
        self.default_tls = server_context(*certificate)
        self.default_tls.sni_callback = self._sni_callback
        self.edge_bucket = TokenBucket(settings.edge_rate)
        self.pool = Pool(settings.pool_idle_per_key, settings.pool_idle_total, settings.pool_idle_timeout)
        self.sockets = LiveSockets()
        self.revoked = RevokedSessions(settings.revoked_sessions)
        settings = msgspec.structs.replace(settings, auth_host=normalize_host(settings.auth_host))
        self.settings = settings
        self.sso = SsoPages(settings=settings, sealer=Sealer(cookie_keys), sign_in=sign_in, oidc=oidc, counters=self.counters,
                            revoked=self.revoked, routes=lambda: self.routes, on_sign_out=self._signed_out,
                            jwks=self.jwks)
        self.proxy = Proxy(self)
        self.connections: set[asyncio.Protocol] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False
        self.draining = False  # stop_listening: HTTP/1.1 connections close after their answer
        self.in_flight = 0  # requests being answered (a WebSocket counts until it ends)

    # ------------------------------------------------------------------ configuration
    def set_apps(self, apps: Iterable[WebApp]) -> None:
        """Replace the published apps (atomically; ``WebAppError`` leaves the old table in place)."""
        routes = build_routes(apps, self.settings, self.settings.auth_host)
        sni: dict[str, ssl.SSLContext] = {}
        for route in routes.values():
            if route.server_tls is not None:
                route.server_tls.sni_callback = None
                other = sni.get(route.hostname)
                if other is not None and other is not route.server_tls:
                    raise WebAppError(f"host {route.hostname} has two custom certificates (apps on different ports)")
                sni[route.hostname] = route.server_tls
        before = {r.app.name: r.app for r in self.routes.values()}
        after = {r.app.name: r.app for r in routes.values()}
        self.routes, self._sni = routes, sni
        for name, app in before.items():
            if after.get(name) != app:  # removed or changed: no connection made under the old definition is reused
                self.pool.drop(app=name)
            if name not in after:
                self.sockets.cut_where(lambda s, n=name: s.app.name == n, "application removed")

    def set_cookie_keys(self, keys: KeyRing) -> None:
        """Replace the cookie keys (rotation, or dropping a compromised key): cookies, codes and
        tickets sealed with a key no longer in ``keys`` stop working at once."""
        self.sso.sealer = Sealer(keys)
        self.sso.forget_opened()

    def tls_context_for(self, route: Route) -> ssl.SSLContext:
        return route.server_tls or self.default_tls

    def _sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if server_name:
            custom = self._sni.get(server_name.lower().rstrip("."))
            if custom is not None:
                sslobj.context = custom

    def jwks(self) -> dict:
        return jwks(self.signer, *self.previous_signers)

    # ------------------------------------------------------------------ continuous access
    def revoke_session(self, session_id: str, until: float | None = None, reason: str = "session revoked") -> int:
        """Refuse a session's cookies on this edge from now on; cut its WebSockets. How many were cut."""
        self.revoked.add(session_id, until if until is not None else time.time() + 86400)
        return self.cut_session(session_id, reason)

    def cut_session(self, session_id: str, reason: str = "access withdrawn") -> int:
        self.pool.drop(session=session_id)
        return self.sockets.cut_session(session_id, reason)

    def drop_connector(self, peer: str) -> int:
        """Close idle backend connections carried by a connector that is gone or draining."""
        return self.pool.drop(peer=peer)

    def _signed_out(self, session_id: str, reason: str) -> None:
        self.cut_session(session_id, reason)

    def recheck(self) -> int:
        """Re-authorize every live WebSocket; cut the ones now denied. How many were cut."""
        cut = 0
        for sock in self.sockets:
            if sock.principal is None:
                continue
            if sock.principal.session_id in self.revoked:
                sock.end("session revoked")
                cut += 1
                continue
            try:
                verdict = self.authorizer.authorize(sock.app, sock.principal, sock.facts)
            except Exception:  # noqa: BLE001 - fail closed
                log.exception("re-authorizing a WebSocket failed")
                verdict = None
            if verdict is None or not verdict.allowed:
                sock.end(f"access withdrawn: {verdict.reason if verdict else 'authorization failed'}")
                cut += 1
        if cut:
            self.counters["web_websocket_cut"] += cut
        return cut

    # ------------------------------------------------------------------ listening
    async def start(self, host: str = "0.0.0.0", port: int = 443, *, sock: socket.socket | None = None,
                    reuse_port: bool = False) -> list[tuple[str, int]]:
        """Listen (on ``host:port`` or an already bound ``sock``); the addresses listened on."""
        loop = asyncio.get_running_loop()
        kwargs = dict(ssl=self.default_tls, ssl_handshake_timeout=self.settings.header_timeout, backlog=1024)
        if sock is not None:
            server = await loop.create_server(lambda: _Accept(self), sock=sock, **kwargs)
        else:
            server = await loop.create_server(lambda: _Accept(self), host, port, reuse_port=reuse_port or None,
                                              **kwargs)
        self.servers.append(server)
        if not self.tasks:
            self.tasks = [loop.create_task(self._sweeper()), loop.create_task(self._rechecker())]
        return [s.getsockname()[:2] for s in server.sockets]

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.pool.sweep()

    async def _rechecker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.websocket_recheck)
            if len(self.sockets):
                self.recheck()

    def stop_listening(self) -> None:
        """Accept no new connections; those open go on, HTTP/1.1 ones closed after their next
        answer (the edge drains). The listening sockets are shut down, not only closed: an edge
        worker's is shared with its supervisor, and a closed copy would leave the port open."""
        self.draining = True
        for server in self.servers:
            for sock in server.sockets:
                # The server's sockets are the loop's stand-ins, which refuse shutdown() (uvloop
                # raises TypeError); a duplicate descriptor is the same socket, and shutting it down
                # shuts the listening socket down.
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as same:
                    same.shutdown(socket.SHUT_RDWR)
            server.close()

    async def close(self) -> None:
        self.closing = True
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for sock in self.sockets:
            sock.end("edge shutting down")
        for conn in list(self.connections):
            conn.close()  # type: ignore[attr-defined]
        self.pool.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers = []

    # ------------------------------------------------------------------ from the connections
    def begin(self, request, responder):
        """A bodiless HTTP/1.1 request, before any handler runs: ``proxy.Direct`` when it is served
        in callbacks (it counts itself out of ``in_flight`` when it ends), else None: ``handle``."""
        self.in_flight += 1
        try:
            direct = self.proxy.begin(request, responder)
        except Exception:  # noqa: BLE001 - the ordinary path answers it (with its decision, when taken)
            log.exception("web request failed: %s %s", request.method, request.path)
            direct = None
        if direct is None:
            self.in_flight -= 1
        return direct

    async def handle(self, request, responder) -> None:
        self.in_flight += 1
        try:
            await self.proxy.handle(request, responder)
        finally:
            self.in_flight -= 1

    def connection_closed(self, conn: asyncio.Protocol) -> None:
        self.connections.discard(conn)

    def refused(self, status: int, code: str, source_ip: str) -> None:
        """A request refused while being parsed (400/405/408/413/414/431): recorded without an app."""
        if self.on_record is None:
            return
        try:
            self.on_record(TransactionRecord(time=time.time(), app="", host="", method="", path="", status=status,
                                             bytes_in=0, bytes_out=0, user_agent="", duration=0.0, action="deny",
                                             code=code, reason=code.replace("_", " "), source=f"{source_ip}:0"))
        except Exception:  # noqa: BLE001
            log.exception("the web transaction record hook failed")
