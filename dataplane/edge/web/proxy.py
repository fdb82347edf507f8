"""What happens to each request at the front door, from host lookup to the last byte.

``Proxy.decide`` is where a request is admitted or refused (steps 1-6 below, nothing awaited).
``Proxy.handle(request, responder)`` is called by ``http1``/``http2`` and makes the decision
happen in a coroutine; ``Proxy.begin`` is called first by ``http1`` for a bodiless request
and serves it in callbacks (``Direct``: steps 7, 8 and 10 for a pooled backend connection),
or leaves its decision to ``handle`` (``request.plan``). The steps:

1. edge-wide rate limit (``edge_rate``, 429 + ``Retry-After``);
2. the sign-in host → ``signin.SsoPages.auth_path``;
3. the app by ``Host`` (404 page for a host no app owns — never a backend); a request
   whose TLS certificate (chosen by SNI) is not the one of its ``Host`` gets 421 (HTTP/2
   connection reuse across hosts); the app's rate limit (``app_rate``); ``.``/``..`` path
   segments (also percent-encoded) are refused (400) so a path cannot climb out of the
   app's prefix; a path outside the external prefix is 404;
4. passthrough apps go straight to 7 (no sign-in, no authorization, no identity);
5. ``robots.txt`` and ``/.ferryman/*`` pages; a CORS preflight goes to the backend
   without a session when the app allows it; otherwise the app-host session cookie
   (none or refused → sign-in redirect, or 401 for non-GET requests);
6. the ``Authorizer`` decides this request (every request, WebSocket upgrades included);
   a denial is a 403 page with the reason; WebSockets to an app that disallows them: 403;
7. the backend: an idle pooled connection of this (app, session) or a new stream from
   the ``BackendDialer`` (``DialError`` → its 502/503/504 page; dial and TLS handshake
   within ``backend_connect_timeout``), TLS if the internal URL is ``https``;
   the request head with the internal ``Host``, client identity headers stripped,
   ``X-Forwarded-*``, the signed assertion and header-SSO headers; the body streamed
   (``Content-Length`` as received, or chunked) while the response is awaited — a body
   past ``max_body_size`` is 413, a stalled one 408;
8. the response head within the app's backend timeout (504), or 502 if the backend
   breaks; header translation, optional body translation, streamed to the client under
   back-pressure (the backend is read only as fast as the client takes it); trailers
   passed on; the connection back to the pool if it ended cleanly;
9. WebSocket: a ``101`` from the backend turns both sides into a byte splice, registered
   in ``LiveSockets`` until it ends;
10. one ``TransactionRecord`` to ``on_record`` whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .backend import BackendClosedEarly, BackendConnection, BackendError, BackendTimeout, TlsStream
from .exchange import BodyTooLarge, ClientGone, ClientTimeout, Headers, Request, Responder
from .headers import backend_request_headers, backend_response_headers, forwarded_headers, get, sso_headers
from .limits import retry_after
from .model import ByteStream, DialError, Principal, RequestFacts, TransactionRecord, Verdict
from .pages import ROBOTS
from .routes import Route
from .session import parse_cookies
from .signin import Reply, page, redirect
from .translate import TRANSLATED_HEADERS, BodyError, BodyTranslator, body_kind, translate_header
from .websocket import LiveSocket, accept_for, new_key, origin_is_own, splice

if TYPE_CHECKING:
    from .http1 import H1Responder
    from .server import FrontDoor

log = logging.getLogger("ferryman.edge.web")

# A '.' or '..' segment, its dots possibly percent-encoded, between separators a backend may
# decode or honour: '/', '\\', '%2f', '%5c' (decoded before normalising by some servers), and
# ';' after it (a path parameter: Tomcat and Spring read '..;' as '..').
_DOT_SEGMENT = re.compile(r"(?i)(?:^|[/\\]|%2f|%5c)(?:\.|%2e){1,2}(?:[/\\;]|%2f|%5c|$)")
_SAFE_RETRY = frozenset({"GET", "HEAD", "OPTIONS"})
_WS_RESPONSE = (b"sec-websocket-protocol", b"sec-websocket-extensions")


class _Record:
    __slots__ = ("app", "action", "code", "reason", "policy", "principal", "connector", "relay_edge", "websocket", "bytes_in",
                 "bytes_out", "status")

    def __init__(self) -> None:
        self.app = ""
        self.action = "deny"
        self.code = ""
        self.reason = ""
        self.policy = ""
        self.principal: Principal | None = None
        self.connector = ""
        self.relay_edge = ""
        self.websocket = False
        self.bytes_in = -1
        self.bytes_out = -1
        self.status = 0


class Forward:
    """A request the edge lets through to its app's backend (``Proxy.decide``)."""

    __slots__ = ("route", "target", "principal", "verdict", "facts", "retried")

    def __init__(self, route: Route, target: str, principal: Principal | None, verdict: Verdict | None,
                 facts: RequestFacts | None) -> None:
        self.retried = False  # sent once already, on a pooled connection that closed without answering
        self.route = route
        self.target = target  # the internal request target
        self.principal = principal  # None: passthrough app or CORS preflight bypass (no user)
        self.verdict = verdict
        self.facts = facts


class Pages:
    """A request for the edge's own pages: the sign-in site (``route`` None) or an app host's."""

    __slots__ = ("route", "cookies")

    def __init__(self, route: Route | None, cookies: dict[str, str]) -> None:
        self.route = route
        self.cookies = cookies


class _Prefixed:
    """A ``ByteStream`` that first returns bytes already read past a ``101`` response."""

    def __init__(self, stream: ByteStream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix
        self.peer = getattr(stream, "peer", "")
        self.relay_edge = getattr(stream, "relay_edge", "")

    async def read(self, max_bytes: int) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix[:max_bytes], self.prefix[max_bytes:]
            return data
        return await self.stream.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    async def drain(self) -> None:
        await self.stream.drain()

    def write_eof(self) -> None:
        self.stream.write_eof()

    def close(self) -> None:
        self.stream.close()


class Proxy:
    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.settings = door.settings
        self.counters = door.counters

    # ------------------------------------------------------------------ entry
    async def handle(self, request: Request, responder: Responder) -> None:
        plan = request.plan
        if plan is None:
            rec = _Record()
            t0 = time.monotonic()
            decision = None
        else:  # decided by ``begin``, which could not serve it in callbacks
            decision, rec, t0 = plan
            request.plan = None
        try:
            await self._handle(request, responder, rec, decision)
        finally:
            self._emit(request, responder, rec, time.monotonic() - t0)

    def begin(self, request: Request, responder: H1Responder) -> Direct | None:
        """Decide a bodiless HTTP/1.1 request and, when it goes to a backend that has an idle
        pooled connection on a stream that hands its bytes over (``attach``), serve it in
        callbacks (``Direct``). Otherwise the decision goes with the request (``request.plan``)
        to ``handle``, which makes it happen."""
        rec = _Record()
        t0 = time.monotonic()
        decision = self.decide(request, rec)
        request.plan = (decision, rec, t0)
        if decision.__class__ is Forward:
            d: Forward = decision  # type: ignore[assignment]
            route = d.route
            if not route.internal_tls:
                key = (route.app.name, d.principal.session_id if d.principal is not None else "")
                pool = self.door.pool
                conn = pool.acquire(key)
                if conn is not None:
                    if not conn.can_attach():
                        pool.release(conn)
                        return None
                    self.counters["web_direct"] += 1
                    request.plan = None
                    direct = Direct(self, request, responder, rec, t0, d, conn)
                    try:
                        direct.start()
                    except BaseException:
                        conn.close()
                        request.plan = (decision, rec, t0)
                        raise
                    return direct
        return None

    def _emit(self, request: Request, responder: Responder, rec: _Record, duration: float) -> None:
        hook: Callable[[TransactionRecord], None] | None = self.door.on_record
        if hook is None:
            return
        p = rec.principal
        bytes_in = rec.bytes_in if rec.bytes_in >= 0 else request.body.received
        bytes_out = rec.bytes_out if rec.bytes_out >= 0 else responder.bytes_sent
        status = rec.status or getattr(responder, "status", 0) or (499 if not responder.started else 0)
        try:
            hook(TransactionRecord(
                time=request.start, app=rec.app, host=request.host, method=request.method, path=request.path,
                status=status, bytes_in=bytes_in, bytes_out=bytes_out,
                user_agent=request.header(b"user-agent").decode("latin-1")[:512], duration=round(duration, 6),
                action=rec.action, code=rec.code, reason=rec.reason, policy=rec.policy,
                user_id=p.user_id if p else "", upn=p.upn if p else "", session_id=p.session_id if p else "",
                device_id=p.device_id if p else "", source=f"{request.source_ip}:{request.source_port}",
                protocol=request.version, websocket=rec.websocket, connector=rec.connector,
                relay_edge=rec.relay_edge))
        except Exception:  # noqa: BLE001 - a failing log hook must not fail the request
            log.exception("the web transaction record hook failed")

    async def _reply(self, responder: Responder, reply: Reply, rec: _Record, action: str = "deny") -> None:
        rec.status = reply.status
        rec.code = rec.code or reply.code
        rec.reason = rec.reason or reply.reason
        rec.action = action
        if reply.principal is not None:
            rec.principal = reply.principal
        await responder.respond(reply.status, reply.headers, reply.body)

    # ------------------------------------------------------------------ decisions
    async def _handle(self, request: Request, responder: Responder, rec: _Record,
                      decision: Reply | Forward | Pages | None) -> None:
        if decision is None:
            decision = self.decide(request, rec)
        if isinstance(decision, Forward):
            d = decision
            await self._forward(d.route, request, responder, rec, d.target, d.principal, d.verdict, d.facts,
                                d.retried)
        elif isinstance(decision, Pages):
            if decision.route is None:
                reply = await self.door.sso.auth_path(request, decision.cookies)
            else:
                reply = await self.door.sso.app_path(decision.route, request, decision.cookies)
            await self._reply(responder, reply, rec, "allow" if reply.status < 400 else "deny")
        else:
            await self._reply(responder, decision, rec, rec.action)

    def decide(self, request: Request, rec: _Record) -> Reply | Forward | Pages:
        """Everything the edge decides about a request before its backend (steps 1-6 of the
        module docstring), with nothing to wait for: a ``Reply`` to send (``rec.action`` says
        whether it allows), the edge's own ``Pages`` to serve, or the ``Forward`` to make."""
        door = self.door
        rec.action = "deny"
        wait = door.edge_bucket.take()
        if wait > 0:
            self.counters["web_rate_limited_edge"] += 1
            return page(429, "This site is receiving too many requests; try again shortly.", "rate_limited",
                        extra=[(b"retry-after", retry_after(wait))])
        host = request.host
        if host == self.settings.auth_host:
            rec.app = ""
            if request.method not in ("GET", "HEAD", "POST") or request.websocket:
                return page(405, "The sign-in site only answers GET and POST.", "method_not_allowed")
            return Pages(None, parse_cookies(request.header_list(b"cookie")))
        route = door.routes.get(host)
        if route is None:
            self.counters["web_unknown_host"] += 1
            return page(404, "No application is published at this address.", "unknown_host")
        app = route.app
        rec.app = app.name
        if request.tls_context is not None and request.tls_context is not door.tls_context_for(route):
            self.counters["web_misdirected"] += 1
            return page(421, "This connection was made for another site; the browser should connect again.",
                        "misdirected")
        wait = route.bucket.take()
        if wait > 0:
            self.counters["web_rate_limited_app"] += 1
            return page(429, "This application is receiving too many requests; try again shortly.", "rate_limited",
                        extra=[(b"retry-after", retry_after(wait))])
        if "#" in request.target:  # an origin-form target has no fragment; a backend may cut it, then normalise
            return page(400, "The address has a '#' fragment, which browsers never send.", "bad_target")
        if _DOT_SEGMENT.search(request.path):
            return page(400, "The address has '.' or '..' path segments.", "bad_path")
        own = not route.passthrough and (request.path == "/.ferryman" or request.path.startswith("/.ferryman/")
                                         or request.path == "/robots.txt")
        target = None if own else route.urlmap.path_to_internal(request.target)
        if target is None and not own:
            if request.target + "/" == route.urlmap.ext_prefix or request.path + "/" == route.urlmap.ext_prefix:
                q = "?" + request.query if request.query else ""
                rec.action = "allow"
                return redirect(route.urlmap.ext_prefix + q, code="prefix")
            return page(404, "This address is outside the application.", "outside_prefix")
        if route.passthrough:
            assert target is not None
            rec.action = "allow"
            rec.code = "passthrough"
            return Forward(route, target, None, None, None)
        # The edge's own pages of an app host (sign-in callback, who am I, sign-out, JWKS, robots.txt)
        # live at the host's root, whatever path prefix the app is published under.
        if request.path == "/robots.txt":
            rec.action = "allow"
            return Reply(200, [(b"content-type", b"text/plain; charset=utf-8"),
                               (b"content-length", str(len(ROBOTS)).encode())], ROBOTS, "robots", "robots.txt")
        cookies = parse_cookies(request.header_list(b"cookie"))
        if own:
            return Pages(route, cookies)
        assert target is not None
        if app.cors_preflight_bypass and request.method == "OPTIONS" and request.header(b"origin") \
                and request.header(b"access-control-request-method"):
            rec.action, rec.code, rec.reason = "allow", "cors_preflight", "CORS preflight without sign-in"
            return Forward(route, target, None, None, None)
        now = time.time()
        session = door.sso.app_session(route, cookies, now)
        if session is None:
            return door.sso.start_sign_in(route, request, cookies)
        principal = session.principal
        rec.principal = principal
        facts = RequestFacts(method=request.method, host=host, path=request.path, source=request.source_ip,
                             user_agent=request.header(b"user-agent").decode("latin-1")[:512],
                             websocket=request.websocket)
        try:
            verdict = door.authorizer.authorize(app, principal, facts)
        except Exception:  # noqa: BLE001 - an authorizer failure denies (fail closed)
            log.exception("web authorization failed for app %s", app.name)
            verdict = Verdict(allowed=False, code="authorization_failed",
                              reason="Access could not be checked right now; try again in a moment.")
        rec.policy = verdict.policy
        if not verdict.allowed:
            self.counters["web_denied"] += 1
            rec.code, rec.reason = verdict.code or "denied", verdict.reason or "access denied"
            return page(403, verdict.reason or "You do not have access to this application.",
                        verdict.code or "denied")
        if request.websocket and not app.websocket:
            rec.code, rec.reason = "websocket_disabled", "WebSockets are not allowed for this application"
            return page(403, "WebSockets are not allowed for this application.", "websocket_disabled")
        if request.websocket and not origin_is_own(request.header(b"origin"), host):
            self.counters["web_websocket_origin_refused"] += 1
            rec.code, rec.reason = "websocket_origin", "WebSocket opened by a page of another site"
            return page(403, "This WebSocket was opened by a page of another site; only the application's own "
                             "pages may open it.", "websocket_origin")
        rec.action = "allow"
        rec.code = rec.code or verdict.code or "allowed"
        rec.reason = rec.reason or verdict.reason
        return Forward(route, target, principal, verdict, facts)

    # ------------------------------------------------------------------ backend
    def _backend_head(self, route: Route, request: Request, principal: Principal | None,
                      verdict: Verdict | None, ws_key: bytes | None) -> tuple[Headers, bool]:
        app = route.app
        websocket = request.websocket
        headers: Headers = [(b"host", route.internal_authority)]
        headers.extend(backend_request_headers(request.headers, sso_names=route.sso_names,
                                               keep_upgrade=websocket and not request.extended_connect,
                                               translate_encoding=app.translate_body))
        headers.extend(forwarded_headers(request.source_ip, route.host))
        if principal is not None and verdict is not None:
            door = self.door
            token = door.signer.assertion(
                issuer=door.issuer, audience=route.external_url, app=app.name, subject=principal.user_id,
                upn=principal.upn, session_id=principal.session_id, groups=tuple(verdict.groups), amr=principal.amr,
                auth_time=principal.auth_time, device_id=principal.device_id, extra=verdict.claims,
                lifetime=self.settings.assertion_lifetime)
            headers.append((b"x-ferryman-jwt-assertion", token.encode("ascii")))
            if app.header_sso:
                claims: dict[str, object] = {"sub": principal.user_id, "upn": principal.upn,
                                             "sid": principal.session_id, "did": principal.device_id,
                                             "amr": list(principal.amr), "groups": list(verdict.groups)}
                claims.update(verdict.claims)
                headers.extend(sso_headers(app.header_sso, claims))
        chunked = False
        if websocket:
            if request.extended_connect:
                headers.extend([(b"upgrade", b"websocket"), (b"connection", b"upgrade"),
                                (b"sec-websocket-key", ws_key or b"")])
                if not any(n == b"sec-websocket-version" for n, _ in headers):
                    headers.append((b"sec-websocket-version", b"13"))
        # The edge frames the body itself: the client's Content-Length never reaches the backend
        # (a client could name it in Connection to have it dropped, leaving the body unframed: the
        # backend would read it as a request of its own), nor one that no body follows (HTTP/2).
        elif request.has_body and request.content_length is not None:
            headers.append((b"content-length", str(request.content_length).encode()))
        elif request.has_body:
            headers.append((b"transfer-encoding", b"chunked"))
            chunked = True
        elif request.method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", b"0"))
        return headers, chunked

    async def _open(self, route: Route, principal: Principal | None) -> BackendConnection:
        door = self.door
        key = (route.app.name, principal.session_id if principal is not None else "")
        try:
            async with asyncio.timeout(self.settings.backend_connect_timeout):
                stream = await door.dialer.open(route.app, principal)
                if route.internal_tls:
                    tls = TlsStream(stream, route.backend_tls, route.internal_host)
                    try:
                        await tls.handshake()
                    except BaseException:
                        stream.close()
                        raise
                    stream = tls
        except TimeoutError:
            raise DialError("timeout", "The application could not be reached in time.", 504) from None
        except ssl.SSLCertVerificationError as exc:
            self.counters["web_backend_certificate_refused"] += 1
            log.warning("backend certificate of app %s refused: %s", route.app.name, exc.verify_message or exc)
            raise DialError("backend_certificate", "The application's certificate could not be verified.", 502) \
                from None
        except (ssl.SSLError, BackendError) as exc:
            log.warning("TLS to the backend of app %s failed: %s", route.app.name, exc)
            raise DialError("backend_tls", "A secure connection to the application could not be made.", 502) from None
        except OSError as exc:
            log.warning("backend of app %s unreachable: %s", route.app.name, exc)
            raise DialError("unreachable", "The application could not be reached.", 502) from None
        door.pool.opened += 1
        return BackendConnection(stream, key, self.settings.max_header_block)

    async def _forward(self, route: Route, request: Request, responder: Responder, rec: _Record, target: str,
                       principal: Principal | None, verdict: Verdict | None, facts: RequestFacts | None = None,
                       retried: bool = False) -> None:
        door = self.door
        app = route.app
        key = (app.name, principal.session_id if principal is not None else "")
        ws_key = new_key() if request.extended_connect else None
        head_headers, chunked = self._backend_head(route, request, principal, verdict, ws_key)
        has_body = request.has_body and not request.websocket
        method = request.method
        conn: BackendConnection | None = None
        upload: asyncio.Task[None] | None = None
        released = False
        try:
            for attempt in ((1,) if retried else (0, 1)):  # the retry (attempt 1): on a new connection
                conn = door.pool.acquire(key) if attempt == 0 else None
                reused = conn is not None
                if conn is None:
                    try:
                        conn = await self._open(route, principal)
                    except DialError as exc:
                        self.counters[f"web_dial_{exc.code}"] += 1
                        rec.code, rec.reason = exc.code, exc.message
                        await self._reply(responder, page(exc.status, exc.message, exc.code), rec, rec.action)
                        return
                rec.connector, rec.relay_edge = conn.peer, conn.relay_edge
                conn.write_head(method, target, head_headers)
                if has_body:
                    upload = asyncio.ensure_future(self._upload(conn, request, chunked))
                    head_task = asyncio.ensure_future(conn.read_head(route.timeout))
                    done, _ = await asyncio.wait({upload, head_task}, return_when=asyncio.FIRST_COMPLETED)
                    if head_task not in done and upload.exception() is not None:
                        head_task.cancel()
                        await asyncio.gather(head_task, return_exceptions=True)
                        raise upload.exception()
                    rhead = await head_task
                else:
                    try:
                        await conn.stream.drain()
                        rhead = await conn.read_head(route.timeout)
                    except BackendClosedEarly:
                        conn.close()
                        if reused and attempt == 0 and method in _SAFE_RETRY:
                            self.counters["web_backend_retry"] += 1
                            continue
                        raise
                break
            assert conn is not None
            if request.websocket and rhead.status == 101:
                await self._websocket(route, request, responder, rec, conn, rhead, ws_key, principal, facts)
                return
            await self._relay(route, request, responder, rec, conn, rhead)
            if upload is not None and not upload.done():
                upload.cancel()
                conn.reusable = False
            elif upload is not None and upload.exception() is not None:
                conn.reusable = False
            else:
                conn.reusable = conn.finished_cleanly() and not request.websocket
            door.pool.release(conn)
            released = True
        except BodyTooLarge:
            await self._fail(responder, rec, 413, f"The request body is larger than {self.settings.max_body_size} bytes.",
                             "body_too_large")
        except ClientTimeout:
            self.counters["web_body_timeout"] += 1
            await self._fail(responder, rec, 408, "The request body stopped arriving.", "body_timeout")
        except BackendError as exc:
            self.counters[f"web_{exc.code}"] += 1
            log.info("app %s: %s", app.name, exc)
            text = str(exc) if exc.status == 504 else "The application broke off its answer."
            await self._fail(responder, rec, exc.status, text, exc.code)
        finally:
            if upload is not None:
                if not upload.done():
                    upload.cancel()
                elif not upload.cancelled():
                    upload.exception()  # seen: a failed upload after the response is not an error of its own
            if conn is not None and not released:
                conn.close()

    async def _fail(self, responder: Responder, rec: _Record, status: int, reason: str, code: str) -> None:
        rec.code, rec.reason = code, reason
        if responder.started:
            rec.status = rec.status or status
            responder.abort()
            return
        await self._reply(responder, page(status, reason, code), rec, rec.action)

    async def _upload(self, conn: BackendConnection, request: Request, chunked: bool) -> None:
        stream = conn.stream
        while True:
            data = await request.body.read()
            if not data:
                break
            stream.write(b"%x\r\n" % len(data) + data + b"\r\n" if chunked else data)
            await stream.drain()
        if chunked:
            stream.write(b"0\r\n\r\n")
            await stream.drain()

    def _response_head(self, route: Route, request: Request, rhead) -> tuple[Headers, BodyTranslator | None]:
        """The response head for the client (hop-by-hop headers gone, URLs translated) and the
        body's translator when the app translates bodies of this kind."""
        app = route.app
        status = rhead.status
        if status == 101:
            raise BackendError("the application switched protocols without being asked to")
        headers = backend_response_headers(rhead.headers)
        if app.translate_headers:
            urlmap = route.urlmap
            for i, (n, v) in enumerate(headers):
                if n in TRANSLATED_HEADERS:
                    headers[i] = (n, translate_header(urlmap, n, v))
        translator: BodyTranslator | None = None
        if app.translate_body and request.method != "HEAD" and status not in (204, 304):
            kind = body_kind(get(headers, b"content-type"))
            if kind:
                encoding = get(headers, b"content-encoding").strip().lower()
                if encoding in (b"", b"identity", b"gzip"):
                    translator = BodyTranslator(kind, route.urlmap, "gzip" if encoding == b"gzip" else "",
                                                self.settings.translate_max_carry)
                    headers = [(n, v) for n, v in headers if n != b"content-length"]
                else:
                    self.counters["web_translate_skipped_encoding"] += 1
        return headers, translator

    async def _relay(self, route: Route, request: Request, responder: Responder, rec: _Record,
                     conn: BackendConnection, rhead) -> None:
        status = rhead.status
        headers, translator = self._response_head(route, request, rhead)
        rec.status = status
        await responder.start(status, headers)
        timeout = route.timeout
        try:
            while True:
                data = await conn.read_body(timeout)
                if data is None:
                    break
                if translator is None:
                    await responder.send(data)
                else:
                    for piece in translator.feed(data):
                        await responder.send(piece)
            if translator is not None:
                for piece in translator.finish():
                    await responder.send(piece)
        except BodyError as exc:
            raise BackendError(str(exc)) from None
        trailers = backend_response_headers(conn.trailers) if conn.trailers else None
        await responder.end(trailers)

    async def _websocket(self, route: Route, request: Request, responder: Responder, rec: _Record,
                         conn: BackendConnection, rhead, ws_key: bytes | None, principal: Principal | None,
                         facts: RequestFacts | None) -> None:
        headers = rhead.headers
        if request.extended_connect:
            if get(headers, b"sec-websocket-accept").strip() != accept_for(ws_key or b""):
                conn.close()
                raise BackendError("the application's WebSocket handshake answer is not valid")
            out = [(n, v) for n, v in headers if n in _WS_RESPONSE]
            status = 200
        else:
            # A 101 that is no WebSocket handshake for this key (a backend echoing a status it was
            # given, say) would turn the connection into a raw tunnel to the backend, past the
            # edge's per-request checks and header stripping: only a real handshake is spliced.
            key = request.header(b"sec-websocket-key").strip()
            if not key or get(headers, b"sec-websocket-accept").strip() != accept_for(key):
                conn.close()
                raise BackendError("the application's WebSocket handshake answer is not valid")
            out = [(b"upgrade", b"websocket"), (b"connection", b"upgrade")]
            out.extend((n, v) for n, v in headers if n in _WS_RESPONSE or n == b"sec-websocket-accept")
            status = 101
        rec.status = status
        rec.websocket = True
        client = await responder.upgrade(status, out)
        backend = _Prefixed(conn.stream, conn.upgrade_tail or b"")
        live = LiveSocket(route.app, principal, facts or RequestFacts(
            method=request.method, host=request.host, path=request.path, source=request.source_ip, websocket=True))
        self.door.sockets.add(live)
        self.counters["web_websocket_opened"] += 1
        try:
            up, down, why = await splice(client, backend, live, self.settings.websocket_idle_timeout)
        finally:
            self.door.sockets.remove(live)
            conn.closed = True
        rec.bytes_in, rec.bytes_out = up, down
        if why not in ("closed",):
            rec.reason = f"websocket ended: {why}"
            self.counters[f"web_websocket_{why.split(':')[0].replace(' ', '_')}"] += 1


class Direct:
    """A bodiless HTTP/1.1 request on an idle pooled backend connection over a stream that hands
    its bytes over as they arrive (a tunnel flow, a socket), served in those callbacks and the
    client connection's: no task, no coroutine, no future of its own. What it sends and records
    is what ``_forward`` and ``_relay`` do for such a request (same head, same translation,
    same pages for a failing backend, same record); it is the common request's path because it
    costs the edge less per request (README, "A request in callbacks").

    Writes to the client: the pieces that arrive in one turn of the loop (one read of the
    tunnel) go out in one write; a response that ends in that turn goes out with its head in
    one write. Back-pressure: while the client's socket does not take bytes
    (``H1Responder.held``) the stream holds the backend back (tunnel credit or socket reads);
    a response that has all arrived waits for the client to take it before the connection
    goes on, as the coroutine path's ``end`` does; either wait is at most ``idle_timeout``
    seconds (then the client is cut, ``web_client_write_timeout``)."""

    __slots__ = ("proxy", "request", "responder", "rec", "t0", "forward", "conn", "translator", "held", "over",
                 "out", "flushing", "released", "timer")

    def __init__(self, proxy: Proxy, request: Request, responder: H1Responder, rec: _Record, t0: float,
                 forward: Forward, conn: BackendConnection) -> None:
        self.proxy = proxy
        self.request = request
        self.responder = responder
        self.rec = rec
        self.t0 = t0
        self.forward = forward
        self.conn = conn
        self.translator: BodyTranslator | None = None
        self.held = False  # the stream holds the backend back for the client
        self.over = False  # answered (or handed back): nothing more happens to it
        self.out: list[bytes] = []  # body bytes of this turn of the loop, not yet written
        self.flushing = False
        self.released = False  # the backend connection is back in the pool (or closed)
        self.timer: asyncio.TimerHandle | None = None  # the client's wait for a complete response

    def start(self) -> None:
        d, conn, rec = self.forward, self.conn, self.rec
        headers, _ = self.proxy._backend_head(d.route, self.request, d.principal, d.verdict, None)
        rec.connector, rec.relay_edge = conn.peer, conn.relay_edge
        conn.write_head(self.request.method, d.target, headers)
        conn.attach(self, d.route.timeout)

    # ------------------------------------------------------------------ the backend (ResponseSink)
    def backend_progress(self) -> bool:
        if self.over or self.released:
            return True
        conn, responder = self.conn, self.responder
        try:
            if not responder.started:
                head = conn.head
                if head is None:
                    return True
                headers, self.translator = self.proxy._response_head(self.forward.route, self.request, head)
                self.rec.status = head.status
                responder.begin(head.status, headers)
            chunks = conn.chunks
            translator = self.translator
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if translator is not None:
                    data = b"".join(translator.feed(data))
                if data:
                    self.out.append(data)
            if conn.complete:
                if translator is not None:
                    tail = b"".join(translator.finish())
                    if tail:
                        self.out.append(tail)
                out = self.out
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                responder.finish(backend_response_headers(conn.trailers) if conn.trailers else None, data)
                conn.reusable = conn.finished_cleanly()
                self._release()
                if responder.held:  # wait for the client to take it, as ``end`` does
                    self.timer = conn.loop.call_later(self.proxy.settings.idle_timeout, self._client_stalled)
                else:
                    self._end()
                return True
            if self.out:
                if not self.flushing:
                    self.flushing = True
                    conn.loop.call_soon(self._flush)
                return False  # its credit goes back once it is written (``_flush``)
        except ClientGone:
            self.client_gone()
            return True
        except BodyError as exc:
            self.backend_failed(BackendError(str(exc)))
            return True
        except BackendError as exc:
            self.backend_failed(exc)
            return True
        except Exception:  # noqa: BLE001 - one request's failure stays in that request (and its flow)
            log.exception("web request failed: %s %s", self.request.method, self.request.path)
            self.backend_failed(BackendError("internal_error"), internal=True)
            return True
        if responder.held:
            self.held = True
            conn.extend(self.proxy.settings.idle_timeout)
            return False
        return True

    def _flush(self) -> None:
        self.flushing = False
        if self.over or self.released or not self.out:
            return
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        try:
            self.responder.push(data)
        except ClientGone:
            self.client_gone()
            return
        if self.responder.held:
            self.held = True
            self.conn.extend(self.proxy.settings.idle_timeout)
        else:
            self.conn.release()

    def backend_failed(self, exc: BackendError, internal: bool = False) -> None:
        if self.over or self.released:
            return
        proxy, rec, responder = self.proxy, self.rec, self.responder
        self.conn.close()
        if isinstance(exc, BackendClosedEarly) and not responder.started and not responder.gone \
                and self.request.method in _SAFE_RETRY:
            # the pooled connection had been closed by the backend while idle: the request goes to
            # the ordinary path, which sends it once more, on a new connection or another pooled one
            proxy.counters["web_backend_retry"] += 1
            self.over = self.released = True
            self.forward.retried = True
            self.request.plan = (self.forward, rec, self.t0)
            proxy.door.in_flight -= 1
            responder.hand_back()
            return
        if internal:
            status, text, code = 500, "The edge could not handle this request.", "internal_error"
        else:
            proxy.counters[f"web_{exc.code}"] += 1
            log.info("app %s: %s", self.forward.route.app.name, exc)
            status, code = exc.status, exc.code
            text = str(exc) if exc.status == 504 else "The application broke off its answer."
        rec.code, rec.reason = code, text
        if responder.started:
            rec.status = rec.status or status
            self._flush()  # what the client was sent is counted, then it is cut
            responder.abort()
        else:
            reply = page(status, text, code)
            rec.status = reply.status
            if internal:
                responder.close_after()
            try:
                responder.reply(reply.status, reply.headers, reply.body)
            except ClientGone:
                responder.abort()
        self._release()
        self._end()

    def backend_expired(self, timeout: float) -> None:
        if self.held:  # the client stopped taking its response
            self._client_stalled()
        else:
            self.backend_failed(BackendTimeout(f"the application did not answer within {timeout:g} seconds"))

    # ------------------------------------------------------------------ the client (H1Connection)
    def client_resumed(self) -> None:
        if self.over:
            return
        if self.released:  # the whole response had arrived: the client has taken it now
            self._end()
        elif self.held:
            self.held = False
            self.conn.extend(self.forward.route.timeout)
            self.conn.release()

    def _client_stalled(self) -> None:
        if self.over:
            return
        self.proxy.counters["web_client_write_timeout"] += 1
        self.client_gone()

    def client_gone(self) -> None:
        if self.over:
            return
        if not self.released:
            self.conn.close()  # the response was not read to its end
            self._release()
        self.responder.abort()
        self._end()

    def _release(self) -> None:
        """The backend's part is over: its connection back to the pool when it ended cleanly."""
        if not self.released:
            self.released = True
            conn = self.conn
            conn.detach()
            self.proxy.door.pool.release(conn)  # closes it unless it ended cleanly

    def _end(self) -> None:
        """The request is over: recorded, and the client connection goes on to the next one."""
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        proxy = self.proxy
        proxy.door.in_flight -= 1
        try:
            proxy._emit(self.request, self.responder, self.rec, time.monotonic() - self.t0)
        finally:
            self.responder.settle()
