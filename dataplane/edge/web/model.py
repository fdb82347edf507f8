"""What the HTTPS front door exchanges with the rest of the edge: data types and interfaces.

The front door is self-contained: it knows nothing of tunnels, snapshots or the control
plane. The edge gives it four things, all defined here:

- ``WebApp`` records (``FrontDoor.set_apps``), one per published web application;
- an ``Authorizer``: the per-request decision (the edge backs it with ``admit()``);
- a ``BackendDialer``: a byte stream to the app's internal ``host:port`` (the edge opens a
  tunnel flow to a connector of the app's group, with a grant);
- a ``SignIn``: password + TOTP sign-in, refresh and sign-out (the edge calls the control
  plane's ``/v1/auth/*``), and optionally an ``OidcSignIn`` for the external provider.

``Principal`` is who a browser session speaks for. The front door carries it (sealed in
its cookies) and hands it back to the ``Authorizer`` and the ``BackendDialer``; the edge
maps it to its own access types. It holds only what never changes during an access token's
life (user, UPN, session, device, ``amr``, ``auth_time``, expiry); group membership, user
state and revocations come from the edge's snapshot through the ``Authorizer`` at every
request, so a stale cookie never grants what the snapshot no longer allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol, runtime_checkable

import msgspec


class WebAppError(ValueError):
    """A web app record that cannot be served; the message names the app and the field."""


class WebApp(msgspec.Struct, frozen=True, kw_only=True):
    """One published web application, as the control plane defines it.

    ``external_url``: ``https://host[:port][/prefix]``; ``internal_url``:
    ``http(s)://host:port[/prefix]``. ``header_sso`` maps claim names (``sub``, ``upn``,
    ``sid``, ``groups``, ``amr``, ``did`` or any claim the ``Authorizer`` returns) to request
    header names. ``certificate`` / ``certificate_key``: PEM chain and key of a custom
    domain (empty: the edge's default certificate). ``backend_ca``: PEM bundle that
    verifies the backend's certificate (empty: the system store).
    """

    name: str
    external_url: str
    internal_url: str
    preauth: Literal["ferryman", "passthrough"] = "ferryman"
    backend_timeout: Literal["default", "long"] = "default"
    translate_headers: bool = True
    translate_body: bool = False
    cookie_http_only: bool = True
    cookie_persistent: bool = False
    cookie_same_site: Literal["Lax", "Strict", "None"] = "Lax"
    header_sso: dict[str, str] = {}
    websocket: bool = True
    verify_backend: bool = True
    backend_ca: str = ""
    cors_preflight_bypass: bool = False
    certificate: str = ""
    certificate_key: str = ""


class Principal(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """Who a browser session speaks for: from the user's verified sign-in (access token claims).

    ``expires``: end of the access token (Unix seconds) — no app cookie outlives it.
    ``device_id`` is empty for a browser (no client agent on the device).
    """

    user_id: str
    upn: str
    session_id: str
    device_id: str = ""
    amr: tuple[str, ...] = ()
    auth_time: int = 0
    expires: int = 0


class RequestFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the ``Authorizer`` may look at besides the app and the principal."""

    method: str
    host: str
    path: str  # without the query string
    source: str  # client IP address
    user_agent: str = ""
    websocket: bool = False


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The ``Authorizer``'s answer. ``code``/``reason`` explain a denial to the user (the page
    shows ``reason``). On allow, ``groups`` and ``claims`` feed the identity assertion and
    header-based SSO (e.g. ``{"email": ..., "name": ...}``)."""

    allowed: bool
    code: str = ""
    reason: str = ""
    policy: str = ""
    groups: tuple[str, ...] = ()
    claims: Mapping[str, str] = {}


@runtime_checkable
class Authorizer(Protocol):
    """Decides every request of a signed-in session (and re-decides live WebSockets).

    Called on the event loop for every request: it must be fast and must not block (the
    edge answers from its snapshot, no call back to the control plane).
    """

    def authorize(self, app: WebApp, principal: Principal, facts: RequestFacts) -> Verdict: ...


@runtime_checkable
class ByteStream(Protocol):
    """A bidirectional byte stream to a backend (a tunnel flow, or a TCP connection in tests).

    ``read`` returns at most ``max_bytes`` and ``b""`` at end of stream; ``drain`` waits while
    the stream's send buffer is above its high-water mark; ``write_eof`` half-closes.
    ``peer`` names the connector that carries it (for logs; may be empty).
    """

    peer: str

    async def read(self, max_bytes: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


class DialError(Exception):
    """Why no backend stream could be opened: ``status`` 503 (``no_connector``), 502
    (``unreachable``, ``refused``) or 504 (``timeout``); ``message`` is safe to show a user."""

    def __init__(self, code: str, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@runtime_checkable
class BackendDialer(Protocol):
    """Opens a byte stream to ``app``'s internal host:port for ``principal`` (``None`` for a
    passthrough app or a CORS preflight); raises ``DialError``."""

    async def open(self, app: WebApp, principal: Principal | None) -> ByteStream: ...


class SignInResult(msgspec.Struct, frozen=True, kw_only=True):
    """A sign-in or refresh: the principal, the refresh token (each works once) and when the
    sign-in session itself ends (Unix seconds; the refresh token stops working then)."""

    principal: Principal
    refresh_token: str
    session_expires: int


class SignInError(Exception):
    """A refused sign-in, refresh or sign-out: ``code`` (``auth_failed``, ``mfa_required``,
    ``mfa_failed``, ``account_disabled``, ``rate_limited``, ``session_revoked``, ...),
    ``message`` for the user, ``status`` (401, 403, 429, 503) and ``retry_after`` seconds."""

    def __init__(self, code: str, message: str, status: int = 401, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after


@runtime_checkable
class SignIn(Protocol):
    """Password + TOTP sign-in and session upkeep (the edge calls the control plane)."""

    async def sign_in(self, upn: str, password: str, otp: str, source: str) -> SignInResult: ...

    async def refresh(self, refresh_token: str, source: str) -> SignInResult: ...

    async def sign_out(self, principal: Principal, refresh_token: str) -> None: ...


@runtime_checkable
class OidcSignIn(Protocol):
    """The external OIDC provider's leg (through the control plane, which does PKCE, nonce and
    token checks). ``begin`` answers the provider's authorization URL for a sign-in that must
    come back to ``callback_url`` with ``state``; ``finish`` turns the callback's query
    parameters into a sign-in. The front door binds ``state`` to the browser with a cookie."""

    label: str  # the button's text, e.g. "Sign in with Contoso"

    async def begin(self, callback_url: str, state: str) -> str: ...

    async def finish(self, params: Mapping[str, str], callback_url: str, source: str) -> SignInResult: ...


class TransactionRecord(msgspec.Struct, kw_only=True):
    """One HTTP transaction (or one WebSocket, at its end), for the edge's traffic log.

    ``bytes_in``: request body bytes from the client (WebSocket: client → backend);
    ``bytes_out``: response body bytes to the client. ``path`` never has the query string.
    ``action`` ``deny`` covers refusals before the backend (sign-in needed, limits, policy).
    """

    time: float
    app: str
    host: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    user_agent: str
    duration: float
    action: Literal["allow", "deny"]
    code: str = ""
    reason: str = ""
    policy: str = ""
    user_id: str = ""
    upn: str = ""
    session_id: str = ""
    device_id: str = ""
    source: str = ""  # the client's "ip:port" (IPv6 without brackets; port 0 when unknown)
    protocol: str = ""
    websocket: bool = False
    connector: str = ""
    relay_edge: str = ""  # the sibling worker or peer edge that carried the backend flow to its connector
