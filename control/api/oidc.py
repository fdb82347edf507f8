"""Sign-in through an external OIDC provider, under ``/v1/auth/oidc`` (public; see ``control.oidc``
for the whole round trip and how it is bound to the agent and the browser).

- ``POST /v1/auth/oidc/start`` ``{device: {csr_pem, name, os, os_version}, redirect_port,
  poll_challenge}``: the CSR is checked, a sign-in is recorded; answers ``{login_id,
  begin_url, poll_interval, expires_in}``. At most ``FERRYMAN_OIDC_STARTS_PER_MINUTE`` per
  source address (429 ``rate_limited`` beyond).
- ``GET /v1/auth/oidc/begin?login=...`` (the browser, sent by the agent's loopback page):
  once; sets the sign-in's browser cookie and redirects to the provider.
- ``GET /v1/auth/oidc/callback?code&state`` (the provider sends the browser here,
  ``FERRYMAN_OIDC_REDIRECT_URI``): needs the cookie ``begin`` set; the code is traded and
  the ID token verified. The user is the one linked to the token's (``iss``, ``sub``);
  an account not linked yet is linked to the user whose UPN is the token's ``email`` only
  when ``email_verified`` is true (``FERRYMAN_OIDC_UPN_CLAIM`` = ``email``), else an admin
  links it (``PATCH /v1/users/{user}`` ``{oidc_subject}``); no user is created. The
  browser is sent to the agent's loopback (``http://127.0.0.1:<redirect_port>/ferryman/oidc
  ?handoff=...``), or gets a page saying why not.
- ``POST /v1/auth/oidc/poll`` ``{login_id, poll_verifier, handoff?}``: 202 ``{status:
  "pending"}`` until the browser brought the handoff to the agent; with it, once, what a
  password sign-in answers (``SignInResponse``, 200: session with ``amr`` ``["pwd", "mfa"]``
  when the token's ``amr`` has one of ``FERRYMAN_OIDC_MFA_AMR`` and ``auth_time`` the
  token's, the device registered and certified, access and refresh tokens), or the
  callback's refusal (its status and code: ``unknown_user`` 403, ``oidc_not_linked`` 403,
  ``oidc_email_unverified`` 403, ``oidc_account_mismatch`` 403, ``account_disabled`` 401,
  ``oidc_token_invalid`` / ``oidc_code_refused`` 401, ``oidc_denied`` 403, ...). An unknown,
  expired or collected login id, or a wrong poll verifier, is 404 ``oidc_login_unknown``; a
  handoff of another sign-in ends this one (403 ``oidc_handoff_invalid``).

For an edge's HTTPS front door (browser sign-in to web apps; the edge calls these node
routes with its node token, ``guards.require_node``, edges only):

- ``POST /v1/node/web-oidc/start`` ``{return_to, state}``: ``return_to`` is the front
  door's ``https://<sign-in host>/.ferryman/oidc/callback``, ``state`` the front door's own
  (it is also the poll verifier); answers ``{login_id, authorization_url, expires_in}``.
  The browser goes straight to the provider (no ``begin``: the front door binds the sign-in
  to the browser with its sealed state cookie), comes back to the callback above, and is
  sent to ``return_to?state&login&handoff``.
- ``POST /v1/node/web-oidc/finish`` ``{login_id, state, handoff}``: once, what a password
  sign-in without a device answers (``SignInResponse``), or the callback's refusal; a
  sign-in the browser has not finished is 409 ``oidc_pending``.

Nothing here logs an authorization code, a state, a begin id, a handoff or a verifier; the
callback's query string is kept out of uvicorn's access log (``control.server``).
With ``FERRYMAN_OIDC_ISSUER`` empty every route answers 404 ``oidc_not_configured``.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

from urllib.parse import urlencode, urlsplit

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
from litestar.openapi import ResponseSpec
from sqlalchemy import select

from control.ca import CaError, _verified_key
from control.oidc import POLL_INTERVAL, Oidc, OidcError, PendingLogin
from control.store import StoreError, users
from control.store.models import User

from .auth import throttled
from .errors import STORE_STATUS
from .guards import Api, NodeCaller, require_node
from .identity_schemas import DeviceIn, SignInResponse
from .schemas import ErrorBody, _Request
from .signin import certify_device, signed_in
from .throttle import Throttled

log = logging.getLogger("ferryman.control.oidc")

NOT_CONFIGURED = "OIDC sign-in is not configured on this control plane"
MAX_PARAM = 4096  # characters of a callback query parameter
LOOPBACK_PATH = "/ferryman/oidc"  # where the agent's loopback listener takes the handoff
COOKIE_PREFIX = "ferryman-oidc-"
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "Referrer-Policy": "no-referrer",  # the callback URL carries the authorization code
    "X-Content-Type-Options": "nosniff",
}
_State = Annotated[str, msgspec.Meta(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
_Secret = Annotated[str, msgspec.Meta(min_length=43, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


class OidcStartRequest(_Request):
    device: DeviceIn
    redirect_port: Annotated[int, msgspec.Meta(ge=1024, le=65535)]  # the agent's listener on 127.0.0.1
    poll_challenge: Annotated[str, msgspec.Meta(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_-]+$")]


class OidcStartResponse(msgspec.Struct):
    login_id: str
    begin_url: str  # where the agent's loopback page sends the browser (works once)
    poll_interval: int  # seconds
    expires_in: int  # seconds


class OidcPollRequest(_Request):
    login_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    poll_verifier: _Secret  # its SHA-256 (base64url) is the start's poll_challenge
    handoff: _Secret | None = None  # what the browser brought to the agent's loopback


class OidcPending(msgspec.Struct):
    status: Literal["pending"]
    expires_in: int


@dataclass(frozen=True)
class Identity:
    """Who the callback proved signed in (kept with the pending sign-in until the agent collects it)."""

    user_id: str
    upn: str
    amr: list[str]
    auth_time: datetime


def _oidc(api: Api) -> Oidc:
    if api.oidc is None:
        raise OidcError(404, "oidc_not_configured", NOT_CONFIGURED)
    return api.oidc


def _error(_request: Request, exc: OidcError) -> Response[ErrorBody]:
    headers = {"Retry-After": "60"} if exc.status == 503 else None
    return Response(ErrorBody(error=str(exc), code=exc.code), status_code=exc.status, media_type="application/json",
                    headers=headers)


@post("/start", sync_to_thread=True, status_code=200)
def start(api: Api, request: Request, data: OidcStartRequest) -> OidcStartResponse:
    """Start a sign-in at the OIDC provider for this device (CSR), for the agent listening on ``redirect_port``."""
    oidc = _oidc(api)
    wait = api.oidc_starts.take(request.client.host if request.client else None)
    if wait is not None:
        raise Throttled(f"too many OIDC sign-ins started from this address ({api.oidc_starts.limit} a minute)", wait)
    _verified_key(data.device.csr_pem.encode())  # a CSR that cannot be signed is refused now, not after the browser
    device = {"csr_pem": data.device.csr_pem, "name": data.device.name, "os": data.device.os,
              "os_version": data.device.os_version}
    login = oidc.start(device, data.poll_challenge, data.redirect_port)
    return OidcStartResponse(login_id=login.login_id, begin_url=oidc.begin_url(login), poll_interval=POLL_INTERVAL,
                             expires_in=oidc.logins.remaining(login))


# ---------------------------------------------------------------------------- the browser


def _page(status: int, title: str, message: str, headers: dict[str, str] | None = None) -> Response[str]:
    body = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Ferryman: {html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em}}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>\n")
    return Response(body, status_code=status, media_type="text/html; charset=utf-8",
                    headers={**_PAGE_HEADERS, **(headers or {})})


def _param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if len(value) > MAX_PARAM:
        raise OidcError(400, "validation", f"invalid request: query parameter {name!r} is longer than {MAX_PARAM} "
                                           f"characters")
    return value


def _cookie(oidc: Oidc, login: PendingLogin, value: str, max_age: int) -> str:
    secure = "; Secure" if oidc.secure_cookie else ""
    return (f"{COOKIE_PREFIX}{login.tag}={value}; Path={oidc.cookie_path}; Max-Age={max_age}; HttpOnly; "
            f"SameSite=Lax{secure}")


@get("/begin", sync_to_thread=True, media_type=MediaType.HTML)
def begin(api: Api, request: Request) -> Response[str]:
    """The browser's first stop (from the agent's loopback page): binds the sign-in to this browser, then
    sends it to the OIDC provider."""
    oidc = _oidc(api)
    try:
        begin_id = _param(request, "login")
        if not begin_id:
            raise OidcError(400, "validation", "the sign-in link has no 'login': open the URL that `ferryman client "
                                               "login --oidc` printed")
        login, cookie = oidc.logins.begin(begin_id)
        url = oidc.authorization_url(login)
    except OidcError as exc:
        return _page(exc.status, "sign-in failed", str(exc))
    return Response("", status_code=302, media_type=MediaType.HTML,
                    headers={**_PAGE_HEADERS, "Location": url,
                             "Set-Cookie": _cookie(oidc, login, cookie, oidc.logins.remaining(login) + 1)})


def _identity(api: Api, oidc: Oidc, code: str, login: PendingLogin) -> Identity:
    """Redeem the code and find (or link) the user the ID token's account belongs to."""
    claims = oidc.provider.redeem(code, login.verifier, login.nonce)
    issuer, subject = oidc.provider.account_of(claims)
    amr = oidc.provider.amr_of(claims)
    auth_time = min(datetime.now(UTC), datetime.fromtimestamp(oidc.provider.auth_time_of(claims), UTC))
    with api.store.begin() as session:
        user = users.find_oidc_user(session, issuer, subject)
        if user is None:  # first sign-in of this account: only a verified email links it
            upn = oidc.provider.linkable_upn(claims)
            user = session.scalar(select(User).where(User.upn == upn))
            if user is None:
                raise OidcError(403, "unknown_user",
                                f"{upn!r} (the OIDC provider's {oidc.config.upn_claim!r} claim) is not a Ferryman "
                                f"user: an administrator must create the user first (users are not created at "
                                f"sign-in)")
            if user.oidc_subject is not None:
                raise OidcError(403, "oidc_account_mismatch",
                                f"user {user.upn} is linked to another account of its OIDC provider than this one "
                                f"(subject {subject!r}): an administrator changes the link if this one is right")
            users.link_oidc(session, f"user:{user.id}", user.id, issuer, subject)
        if user.disabled:  # (the link made above is rolled back with the refusal)
            raise StoreError("account_disabled", users.ACCOUNT_DISABLED)
        return Identity(user_id=user.id, upn=user.upn, amr=amr, auth_time=auth_time)


@get("/callback", sync_to_thread=True, media_type=MediaType.HTML)
def callback(api: Api, request: Request) -> Response[str]:
    """Where the OIDC provider sends the user's browser back (``code`` and ``state``): proves who signed in,
    then sends the browser to the agent's loopback."""
    oidc = _oidc(api)
    try:
        state = _param(request, "state")
        if not state:
            raise OidcError(400, "validation", "the OIDC provider's answer has no 'state': open the sign-in URL "
                                               "that `ferryman client login --oidc` printed")
        login_tag = oidc.logins.tag_of(state)
        cookie = request.cookies.get(COOKIE_PREFIX + login_tag) if login_tag else None
        login = oidc.logins.claim(state, cookie)
    except OidcError as exc:
        return _page(exc.status, "sign-in failed", str(exc))
    clear = {"Set-Cookie": _cookie(oidc, login, "", 0)}
    try:
        denied = _param(request, "error")
        code = _param(request, "code")
        if denied is not None:
            description = _param(request, "error_description") or ""
            raise OidcError(403, "oidc_denied", f"the OIDC provider did not sign you in ({denied}"
                                                f"{': ' + description[:300] if description else ''})")
        if not code:
            raise OidcError(400, "validation", "the OIDC provider's answer has neither 'code' nor 'error'")
        identity = _identity(api, oidc, code, login)
    except OidcError as exc:
        error = exc
    except StoreError as exc:
        error = OidcError(STORE_STATUS.get(exc.code, 422), exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - the poller must learn of it too, and the browser gets a page
        log.error("OIDC callback failed", exc_info=exc)
        error = OidcError(500, "internal", "internal error in the control plane (details are in its log)")
    else:
        handoff = oidc.logins.authenticated(login, identity)
        log.info("OIDC sign-in authenticated", extra={"upn": identity.upn})
        if login.return_to:  # a web login: back to the edge's front door, which checks its state cookie
            location = f"{login.return_to}?" + urlencode({"state": login.return_state, "login": login.login_id,
                                                           "handoff": handoff})
        else:
            location = f"http://127.0.0.1:{login.redirect_port}{LOOPBACK_PATH}?handoff={handoff}"
        return Response("", status_code=303, media_type=MediaType.HTML,
                        headers={**_PAGE_HEADERS, **clear, "Location": location})
    oidc.logins.failed(login, error)
    log.info("OIDC sign-in refused: %s", error, extra={"code": error.code})
    return _page(error.status, "sign-in failed", str(error), clear)


# ---------------------------------------------------------------------------- poll


def _collect(api: Api, login: PendingLogin) -> SignInResponse:
    """What a password sign-in does, for the user the callback proved: device certified, session, tokens."""
    identity: Identity = login.identity
    with api.store.begin() as session:
        user = users.get_user(session, identity.user_id)
        if user.disabled:
            raise StoreError("account_disabled", users.ACCOUNT_DISABLED)
        actor = f"user:{user.id}"
        device, certificate = certify_device(api, session, actor, user.id, login.device["csr_pem"],
                                             name=login.device["name"], os=login.device["os"],
                                             os_version=login.device["os_version"])
        # auth_time: when the provider saw the user prove it (kept through refreshes)
        answer = signed_in(api, session, user, identity.amr, device.id, certificate, auth_time=identity.auth_time)
    log.info("OIDC sign-in", extra={"upn": answer.user.upn, "session": answer.session_id,
                                    "device": answer.device.id if answer.device else None})
    return answer


@post("/poll", sync_to_thread=True, status_code=200,
      responses={202: ResponseSpec(data_container=OidcPending, description="the user has not signed in yet")})
def poll(api: Api, data: OidcPollRequest) -> Response[SignInResponse]:
    """202 ``pending`` until the browser brought the handoff; then, once, the sign-in answer or its refusal."""
    oidc = _oidc(api)
    login = oidc.logins.poll(data.login_id, data.poll_verifier, data.handoff)
    if login.status == "collected":
        try:
            answer = _collect(api, login)
        except CaError as exc:
            raise OidcError(422, "invalid_csr", str(exc)) from None
        return Response(answer, status_code=200, media_type="application/json")
    if login.status == "failed" and login.error is not None:
        raise login.error
    return Response(OidcPending(status="pending", expires_in=oidc.logins.remaining(login)),  # type: ignore[arg-type]
                    status_code=202, media_type="application/json")


# ---------------------------------------------------------------------------- web (edge front door)

WEB_CALLBACK_PATH = "/.ferryman/oidc/callback"


class WebOidcStart(_Request):
    return_to: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    state: _State  # the front door's (random; 24+ characters)


class WebOidcStarted(msgspec.Struct):
    login_id: str
    authorization_url: str
    expires_in: int


class WebOidcFinish(_Request):
    login_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    state: _State
    handoff: _Secret


def _edge(request: Request) -> NodeCaller:
    node: NodeCaller = request.state.node
    if node.role != "edge":
        raise OidcError(403, "forbidden", "only an edge signs browsers in for web apps")
    return node


@post("/start", sync_to_thread=True, status_code=200)
def web_start(api: Api, request: Request, data: WebOidcStart) -> WebOidcStarted:
    """A browser's sign-in at an edge's front door (module doc)."""
    _edge(request)
    oidc = _oidc(api)
    try:
        parts = urlsplit(data.return_to)
        parts.port  # noqa: B018 - a bad port raises
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname or parts.path != WEB_CALLBACK_PATH \
            or parts.query or parts.fragment or parts.username:
        raise OidcError(400, "validation", f"return_to must be https://<sign-in host>{WEB_CALLBACK_PATH}, "
                                           f"not {data.return_to!r}")
    login = oidc.start_web(data.return_to, data.state)
    return WebOidcStarted(login_id=login.login_id, authorization_url=oidc.authorization_url(login),
                          expires_in=oidc.logins.remaining(login))


@post("/finish", sync_to_thread=True, status_code=200)
def web_finish(api: Api, request: Request, data: WebOidcFinish) -> SignInResponse:
    """The front door collects the sign-in its browser finished: a session without a device."""
    _edge(request)
    oidc = _oidc(api)
    login = oidc.logins.poll(data.login_id, data.state, data.handoff)
    if login.status == "failed" and login.error is not None:
        raise login.error
    if login.status != "collected" or not login.return_to:
        raise OidcError(409, "oidc_pending", "the browser has not finished this sign-in at the OIDC provider")
    identity: Identity = login.identity
    with api.store.begin() as session:
        user = users.get_user(session, identity.user_id)
        if user.disabled:
            raise StoreError("account_disabled", users.ACCOUNT_DISABLED)
        answer = signed_in(api, session, user, identity.amr, None, None, auth_time=identity.auth_time)
    log.info("OIDC sign-in at a web front door", extra={"upn": answer.user.upn, "session": answer.session_id})
    return answer


def web_oidc_router() -> Router:
    """The edges' ``/v1/node/web-oidc`` routes (node token; edges only)."""
    return Router(path="/v1/node/web-oidc", route_handlers=[web_start, web_finish], guards=[require_node],
                  exception_handlers={OidcError: _error}, security=[{"nodeToken": []}],  # type: ignore[dict-item]
                  tags=["nodes"])


def oidc_router() -> Router:
    """The public ``/v1/auth/oidc`` routes."""
    return Router(path="/v1/auth/oidc", route_handlers=[start, begin, callback, poll],
                  exception_handlers={OidcError: _error, Throttled: throttled},  # type: ignore[dict-item]
                  security=[], tags=["auth"])
