"""Who is using the console, and whether a request may change anything.

- **Session**: the cookie ``ferryman_console`` holds a random token (``control.store.console``
  keeps only its SHA-256); ``HttpOnly``, ``SameSite=Strict``, ``Path=/console``, and ``Secure``
  when the request came over TLS. Every request looks the session up and checks its idle time
  (``FERRYMAN_CONSOLE_IDLE_MINUTES``), absolute lifetime (``FERRYMAN_CONSOLE_SESSION_HOURS``),
  that it was not ended, and that the user is enabled and still has a console role.
- **Changes** (every POST): ``require_change`` checks, in this order, that the request's
  ``Origin`` (or, without one, its ``Referer``) is this console's own origin, that a live
  session signed it, that the form's ``csrf`` field (or the ``X-CSRF-Token`` header htmx
  sends) equals the session's CSRF token (constant-time compare), and that the user's role is
  ``admin``. Each refusal is a 403 page saying which check failed; a missing or ended session
  sends the browser to the sign-in page.
- **Headers**: every console answer carries a Content-Security-Policy allowing scripts, styles
  and images from the console itself only (no inline script), ``X-Frame-Options: DENY``,
  ``Referrer-Policy: same-origin``, ``Cache-Control: no-store``.

The console trusts the store (users, roles) and the request's ``Host`` as the origin its own
pages are served from; it does not trust ``X-Forwarded-*`` headers.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from litestar import Request

from control.store import StoreError
from control.store import console as console_store
from control.store.models import utcnow

COOKIE = "ferryman_console"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
DEFAULT_IDLE_MINUTES = 30
DEFAULT_SESSION_HOURS = 12

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class ConsoleConfig:
    """The console's session limits (``FERRYMAN_CONSOLE_IDLE_MINUTES``, ``FERRYMAN_CONSOLE_SESSION_HOURS``)."""

    idle: timedelta = timedelta(minutes=DEFAULT_IDLE_MINUTES)
    lifetime: timedelta = timedelta(hours=DEFAULT_SESSION_HOURS)


@dataclass(frozen=True)
class Viewer:
    """The signed-in person of a console request."""

    user_id: str
    upn: str
    display_name: str
    role: str
    session_id: str
    csrf: str

    @property
    def actor(self) -> str:
        """Who the audit records of this person's changes name."""
        return f"console:{self.upn}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class NotSignedIn(Exception):
    """No live console session: the browser goes to the sign-in page (with ``reason`` shown)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class Refused(Exception):
    """A request the console refuses (403 unless ``status`` says otherwise), with the reason shown."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def is_tls(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"


def own_origin(request: Request[Any, Any, Any]) -> str:
    """``scheme://host[:port]`` the console was asked on (the request's ``Host``)."""
    host = request.headers.get("host", "")
    return f"{request.url.scheme}://{host}".lower()


def check_origin(request: Request[Any, Any, Any]) -> None:
    """Refuse a state-changing request whose ``Origin`` (else ``Referer``) is not the console's own."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if referer is None:
            raise Refused("refused: the request names no Origin or Referer (cross-site request protection)")
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin.lower() != own_origin(request):
        raise Refused(f"refused: the request comes from {origin}, not from this console "
                      f"(cross-site request protection)")


def viewer_of(request: Request[Any, Any, Any]) -> Viewer:
    """The signed-in person, or ``NotSignedIn``; records use of the session (at most once a minute)."""
    token = request.cookies.get(COOKIE, "")
    if not token:
        raise NotSignedIn()
    api = request.app.state.api
    config: ConsoleConfig = request.app.state.console
    now = utcnow()
    try:
        with api.store.read() as session:
            row, user = console_store.live_console_session(session, token, idle=config.idle, now=now)
            viewer = Viewer(user_id=user.id, upn=user.upn, display_name=user.display_name,
                            role=user.console_role or "", session_id=row.id, csrf=row.csrf_token)
            touch = console_store.needs_touch(row, now)
    except StoreError as exc:
        raise NotSignedIn("" if exc.code == "auth_failed" else str(exc)) from None
    if touch:
        with api.store.begin() as session:
            console_store.touch_console_session(session, viewer.session_id, now)
    return viewer


def require_form(request: Request[Any, Any, Any], form: dict[str, Any]) -> Viewer:
    """Whoever is signed in, sending a form of the console: Origin, session and CSRF token checked
    (the token compared in constant time)."""
    check_origin(request)
    viewer = viewer_of(request)
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), viewer.csrf.encode()):
        raise Refused("refused: the form's CSRF token is missing or wrong; reload the page and try again")
    return viewer


def require_change(request: Request[Any, Any, Any], form: dict[str, Any]) -> Viewer:
    """The admin making a change: Origin, session, CSRF token and role checked (see the module doc)."""
    viewer = require_form(request, form)
    if not viewer.is_admin:
        raise Refused(f"refused: {viewer.upn} has the console role {viewer.role!r}, which may not change anything")
    return viewer
