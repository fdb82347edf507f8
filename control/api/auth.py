"""The public sign-in routes under ``/v1/auth`` (no admin key): users get access tokens here.

- ``POST /v1/auth/sign-in``: UPN + password (+ a TOTP or recovery code when the user has
  TOTP enabled), optionally registering a device (CSR → client certificate, CN = device
  id) or naming one registered before. Answers an access token (``control.tokens``), a
  refresh token and the session id.
- ``POST /v1/auth/refresh``: a refresh token for a new access token and a new refresh token
  (same session, same ``amr`` and ``auth_time``); an old refresh token coming back revokes
  the session (``control.store.sessions.refresh_session``), except the one just refreshed,
  retried within ``FERRYMAN_REFRESH_GRACE`` seconds (its answer was lost): it gets the same
  new refresh token again, and an access token of the same session.
- ``POST /v1/auth/totp/enrol``, ``POST /v1/auth/totp/confirm``, ``POST /v1/auth/sign-out``:
  with ``Authorization: Bearer <access token>`` of a live session.
- ``GET /v1/auth/keys``: the public keys (JWKS) and issuer edges verify access tokens with.

Refusals are JSON errors with their own code: ``auth_failed`` (one message for an unknown
user and a wrong password), ``account_disabled``, ``mfa_required``, ``mfa_failed``,
``device_refused`` (403), ``refresh_invalid`` / ``refresh_reused`` / ``session_revoked`` /
``session_expired`` / ``device_revoked``, all 401 unless said; ``rate_limited`` (429, with
``Retry-After``) when failed sign-ins (wrong password or second factor) reached a limit
per account and source address, per source, per account or in all (``throttle.SignInLimiter``:
the check and the count are one step, so parallel requests get no extra guesses, and an
account's usual addresses are not locked out by failures from elsewhere). Those counts,
and the TOTP codes already used, are kept in this process's memory (bounded; each
control-plane node counts its own; ``guards.TotpReplayGuard``).
"""

from __future__ import annotations

from litestar import Request, Response, Router, get, post
from litestar.datastructures import CacheControlHeader

from control.store import StoreError, sessions, totp, users

from .guards import Api, require_user
from .identity_schemas import (
    Jwk,
    KeysResponse,
    RefreshRequest,
    SignInRequest,
    SignInResponse,
    TokenResponse,
    TotpConfirmRequest,
    TotpConfirmResponse,
    TotpEnrolResponse,
)
from .schemas import ErrorBody
from .signin import access_token, certify_device, signed_in
from .throttle import Throttled

KEYS_MAX_AGE = 300  # seconds clients may cache GET /v1/auth/keys


def throttled(_request: Request, exc: Throttled) -> Response[ErrorBody]:
    """429 ``rate_limited`` with ``Retry-After``."""
    return Response(ErrorBody(error=str(exc), code="rate_limited"), status_code=429, media_type="application/json",
                    headers={"Retry-After": str(exc.retry_after)})


# ---------------------------------------------------------------------------- sign-in, refresh


def _sign_in(api: Api, data: SignInRequest, source: str | None) -> SignInResponse:
    if data.device is not None and data.device_id is not None:
        raise StoreError("invalid", "give device (to register a new device) or device_id (a device registered "
                                    "before), not both")
    attempt = api.sign_ins.begin(data.upn.strip().lower(), source)  # Throttled: 429
    ok = failed = False
    try:
        with api.store.read() as session:  # argon2 outside the write transaction
            user_id = users.check_password(session, data.upn, data.password).id
            recovery_code_id = (None if data.recovery_code is None else
                                totp.find_recovery_code(session, user_id, data.recovery_code))
        with api.store.begin() as session:
            user = users.get_user(session, user_id)
            actor = f"user:{user.id}"
            amr = ["pwd"]
            if user.totp_enabled or data.totp_code is not None or data.recovery_code is not None:
                step = totp.verify_second_factor(session, user, api.box, totp_code=data.totp_code,
                                                 recovery_code=data.recovery_code,
                                                 recovery_code_id=recovery_code_id)
                if step is not None and not api.totp_steps.claim(user.id, step):
                    raise StoreError("mfa_failed", "this TOTP code was already used: wait for the next one")
                amr = ["pwd", "mfa"]
            device_id, device_out = data.device_id, None
            if data.device is not None:
                device, device_out = certify_device(api, session, actor, user.id, data.device.csr_pem,
                                                    name=data.device.name, os=data.device.os,
                                                    os_version=data.device.os_version)
                device_id = device.id
            out = signed_in(api, session, user, amr, device_id, device_out)
        ok = True
    except StoreError as exc:
        failed = exc.code in ("auth_failed", "mfa_failed")
        raise
    finally:
        api.sign_ins.finish(attempt, ok=ok, failed=failed)
    return out


@post("/sign-in", sync_to_thread=True, status_code=200)
def sign_in(api: Api, request: Request, data: SignInRequest) -> SignInResponse:
    """Sign in with a password (and a TOTP or recovery code if the user has TOTP): access and refresh tokens."""
    return _sign_in(api, data, request.client.host if request.client else None)


def _refresh(api: Api, data: RefreshRequest) -> TokenResponse:
    reused: StoreError | None = None
    with api.store.begin() as session:
        try:
            row, refresh_token = sessions.refresh_session(session, data.refresh_token, api.box,
                                                          grace=api.refresh_grace)
        except StoreError as exc:
            if exc.code != "refresh_reused":
                raise
            reused = exc  # the session's revocation is committed with this transaction, then the error goes out
        else:
            user = users.get_user(session, row.user_id)
            groups = users.user_group_ids(session, user.id)
            access, expires_in = access_token(api, user, groups, row)
            out = TokenResponse(access_token=access, token_type="Bearer", expires_in=expires_in,
                                refresh_token=refresh_token, session_id=row.id)
    if reused is not None:
        raise reused
    return out


@post("/refresh", sync_to_thread=True, status_code=200)
def refresh(api: Api, data: RefreshRequest) -> TokenResponse:
    """A new access token and a new refresh token for a refresh token (which stops working)."""
    return _refresh(api, data)


# ---------------------------------------------------------------------------- with an access token


@post("/totp/enrol", guards=[require_user], sync_to_thread=True, status_code=200,
      security=[{"accessToken": []}])
def totp_enrol(api: Api, request: Request) -> TotpEnrolResponse:
    """Start TOTP enrolment: a new secret for an authenticator app, in force once confirmed."""
    with api.store.begin() as session:
        _row, user = sessions.active_session(session, request.state.claims.sid)
        secret = totp.start_totp_enrolment(session, user.id, api.box)
        return TotpEnrolResponse(secret=secret, otpauth_uri=totp.totp_uri(user, secret))


@post("/totp/confirm", guards=[require_user], sync_to_thread=True, status_code=200,
      security=[{"accessToken": []}])
def totp_confirm(api: Api, request: Request, data: TotpConfirmRequest) -> TotpConfirmResponse:
    """Confirm TOTP enrolment with a code from the app: TOTP is then required at sign-in."""
    recovery_codes = totp.new_recovery_codes()  # argon2, before the write transaction
    with api.store.begin() as session:
        _row, user = sessions.active_session(session, request.state.claims.sid)
        codes, step = totp.confirm_totp(session, user.id, data.code, api.box, recovery_codes=recovery_codes)
        api.totp_steps.claim(user.id, step)  # this code cannot sign in afterwards
        return TotpConfirmResponse(recovery_codes=codes)


@post("/sign-out", guards=[require_user], sync_to_thread=True, status_code=204,
      security=[{"accessToken": []}])
def sign_out(api: Api, request: Request) -> None:
    """End the access token's session: its refresh token stops working, edges refuse its access tokens."""
    with api.store.begin() as session:
        row, user = sessions.active_session(session, request.state.claims.sid)
        sessions.revoke_session(session, f"user:{user.id}", row.id, reason="signed out")


@get("/keys", sync_to_thread=False, cache_control=CacheControlHeader(max_age=KEYS_MAX_AGE, public=True))
def keys(api: Api) -> KeysResponse:
    """The public keys (JWKS) access tokens are signed with, and their issuer."""
    return KeysResponse(keys=[Jwk(**key) for key in api.token_signer.public_jwks()], issuer=api.token_signer.issuer)


def auth_router() -> Router:
    """The public ``/v1/auth`` routes (no admin key)."""
    return Router(path="/v1/auth", route_handlers=[sign_in, refresh, totp_enrol, totp_confirm, sign_out, keys],
                  exception_handlers={Throttled: throttled},  # type: ignore[dict-item]
                  security=[], tags=["auth"])

