"""Sign-in through an external OIDC provider, under ``/v1/auth/oidc`` (public; see ``control.oidc``).

- ``POST /v1/auth/oidc/start`` ``{device: {csr_pem, name, os, os_version}}``: the CSR is
  checked, a sign-in is recorded; answers ``{login_id, authorization_url, poll_interval,
  expires_in}``. The user opens ``authorization_url`` in a browser.
- ``GET /v1/auth/oidc/callback?code&state`` (the provider sends the browser here,
  ``FERRYMAN_OIDC_REDIRECT_URI``): the code is traded and the ID token verified; its UPN
  claim (``FERRYMAN_OIDC_UPN_CLAIM``, lower-cased) must name an existing, enabled user (no
  user is created). Then the same as a password sign-in: a session (``amr`` ``["pwd",
  "mfa"]`` when the token's ``amr`` has one of ``FERRYMAN_OIDC_MFA_AMR``, ``auth_time`` the
  token's), the device registered and certified (CN = device id), access and refresh
  tokens, all kept for the poll. The browser gets a small HTML page saying so, or why not.
- ``POST /v1/auth/oidc/poll`` ``{login_id}``: 202 ``{status: "pending"}`` until the callback
  came, then once the password sign-in's answer (``SignInResponse``, 200) or the callback's
  refusal (its status and code: ``unknown_user`` 403, ``account_disabled`` 401,
  ``oidc_token_invalid`` / ``oidc_code_refused`` 401, ``oidc_denied`` 403, ...); an unknown,
  expired or already collected login id is 404 ``oidc_login_unknown``.

With ``FERRYMAN_OIDC_ISSUER`` empty every route answers 404 ``oidc_not_configured``.
"""

from __future__ import annotations

import html
import logging
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
from litestar.openapi import ResponseSpec
from sqlalchemy import select

from control.ca import CaError, _verified_key
from control.oidc import POLL_INTERVAL, Oidc, OidcError, PendingLogin
from control.store import StoreError, users
from control.store.models import User

from .errors import STORE_STATUS
from .guards import Api
from .identity_schemas import DeviceIn, SignInResponse
from .schemas import ErrorBody, _Request
from .signin import certify_device, signed_in

log = logging.getLogger("ferryman.control.oidc")

NOT_CONFIGURED = "OIDC sign-in is not configured on this control plane"
MAX_PARAM = 4096  # characters of a callback query parameter
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "Referrer-Policy": "no-referrer",  # the callback URL carries the authorization code
    "X-Content-Type-Options": "nosniff",
}


class OidcStartRequest(_Request):
    device: DeviceIn


class OidcStartResponse(msgspec.Struct):
    login_id: str  # secret: whoever has it collects the tokens
    authorization_url: str
    poll_interval: int  # seconds
    expires_in: int  # seconds


class OidcPollRequest(_Request):
    login_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class OidcPending(msgspec.Struct):
    status: Literal["pending"]
    expires_in: int


def _oidc(api: Api) -> Oidc:
    if api.oidc is None:
        raise OidcError(404, "oidc_not_configured", NOT_CONFIGURED)
    return api.oidc


def _error(_request: Request, exc: OidcError) -> Response[ErrorBody]:
    headers = {"Retry-After": "60"} if exc.status == 503 else None
    return Response(ErrorBody(error=str(exc), code=exc.code), status_code=exc.status, media_type="application/json",
                    headers=headers)


@post("/start", sync_to_thread=True, status_code=200)
def start(api: Api, data: OidcStartRequest) -> OidcStartResponse:
    """Start a sign-in at the OIDC provider for this device (CSR): open ``authorization_url``, then poll."""
    oidc = _oidc(api)
    _verified_key(data.device.csr_pem.encode())  # a CSR that cannot be signed is refused now, not after the browser
    device = {"csr_pem": data.device.csr_pem, "name": data.device.name, "os": data.device.os,
              "os_version": data.device.os_version}
    login, url = oidc.start(device)
    return OidcStartResponse(login_id=login.login_id, authorization_url=url,
                             poll_interval=POLL_INTERVAL, expires_in=oidc.logins.remaining(login))


# ---------------------------------------------------------------------------- the callback


def _page(status: int, title: str, message: str) -> Response[str]:
    body = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Ferryman: {html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em}}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>\n")
    return Response(body, status_code=status, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


def _complete(api: Api, oidc: Oidc, login: PendingLogin, code: str) -> tuple[SignInResponse, str]:
    """Redeem the code and do what a password sign-in does; (answer, device name)."""
    claims = oidc.provider.redeem(code, login.verifier, login.nonce)
    upn = oidc.provider.upn_of(claims)
    amr = oidc.provider.amr_of(claims)
    now = datetime.now(UTC)
    auth_time = min(now, datetime.fromtimestamp(oidc.provider.auth_time_of(claims), UTC))
    claim = oidc.config.upn_claim
    with api.store.begin() as session:
        user = session.scalar(select(User).where(User.upn == upn))
        if user is None:
            raise OidcError(403, "unknown_user",
                            f"{upn!r} (the OIDC provider's {claim!r} claim) is not a Ferryman user: an administrator "
                            f"must create the user first (users are not created at sign-in)")
        if user.disabled:
            raise StoreError("account_disabled", users.ACCOUNT_DISABLED)
        actor = f"user:{user.id}"
        device, certificate = certify_device(api, session, actor, user.id, login.device["csr_pem"],
                                             name=login.device["name"], os=login.device["os"],
                                             os_version=login.device["os_version"])
        # auth_time: when the provider saw the user prove it (kept through refreshes)
        answer = signed_in(api, session, user, amr, device.id, certificate, now=now, auth_time=auth_time)
        return answer, device.name or device.id


def _param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if len(value) > MAX_PARAM:
        raise OidcError(400, "validation", f"invalid request: query parameter {name!r} is longer than {MAX_PARAM} "
                                           f"characters")
    return value


@get("/callback", sync_to_thread=True, media_type=MediaType.HTML)
def callback(api: Api, request: Request) -> Response[str]:
    """Where the OIDC provider sends the user's browser back (``code`` and ``state``): completes the sign-in."""
    oidc = _oidc(api)
    try:
        state = _param(request, "state")
        if not state:
            raise OidcError(400, "validation", "the OIDC provider's answer has no 'state': open the sign-in URL "
                                               "that `ferryman client login --oidc` printed")
        login = oidc.logins.claim(state)
    except OidcError as exc:
        return _page(exc.status, "sign-in failed", str(exc))
    try:
        denied = _param(request, "error")
        code = _param(request, "code")
        if denied is not None:
            description = _param(request, "error_description") or ""
            raise OidcError(403, "oidc_denied", f"the OIDC provider did not sign you in ({denied}"
                                                f"{': ' + description[:300] if description else ''})")
        if not code:
            raise OidcError(400, "validation", "the OIDC provider's answer has neither 'code' nor 'error'")
        answer, device = _complete(api, oidc, login, code)
    except OidcError as exc:
        error = exc
    except StoreError as exc:
        error = OidcError(STORE_STATUS.get(exc.code, 422), exc.code, str(exc))
    except CaError as exc:
        error = OidcError(422, "invalid_csr", str(exc))
    except Exception as exc:  # noqa: BLE001 - the poller must learn of it too, and the browser gets a page
        log.error("OIDC callback failed", exc_info=exc)
        error = OidcError(500, "internal", "internal error in the control plane (details are in its log)")
    else:
        oidc.logins.finish(login, result=answer)
        log.info("OIDC sign-in", extra={"upn": answer.user.upn, "session": answer.session_id,
                                        "device": answer.device.id if answer.device else None})
        return _page(200, "signed in", f"Signed in as {answer.user.upn} on device {device!r}: you can close "
                                       f"this window. If you did not start this sign-in, tell your administrator.")
    oidc.logins.finish(login, error=error)
    log.info("OIDC sign-in refused: %s", error, extra={"code": error.code})
    return _page(error.status, "sign-in failed", str(error))


# ---------------------------------------------------------------------------- poll


@post("/poll", sync_to_thread=True, status_code=200,
      responses={202: ResponseSpec(data_container=OidcPending, description="the user has not signed in yet")})
def poll(api: Api, data: OidcPollRequest) -> Response[SignInResponse]:
    """202 ``pending`` until the user signed in at the provider; then, once, the sign-in answer or its refusal."""
    oidc = _oidc(api)
    login = oidc.logins.poll(data.login_id)
    if login.status == "done":
        return Response(login.result, status_code=200, media_type="application/json")
    if login.status == "failed" and login.error is not None:
        raise login.error
    return Response(OidcPending(status="pending", expires_in=oidc.logins.remaining(login)),  # type: ignore[arg-type]
                    status_code=202, media_type="application/json")


def oidc_router() -> Router:
    """The public ``/v1/auth/oidc`` routes."""
    return Router(path="/v1/auth/oidc", route_handlers=[start, callback, poll],
                  exception_handlers={OidcError: _error},  # type: ignore[dict-item]
                  security=[], tags=["auth"])
