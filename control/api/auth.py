"""The public sign-in routes under ``/v1/auth`` (no admin key): users get access tokens here.

- ``POST /v1/auth/sign-in``: UPN + password (+ a TOTP or recovery code when the user has
  TOTP enabled), optionally registering a device (CSR → client certificate, CN = device
  id) or naming one registered before. Answers an access token (``control.tokens``), a
  refresh token and the session id.
- ``POST /v1/auth/refresh``: a refresh token for a new access token and a new refresh token
  (same session, same ``amr`` and ``auth_time``); an old refresh token coming back revokes
  the session (``sessions.refresh_session``).
- ``POST /v1/auth/totp/enrol``, ``POST /v1/auth/totp/confirm``, ``POST /v1/auth/sign-out``:
  with ``Authorization: Bearer <access token>`` of a live session.
- ``GET /v1/auth/keys``: the public keys (JWKS) and issuer edges verify access tokens with.

Refusals are JSON errors with their own code: ``auth_failed`` (one message for an unknown
user and a wrong password), ``account_disabled``, ``mfa_required``, ``mfa_failed``,
``device_refused`` (403), ``refresh_invalid`` / ``refresh_reused`` / ``session_revoked`` /
``session_expired`` / ``device_revoked``, all 401 unless said; ``rate_limited`` (429, with
``Retry-After``) once a user name had ``MAX_FAILED_SIGN_INS`` failed sign-ins (wrong
password or second factor) within ``FAILED_SIGN_IN_WINDOW`` seconds. That count, and the
TOTP codes already used, are kept in this process's memory (bounded; each control-plane
node counts its own).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from datetime import datetime

from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler

from control.store import StoreError, devices, sessions, totp, users
from control.store.models import User
from control.tokens import TokenError

from .deps import Api
from .identity_schemas import (
    DeviceCertificate,
    Jwk,
    KeysResponse,
    RefreshRequest,
    SignedInUser,
    SignInRequest,
    SignInResponse,
    TokenResponse,
    TotpConfirmRequest,
    TotpConfirmResponse,
    TotpEnrolResponse,
)
from .schemas import ErrorBody

MAX_FAILED_SIGN_INS = 10  # per user name ...
FAILED_SIGN_IN_WINDOW = 300.0  # ... within this many seconds; then 429 until the oldest failure ages out
MAX_TRACKED_NAMES = 100_000  # user names whose failures are remembered (least recently failed dropped first)
MAX_TRACKED_TOTP_USERS = 100_000
KEYS_MAX_AGE = 300  # seconds clients may cache GET /v1/auth/keys
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ferryman-user"'}


class SignInLimiter:
    """Failed sign-ins per user name in a sliding window; thread-safe (handlers run in a thread pool)."""

    def __init__(self, max_failures: int = MAX_FAILED_SIGN_INS, window: float = FAILED_SIGN_IN_WINDOW,
                 max_names: int = MAX_TRACKED_NAMES) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_names = max_names
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, name: str, now: float | None = None) -> float:
        """Seconds until ``name`` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.get(name)
            if times is None:
                return 0.0
            while times and times[0] <= now - self.window:
                times.popleft()
            if not times:
                del self._failures[name]
                return 0.0
            return max(0.0, times[0] + self.window - now) if len(times) >= self.max_failures else 0.0

    def failed(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.setdefault(name, deque(maxlen=self.max_failures))
            times.append(now)
            self._failures.move_to_end(name)
            while len(self._failures) > self.max_names:
                self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


class TotpReplayGuard:
    """The newest TOTP time step accepted per user: a code is good once (RFC 6238 §5.2)."""

    def __init__(self, max_users: int = MAX_TRACKED_TOTP_USERS) -> None:
        self.max_users = max_users
        self._last: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, user_id: str, step: int) -> bool:
        """Record ``step`` as used by ``user_id``; False if it (or a later one) was used already."""
        with self._lock:
            last = self._last.get(user_id)
            if last is not None and step <= last:
                return False
            self._last[user_id] = step
            self._last.move_to_end(user_id)
            while len(self._last) > self.max_users:  # the oldest entries' codes have long expired
                self._last.popitem(last=False)
            return True


class SignInThrottled(Exception):
    def __init__(self, name: str, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many failed sign-ins for {name!r} ({MAX_FAILED_SIGN_INS} within "
                         f"{FAILED_SIGN_IN_WINDOW:.0f} s): try again in {self.retry_after} s")


def _throttled(_request: Request, exc: SignInThrottled) -> Response[ErrorBody]:
    return Response(ErrorBody(error=str(exc), code="rate_limited"), status_code=429, media_type="application/json",
                    headers={"Retry-After": str(exc.retry_after)})


async def require_user(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """Guard: a valid access token (signature, issuer, expiry); the handler checks its session is live."""
    header = connection.headers.get("authorization")
    if not header:
        raise NotAuthorizedException("missing 'Authorization: Bearer <access token>' header", headers=_CHALLENGE)
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthorizedException("the Authorization header must be 'Bearer <access token>'", headers=_CHALLENGE)
    api: Api = connection.app.state.api
    try:
        connection.state.claims = api.token_signer.verify(token)
    except TokenError as exc:
        raise NotAuthorizedException(f"access token refused: {exc}", headers=_CHALLENGE) from None


# ---------------------------------------------------------------------------- sign-in, refresh


def _tokens(api: Api, user: User, groups: list[str], row_id: str, amr: list[str], auth_time: datetime,
            device_id: str | None, expires_at: datetime) -> tuple[str, int]:
    return api.token_signer.issue(user_id=user.id, upn=user.upn, groups=groups, amr=amr, auth_time=auth_time,
                                  session_id=row_id, device_id=device_id, not_after=expires_at)


def _sign_in(api: Api, data: SignInRequest) -> SignInResponse:
    name = data.upn.strip().lower()
    wait = api.sign_ins.retry_after(name)
    if wait > 0:
        raise SignInThrottled(name, wait)
    if data.device is not None and data.device_id is not None:
        raise StoreError("invalid", "give device (to register a new device) or device_id (a device registered "
                                    "before), not both")
    try:
        with api.store.read() as session:  # argon2 outside the write transaction
            user_id = users.check_password(session, data.upn, data.password).id
        with api.store.begin() as session:
            user = users.get_user(session, user_id)
            actor = f"user:{user.id}"
            amr = ["pwd"]
            if user.totp_enabled or data.totp_code is not None or data.recovery_code is not None:
                step = totp.verify_second_factor(session, user, totp_code=data.totp_code,
                                                 recovery_code=data.recovery_code)
                if step is not None and not api.totp_steps.claim(user.id, step):
                    raise StoreError("mfa_failed", "this TOTP code was already used: wait for the next one")
                amr = ["pwd", "mfa"]
            device_id, device_out = data.device_id, None
            if data.device is not None:
                device = devices.register_device(session, actor, user.id, name=data.device.name, os=data.device.os,
                                                 os_version=data.device.os_version)
                issued = api.ca.sign_csr(data.device.csr_pem.encode(), role="client", name=device.id,
                                         lifetime_days=api.cert_lifetime_days)
                devices.record_device_certificate(session, actor, device.id, issued.serial, issued.not_after)
                device_id = device.id
                device_out = DeviceCertificate(id=device.id, certificate_pem=issued.cert_pem.decode(),
                                               ca_pem=api.ca.bundle().decode(), serial=format(issued.serial, "x"),
                                               not_after=issued.not_after)
            row, refresh_token = sessions.create_session(session, user.id, device_id=device_id, amr=amr)
            groups = users.user_group_ids(session, user.id)
            access, expires_in = _tokens(api, user, groups, row.id, amr, row.auth_time, device_id, row.expires_at)
            out = SignInResponse(access_token=access, token_type="Bearer", expires_in=expires_in,
                                 refresh_token=refresh_token, session_id=row.id,
                                 user=SignedInUser(id=user.id, upn=user.upn, display_name=user.display_name,
                                                   groups=groups),
                                 device=device_out)
    except StoreError as exc:
        if exc.code in ("auth_failed", "mfa_failed"):
            api.sign_ins.failed(name)
        raise
    api.sign_ins.succeeded(name)
    return out


@post("/sign-in", sync_to_thread=True, status_code=200)
def sign_in(api: Api, data: SignInRequest) -> SignInResponse:
    """Sign in with a password (and a TOTP or recovery code if the user has TOTP): access and refresh tokens."""
    return _sign_in(api, data)


def _refresh(api: Api, data: RefreshRequest) -> TokenResponse:
    reused: StoreError | None = None
    with api.store.begin() as session:
        try:
            row, refresh_token = sessions.refresh_session(session, data.refresh_token)
        except StoreError as exc:
            if exc.code != "refresh_reused":
                raise
            reused = exc  # the session's revocation is committed with this transaction, then the error goes out
        else:
            user = users.get_user(session, row.user_id)
            groups = users.user_group_ids(session, user.id)
            access, expires_in = _tokens(api, user, groups, row.id, row.amr.split(","), row.auth_time, row.device_id,
                                         row.expires_at)
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
        secret = totp.start_totp_enrolment(session, user.id)
        return TotpEnrolResponse(secret=secret, otpauth_uri=totp.totp_uri(user, secret))


@post("/totp/confirm", guards=[require_user], sync_to_thread=True, status_code=200,
      security=[{"accessToken": []}])
def totp_confirm(api: Api, request: Request, data: TotpConfirmRequest) -> TotpConfirmResponse:
    """Confirm TOTP enrolment with a code from the app: TOTP is then required at sign-in."""
    with api.store.begin() as session:
        _row, user = sessions.active_session(session, request.state.claims.sid)
        codes, step = totp.confirm_totp(session, user.id, data.code)
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
                  exception_handlers={SignInThrottled: _throttled},  # type: ignore[dict-item]
                  security=[], tags=["auth"])

