"""Sign-in, single sign-on across external hosts, sign-out: the ``/.ferryman/`` pages.

One central sign-in origin, the *sign-in host* (``auth_host``), holds the user's sign-in
(its ``__Host-ferryman`` cookie carries the principal and the refresh token). Each app
host has its own ``__Host-ferryman`` cookie with only the principal. The round trip, as
in application proxies and Pomerium:

1. A request to app host A without a valid session (GET/HEAD; other methods get a 401
   page) → A sets a state cookie ``__Host-ferryman-s-<id>`` (nonce, the path to return
   to, ``sign_in_lifetime``) and redirects to
   ``https://AUTH/.ferryman/sign_in?host=A&nonce=N``.
2. AUTH with a valid sign-in (refreshed through ``SignIn.refresh`` when its access token
   has expired) mints a one-time code sealed for host A (principal, nonce, ``code_lifetime``
   seconds) and redirects to ``https://A/.ferryman/callback?code=...``. Without one it
   shows the sign-in form (password + one-time code, OIDC button when configured),
   CSRF-protected (double-submit ``__Host-`` cookie + ``Origin`` check) and rate-limited
   per source address (``sign_in_rate`` per minute); a successful POST sets AUTH's cookie
   and continues as above.
3. A checks the code (sealed for A, not expired, never used before — ``OneTimeCache``),
   that the state cookie named by the code's nonce holds the same nonce (the browser that
   started the sign-in is the one finishing it), sets its session cookie and redirects to
   the saved path — always a path on A itself (no open redirect).

Sign-out (``POST /.ferryman/sign_out`` on any host, CSRF-protected): the app host clears
its cookie, refuses the session from now on (``RevokedSessions``), cuts its WebSockets
and idle backend connections, and sends the browser to AUTH with a sealed one-time
sign-out ticket; AUTH calls ``SignIn.sign_out`` (the control plane revokes the session,
which every edge learns from its snapshot), clears its cookie and sends the browser back
to A, which starts a new sign-in. ``/.ferryman/`` shows who is signed in; ``robots.txt``
disallows everything; ``/.ferryman/jwks.json`` publishes the assertion keys.

OIDC: ``/.ferryman/oidc/start`` and ``/.ferryman/oidc/callback`` on AUTH bind the
provider round trip to the browser with a sealed ``state`` cookie and leave the provider
protocol (PKCE, nonce, token checks) to the ``OidcSignIn`` the edge supplies.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from urllib.parse import parse_qs, urlencode

from .exchange import BodyTooLarge, ClientTimeout, Headers, Request
from .limits import KeyedBuckets, retry_after
from .model import OidcSignIn, Principal, SignIn, SignInError, SignInResult
from .pages import ROBOTS, error_page, html_headers, render
from .routes import Route
from .session import (
    COOKIE, CSRF_COOKIE, OIDC_COOKIE, STATE_PREFIX, AppSession, AuthSession, Code, OidcState, OneTimeCache,
    RevokedSessions, Sealer, SealError, SignInState, SignOutTicket, clear_cookie, cookie_header, new_nonce,
    parse_cookies, state_cookie_name,
)

log = logging.getLogger("ferryman.edge.web")

FORM_LIMIT = 16384
MAX_STATE_COOKIES = 4
REFRESH_MARGIN = 30  # seconds before an access token's end that the sign-in host refreshes it
OPENED_COOKIES = 10000  # app-host cookies remembered once opened (see SsoPages.app_session)
REFRESH_MEMORY = 60.0  # seconds a refresh's result answers a concurrent request with the same old token
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_CSRF = re.compile(r"[A-Za-z0-9_-]{22,64}")


class Reply:
    """A complete small response (pages, redirects, JSON)."""

    __slots__ = ("status", "headers", "body", "code", "reason", "principal")

    def __init__(self, status: int, headers: Headers, body: bytes = b"", code: str = "", reason: str = "",
                 principal: Principal | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.code = code
        self.reason = reason
        self.principal = principal


def page(status: int, reason: str, code: str, *, link: str = "", link_text: str = "", extra: Headers | None = None,
         title: str = "") -> Reply:
    body = error_page(status, reason, code, link=link, link_text=link_text, title=title)
    return Reply(status, html_headers(body, extra), body, code, reason)


def redirect(location: str, extra: Headers | None = None, status: int = 302, code: str = "", reason: str = "") -> Reply:
    headers: Headers = [(b"location", location.encode("ascii")), (b"content-length", b"0"),
                        (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer")]
    if extra:
        headers.extend(extra)
    return Reply(status, headers, b"", code, reason)


def safe_return(target: str) -> str:
    """A same-host path to return to after sign-in (anything else becomes ``/``)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(ord(c) < 0x21 for c in target):
        return "/"
    return target


class SsoPages:
    def __init__(self, *, settings, sealer: Sealer, sign_in: SignIn, oidc: OidcSignIn | None, counters: Counter,
                 revoked: RevokedSessions, routes: Callable[[], dict[str, Route]], on_sign_out: Callable[[str, str], None],
                 jwks: Callable[[], dict]) -> None:
        self.settings = settings
        self.auth_host = settings.auth_host
        self.sealer = sealer
        self.sign_in = sign_in
        self.oidc = oidc
        self.counters = counters
        self.revoked = revoked
        self.routes = routes
        self.on_sign_out = on_sign_out
        self.jwks = jwks
        self.codes = OneTimeCache(settings.code_cache)
        self.sign_in_buckets = KeyedBuckets(settings.sign_in_rate / 60.0, settings.sign_in_rate)
        self._refreshing: dict[str, asyncio.Future[SignInResult]] = {}
        self._refreshed: OrderedDict[str, tuple[float, SignInResult]] = OrderedDict()
        self._opened: dict[tuple[str, str], AppSession] = {}

    # ------------------------------------------------------------------ app-host sessions
    def app_session(self, route: Route, cookies: dict[str, str], now: float) -> AppSession | None:
        """The session of an app host's cookie, or ``None`` (refusals are counted).

        Opened cookies are remembered by their exact text and host (a bounded table), so a
        busy session costs one decryption, not one per request; expiry and revocation are
        still checked on every request.
        """
        token = cookies.get(COOKIE)
        if not token:
            return None
        key = (route.host, token)
        session = self._opened.get(key)
        if session is None:
            try:
                session = self.sealer.open(AppSession, route.host, token, now)
            except SealError as exc:
                self.counters[f"web_cookie_refused_{exc.reason}"] += 1
                return None
            if len(self._opened) >= OPENED_COOKIES:
                self._opened.clear()
            self._opened[key] = session
        elif session.exp <= now:
            del self._opened[key]
            self.counters["web_cookie_refused_expired"] += 1
            return None
        if session.principal.session_id in self.revoked:
            self.counters["web_cookie_refused_revoked"] += 1
            return None
        return session

    def forget_opened(self) -> None:
        self._opened.clear()

    def start_sign_in(self, route: Route, request: Request, cookies: dict[str, str]) -> Reply:
        """Redirect a browser without a session on ``route`` to the sign-in host."""
        if request.method not in ("GET", "HEAD") or request.websocket:
            return page(401, "Sign in first: open this application's address in the browser to sign in.",
                        "sign_in_required", link="/", link_text="Sign in")
        nonce = new_nonce()
        now = time.time()
        state = SignInState(nonce=nonce, return_to=safe_return(request.target), exp=int(now + self.settings.sign_in_lifetime))
        extra: Headers = []
        olds = [name for name in cookies if name.startswith(STATE_PREFIX)]
        if len(olds) >= MAX_STATE_COOKIES:  # abandoned sign-ins: never let them grow the Cookie header
            extra.extend((b"set-cookie", clear_cookie(name)) for name in olds)
        extra.append((b"set-cookie", cookie_header(state_cookie_name(nonce), self.sealer.seal(route.host, state),
                                                   max_age=int(self.settings.sign_in_lifetime))))
        query = urlencode({"host": route.host, "nonce": nonce})
        return redirect(f"https://{self.auth_host}/.ferryman/sign_in?{query}", extra, code="sign_in_required",
                        reason="no valid session: sent to sign-in")

    async def app_path(self, route: Route, request: Request, cookies: dict[str, str]) -> Reply:
        """``/.ferryman/*`` on an app host."""
        path = request.path
        now = time.time()
        if path == "/.ferryman/callback":
            return self._callback(route, request, cookies, now)
        if path == "/.ferryman/jwks.json":
            return self._jwks()
        session = self.app_session(route, cookies, now)
        if path in ("/.ferryman", "/.ferryman/"):
            if session is None:
                return self.start_sign_in(route, request, cookies)
            return self._who(route.host, session.principal, session.exp, cookies)
        if path == "/.ferryman/sign_out":
            if request.method == "POST":
                refused = await self._csrf_refusal(request, cookies)
                if refused is not None:
                    return refused
                sid = session.principal.session_id if session is not None else ""
                if session is not None:
                    self.revoked.add(sid, session.exp)
                    self.on_sign_out(sid, "signed out")
                ticket = SignOutTicket(jti=new_nonce(), session_id=sid, exp=int(now + self.settings.code_lifetime))
                query = urlencode({"ticket": self.sealer.seal(self.auth_host, ticket), "host": route.host})
                return redirect(f"https://{self.auth_host}/.ferryman/sign_out?{query}",
                                [(b"set-cookie", clear_cookie(COOKIE))], status=303, code="signed_out",
                                reason="signed out")
            return self._confirm_sign_out(cookies)
        return page(404, "There is no such Ferryman page.", "not_found")

    def _callback(self, route: Route, request: Request, cookies: dict[str, str], now: float) -> Reply:
        params = parse_qs(request.query, max_num_fields=8)
        token = (params.get("code") or [""])[0]
        retry = dict(link="/", link_text="Try again")
        try:
            code = self.sealer.open(Code, route.host, token, now)
        except SealError as exc:
            self.counters[f"web_code_refused_{exc.reason}"] += 1
            return page(400, "This sign-in link is not valid here or has expired.", "bad_code", **retry)
        state_name = state_cookie_name(code.nonce)
        try:
            state = self.sealer.open(SignInState, route.host, cookies.get(state_name, ""), now)
        except SealError as exc:
            self.counters[f"web_state_refused_{exc.reason}"] += 1
            return page(400, "The sign-in was started in another browser or has expired (the sign-in cookie is "
                             "missing). Cookies must be enabled for this site.", "bad_state", **retry)
        if not hmac.compare_digest(state.nonce, code.nonce):
            self.counters["web_state_refused_mismatch"] += 1
            return page(400, "This sign-in link belongs to another sign-in.", "bad_state", **retry)
        try:
            self.codes.use(code.jti, code.exp, now)
        except SealError as exc:
            self.counters[f"web_code_refused_{exc.reason}"] += 1
            if exc.reason == "busy":
                return page(503, "Too many sign-ins are in progress on this edge; try again in a minute.",
                            "sign_in_busy", extra=[(b"retry-after", b"60")])
            return page(400, "This sign-in link was already used.", "code_replayed", **retry)
        principal = code.principal
        if principal.session_id in self.revoked:
            return page(401, "This session has ended; sign in again.", "session_revoked", **retry)
        exp = min(principal.expires, code.session_expires)
        value = self.sealer.seal(route.host, AppSession(principal=principal, exp=exp, iat=int(now)))
        app = route.app
        cookie = cookie_header(COOKIE, value, max_age=exp - int(now) if app.cookie_persistent else None,
                               http_only=app.cookie_http_only, same_site=app.cookie_same_site)
        reply = redirect(state.return_to, [(b"set-cookie", cookie), (b"set-cookie", clear_cookie(state_name))],
                         code="signed_in", reason="signed in")
        reply.principal = principal
        return reply

    # ------------------------------------------------------------------ sign-in host
    async def auth_path(self, request: Request, cookies: dict[str, str]) -> Reply:
        path = request.path
        now = time.time()
        if path == "/robots.txt":
            return Reply(200, [(b"content-type", b"text/plain; charset=utf-8"),
                               (b"content-length", str(len(ROBOTS)).encode())], ROBOTS)
        if path == "/":
            return redirect("/.ferryman/")
        if path == "/.ferryman/jwks.json":
            return self._jwks()
        if path == "/.ferryman/sign_in":
            if request.method == "POST":
                return await self._sign_in_post(request, cookies, now)
            params = parse_qs(request.query, max_num_fields=8)
            host, nonce = (params.get("host") or [""])[0], (params.get("nonce") or [""])[0]
            bad = self._check_target(host, nonce)
            if bad is not None:
                return bad
            session, extra = await self._auth_session(cookies, request.source_ip, now)
            if session is not None:
                return self._continue(session, host, nonce, extra, now)
            return self._form(host, nonce, cookies, extra=extra)
        if path in ("/.ferryman", "/.ferryman/"):
            session, extra = await self._auth_session(cookies, request.source_ip, now)
            if session is None:
                return redirect("/.ferryman/sign_in", extra)
            reply = self._who(self.auth_host, session.principal, session.session_expires, cookies)
            reply.headers.extend(extra)
            return reply
        if path == "/.ferryman/sign_out":
            return await self._auth_sign_out(request, cookies, now)
        if path == "/.ferryman/oidc/start" and self.oidc is not None:
            return await self._oidc_start(request, now)
        if path == "/.ferryman/oidc/callback" and self.oidc is not None:
            return await self._oidc_callback(request, cookies, now)
        return page(404, "There is nothing at this address of the sign-in site.", "not_found")

    def _check_target(self, host: str, nonce: str) -> Reply | None:
        if not host and not nonce:
            return None
        route = self.routes().get(host)
        if route is None or route.passthrough:
            return page(400, "This sign-in is for an application this site does not serve.", "unknown_app")
        if not _NONCE.fullmatch(nonce):
            return page(400, "This sign-in request is malformed (nonce).", "bad_request")
        return None

    def _continue(self, session: AuthSession, host: str, nonce: str, extra: Headers, now: float) -> Reply:
        """Signed in on the sign-in host: hand a one-time code to the app host (or show who is signed in)."""
        if not host:
            return redirect("/.ferryman/", extra, status=303)
        code = Code(jti=new_nonce(), nonce=nonce, principal=session.principal, session_expires=session.session_expires,
                    exp=int(now + self.settings.code_lifetime))
        query = urlencode({"code": self.sealer.seal(host, code)})
        return redirect(f"https://{host}/.ferryman/callback?{query}", extra, status=303, code="code_issued",
                        reason="single sign-on")

    async def _auth_session(self, cookies: dict[str, str], source: str, now: float) -> tuple[AuthSession | None, Headers]:
        """The sign-in host's session (refreshed when its access token is at its end) and cookie updates."""
        token = cookies.get(COOKIE)
        if not token:
            return None, []
        try:
            session = self.sealer.open(AuthSession, self.auth_host, token, now)
        except SealError as exc:
            self.counters[f"web_cookie_refused_{exc.reason}"] += 1
            return None, [(b"set-cookie", clear_cookie(COOKIE))]
        if session.principal.session_id in self.revoked:
            self.counters["web_cookie_refused_revoked"] += 1
            return None, [(b"set-cookie", clear_cookie(COOKIE))]
        if session.principal.expires - REFRESH_MARGIN > now:
            return session, []
        try:
            result = await self._refresh(session.refresh_token, source)
        except SignInError as exc:
            self.counters["web_refresh_refused"] += 1
            log.info("web session refresh refused (%s): %s", exc.code, exc.message)
            return None, [(b"set-cookie", clear_cookie(COOKIE))]
        fresh = AuthSession(principal=result.principal, refresh_token=result.refresh_token,
                            session_expires=result.session_expires, iat=int(now))
        return fresh, [(b"set-cookie", self._auth_cookie(fresh, now))]

    async def _refresh(self, refresh_token: str, source: str) -> SignInResult:
        """One refresh per refresh token at a time: concurrent requests with the same (single-use)
        token share the result instead of presenting it twice (which would revoke the session)."""
        key = hashlib.sha256(refresh_token.encode()).hexdigest()
        now = time.monotonic()
        while self._refreshed:
            first_key, (stamp, _) = next(iter(self._refreshed.items()))
            if now - stamp < REFRESH_MEMORY:
                break
            del self._refreshed[first_key]
        done = self._refreshed.get(key)
        if done is not None:
            return done[1]
        running = self._refreshing.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[SignInResult] = asyncio.get_running_loop().create_future()
        self._refreshing[key] = future
        try:
            result = await self.sign_in.refresh(refresh_token, source)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: concurrent waiters re-raise it
            raise
        finally:
            self._refreshing.pop(key, None)
        future.set_result(result)
        self._refreshed[key] = (now, result)
        if len(self._refreshed) > 10000:
            self._refreshed.popitem(last=False)
        return result

    def _auth_cookie(self, session: AuthSession, now: float) -> bytes:
        max_age = session.session_expires - int(now) if self.settings.sso_persistent else None
        return cookie_header(COOKIE, self.sealer.seal(self.auth_host, session), max_age=max_age)

    def _form(self, host: str, nonce: str, cookies: dict[str, str], *, error: str = "", upn: str = "",
              status: int = 200, extra: Headers | None = None) -> Reply:
        csrf, csrf_cookie = self._csrf(cookies)
        route = self.routes().get(host) if host else None
        body = render("sign_in.html", destination=route.app.name if route else "", error=error, csrf=csrf, host=host,
                      nonce=nonce, upn=upn, oidc_label=self.oidc.label if self.oidc is not None else "")
        headers = list(extra or [])
        if csrf_cookie:
            headers.append((b"set-cookie", csrf_cookie))
        return Reply(status, html_headers(body, headers), body, "sign_in_form" if not error else "sign_in_failed",
                     error or "sign-in form")

    async def _sign_in_post(self, request: Request, cookies: dict[str, str], now: float) -> Reply:
        wait = self.sign_in_buckets.take(request.source_ip)
        if wait > 0:
            self.counters["web_sign_in_rate_limited"] += 1
            return page(429, "Too many sign-in attempts from your address; wait a little and try again.",
                        "rate_limited", extra=[(b"retry-after", retry_after(wait))])
        form = await read_form(request)
        if isinstance(form, Reply):
            return form
        refused = self._csrf_check(request, cookies, form)
        if refused is not None:
            return refused
        host, nonce = form.get("host", ""), form.get("nonce", "")
        bad = self._check_target(host, nonce)
        if bad is not None:
            return bad
        upn, password, otp = form.get("upn", "").strip(), form.get("password", ""), form.get("otp", "").strip()
        if not upn or not password or len(upn) > 256 or len(password) > 1024 or len(otp) > 64:
            return self._form(host, nonce, cookies, error="Enter your user name and password.", upn=upn[:256], status=400)
        try:
            result = await self.sign_in.sign_in(upn, password, otp, request.source_ip)
        except SignInError as exc:
            self.counters[f"web_sign_in_refused_{exc.code}"] += 1
            extra = [(b"retry-after", retry_after(exc.retry_after))] if exc.status == 429 else None
            return self._form(host, nonce, cookies, error=exc.message, upn=upn, status=exc.status, extra=extra)
        self.counters["web_sign_in"] += 1
        session = AuthSession(principal=result.principal, refresh_token=result.refresh_token,
                              session_expires=result.session_expires, iat=int(now))
        reply = self._continue(session, host, nonce, [(b"set-cookie", self._auth_cookie(session, now))], now)
        reply.principal = result.principal
        return reply

    async def _auth_sign_out(self, request: Request, cookies: dict[str, str], now: float) -> Reply:
        params = parse_qs(request.query, max_num_fields=8)
        ticket_text = (params.get("ticket") or [""])[0]
        back = ""
        if request.method == "POST":
            refused = await self._csrf_refusal(request, cookies)
            if refused is not None:
                return refused
            wanted: str | None = None  # whatever session this browser has
        elif ticket_text:
            try:
                ticket = self.sealer.open(SignOutTicket, self.auth_host, ticket_text, now)
                self.codes.use(ticket.jti, ticket.exp, now)
            except SealError as exc:
                self.counters[f"web_ticket_refused_{exc.reason}"] += 1
                return page(400, "This sign-out link is not valid or has expired.", "bad_ticket",
                            link="/.ferryman/sign_out", link_text="Sign out")
            wanted = ticket.session_id or None
            host = (params.get("host") or [""])[0]
            if host in self.routes():
                back = f"https://{host}/"
        else:
            return self._confirm_sign_out(cookies)
        session = None
        token = cookies.get(COOKIE)
        if token:
            try:
                session = self.sealer.open(AuthSession, self.auth_host, token, now)
            except SealError:
                session = None
        principal = None
        if session is not None and (wanted is None or wanted == session.principal.session_id):
            principal = session.principal
            await self._end_session(session)
        if wanted:
            self.revoked.add(wanted, now + 86400)
            self.on_sign_out(wanted, "signed out")
        extra = [(b"set-cookie", clear_cookie(COOKIE))] if principal is not None or wanted is None else []
        if back:
            return redirect(back, extra, status=303, code="signed_out", reason="signed out")
        body = render("signed_out.html", link="/.ferryman/sign_in")
        return Reply(200, html_headers(body, extra), body, "signed_out", "signed out")

    async def _end_session(self, session: AuthSession) -> None:
        sid = session.principal.session_id
        self.revoked.add(sid, session.session_expires)
        self.on_sign_out(sid, "signed out")
        try:
            await self.sign_in.sign_out(session.principal, session.refresh_token)
        except SignInError as exc:
            log.info("sign-out of session %s at the control plane refused (%s): %s", sid, exc.code, exc.message)
        except Exception:  # noqa: BLE001 - the browser is signed out here whatever the control plane says
            log.exception("sign-out of session %s at the control plane failed", sid)

    async def _oidc_start(self, request: Request, now: float) -> Reply:
        params = parse_qs(request.query, max_num_fields=8)
        host, nonce = (params.get("host") or [""])[0], (params.get("nonce") or [""])[0]
        bad = self._check_target(host, nonce)
        if bad is not None:
            return bad
        wait = self.sign_in_buckets.take(request.source_ip)  # each start holds a pending sign-in upstream
        if wait > 0:
            self.counters["web_sign_in_rate_limited"] += 1
            return page(429, "Too many sign-in attempts from your address; wait a little and try again.",
                        "rate_limited", extra=[(b"retry-after", retry_after(wait))])
        state = new_nonce()
        sealed = self.sealer.seal(self.auth_host, OidcState(state=state, host=host, nonce=nonce,
                                                            exp=int(now + self.settings.sign_in_lifetime)))
        try:
            url = await self.oidc.begin(f"https://{self.auth_host}/.ferryman/oidc/callback", state)
        except SignInError as exc:
            return page(exc.status if exc.status >= 400 else 503, exc.message, exc.code)
        if not url.startswith(("https://", "http://127.0.0.1:", "http://[::1]:", "http://localhost:")):  # an https provider, or one on loopback
            return page(503, "The external sign-in provider is not configured correctly.", "oidc_unavailable")
        return redirect(url, [(b"set-cookie", cookie_header(OIDC_COOKIE, sealed,
                                                            max_age=int(self.settings.sign_in_lifetime)))])

    async def _oidc_callback(self, request: Request, cookies: dict[str, str], now: float) -> Reply:
        params = {k: v[0] for k, v in parse_qs(request.query, max_num_fields=16).items()}
        try:
            saved = self.sealer.open(OidcState, self.auth_host, cookies.get(OIDC_COOKIE, ""), now)
        except SealError as exc:
            self.counters[f"web_oidc_state_refused_{exc.reason}"] += 1
            return page(400, "The sign-in with the external provider was started in another browser or has expired.",
                        "bad_state", link="/.ferryman/sign_in", link_text="Sign in again")
        if not hmac.compare_digest(params.get("state", "").encode(), saved.state.encode()):
            self.counters["web_oidc_state_refused_mismatch"] += 1
            return page(400, "The external provider's answer does not belong to this sign-in (state).", "bad_state",
                        link="/.ferryman/sign_in", link_text="Sign in again")
        try:
            result = await self.oidc.finish(params, f"https://{self.auth_host}/.ferryman/oidc/callback",
                                            request.source_ip)
        except SignInError as exc:
            return page(exc.status if exc.status >= 400 else 401, exc.message, exc.code,
                        link="/.ferryman/sign_in", link_text="Sign in again")
        session = AuthSession(principal=result.principal, refresh_token=result.refresh_token,
                              session_expires=result.session_expires, iat=int(now))
        extra = [(b"set-cookie", self._auth_cookie(session, now)), (b"set-cookie", clear_cookie(OIDC_COOKIE))]
        host = saved.host if saved.host in self.routes() else ""
        reply = self._continue(session, host, saved.nonce, extra, now)
        reply.principal = result.principal
        return reply

    # ------------------------------------------------------------------ shared pages
    def _who(self, host: str, principal: Principal, until: int, cookies: dict[str, str]) -> Reply:
        csrf, csrf_cookie = self._csrf(cookies)
        body = render("signed_in.html", upn=principal.upn, user_id=principal.user_id, session_id=principal.session_id,
                      device=principal.device_id, amr=", ".join(principal.amr) or "-", host=host,
                      until=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until)), csrf=csrf)
        extra = [(b"set-cookie", csrf_cookie)] if csrf_cookie else []
        return Reply(200, html_headers(body, extra), body, "who", "signed-in page", principal=principal)

    def _confirm_sign_out(self, cookies: dict[str, str]) -> Reply:
        csrf, csrf_cookie = self._csrf(cookies)
        body = render("sign_out.html", csrf=csrf)
        extra = [(b"set-cookie", csrf_cookie)] if csrf_cookie else []
        return Reply(200, html_headers(body, extra), body, "sign_out_form", "sign-out form")

    def _jwks(self) -> Reply:
        body = json.dumps(self.jwks()).encode()
        return Reply(200, [(b"content-type", b"application/jwk-set+json"), (b"content-length", str(len(body)).encode()),
                           (b"cache-control", b"public, max-age=300")], body, "jwks", "keys")

    # ------------------------------------------------------------------ CSRF
    @staticmethod
    def _csrf(cookies: dict[str, str]) -> tuple[str, bytes | None]:
        value = cookies.get(CSRF_COOKIE, "")
        if _CSRF.fullmatch(value):
            return value, None
        value = secrets.token_urlsafe(24)
        return value, cookie_header(CSRF_COOKIE, value, same_site="Strict")

    def _csrf_check(self, request: Request, cookies: dict[str, str], form: dict[str, str]) -> Reply | None:
        origin = request.header(b"origin")
        site = request.header(b"sec-fetch-site")
        expected = f"https://{request.host}".encode()
        cookie = cookies.get(CSRF_COOKIE, "")
        # as bytes: compare_digest raises on non-ASCII text, which a hostile form may send
        ok = bool(cookie) and hmac.compare_digest(form.get("csrf", "").encode(), cookie.encode())
        if origin and origin != b"null" and origin != expected:
            ok = False
        if site and site not in (b"same-origin", b"none"):
            ok = False
        if not ok:
            self.counters["web_csrf_refused"] += 1
            return page(403, "This form was not sent from this site's own page (or it is too old); reload the page "
                             "and try again.", "csrf_refused", link=request.path, link_text="Reload")
        return None

    async def _csrf_refusal(self, request: Request, cookies: dict[str, str]) -> Reply | None:
        form = await read_form(request)
        if isinstance(form, Reply):
            return form
        return self._csrf_check(request, cookies, form)


async def read_form(request: Request) -> dict[str, str] | Reply:
    """A small ``application/x-www-form-urlencoded`` body (at most ``FORM_LIMIT`` bytes)."""
    ctype = request.header(b"content-type").split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        return page(400, "This form must be sent as application/x-www-form-urlencoded.", "bad_form")
    if request.content_length is not None and request.content_length > FORM_LIMIT:
        return page(413, f"This form is larger than {FORM_LIMIT} bytes.", "body_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            data = await request.body.read()
            if not data:
                break
            size += len(data)
            if size > FORM_LIMIT:
                return page(413, f"This form is larger than {FORM_LIMIT} bytes.", "body_too_large")
            chunks.append(data)
    except ClientTimeout:
        return page(408, "The form did not arrive in time.", "body_timeout")
    except BodyTooLarge:
        return page(413, f"This form is larger than {FORM_LIMIT} bytes.", "body_too_large")
    try:
        text = b"".join(chunks).decode("utf-8")
        parsed = parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        return page(400, "This form could not be read.", "bad_form")
    return {k: v[0] for k, v in parsed.items()}
