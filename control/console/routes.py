"""The console's routes under ``/console``: pages (GET, any console role) and changes (POST,
``security.require_change``: Origin, session, CSRF token, role ``admin``).

Every change calls the same store function as the admin API (validated, audited under
``console:<upn>``, configuration version bumped); a refused change shows the page again with
the store's message next to the form and the status the API would give (404, 409, 422).
After a change the browser is sent (303) to the page that shows the result.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio.to_thread
import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import MediaType, Request, Response, Router, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect, Stream
from litestar.static_files import create_static_files_router

from control.api.throttle import Throttled
from control.api.traffic import record_out
from control.store import (
    StoreError,
    applications,
    assignments,
    connector_groups,
    devices,
    dns_suffixes,
    forwarding_profile,
    nodes,
    registration_tokens,
    sessions,
    totp,
    traffic,
    user_groups,
    users,
)
from control.store import console as console_store
from control.store.models import Application, utcnow

from . import views
from .charts import human
from .security import (
    COOKIE,
    COOKIE_PATH,
    CSRF_FIELD,
    SECURITY_HEADERS,
    NotSignedIn,
    Refused,
    Viewer,
    check_origin,
    is_tls,
    require_change,
    require_form,
    viewer_of,
)
from .testaccess import try_access

log = logging.getLogger("ferryman.control.console")

HERE = Path(__file__).parent
STATUS = {"not_found": 404, "conflict": 409, "invalid": 422}
Form = Annotated[dict[str, Any], Body(media_type=RequestEncodingType.URL_ENCODED)]
EXPORT_PAGE = 1000  # traffic records per database read of an export
SIGN_IN_REASONS = {"ended": "Your console session ended (signed out elsewhere, idle, expired, or your role changed): "
                            "sign in again."}

_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["human"] = human
_env.filters["bytes"] = lambda v: human(v or 0, "B")
_env.filters["when"] = lambda v: "" if v is None else v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> Response[str]:
    return Response(text, status_code=status, media_type=MediaType.HTML, headers={**SECURITY_HEADERS, **(headers or {})})


def render(request: Request[Any, Any, Any], template: str, viewer: Viewer | None, status: int = 200,
           **context: Any) -> Response[str]:
    text = _env.get_template(template).render(viewer=viewer, path=request.url.path, csrf_field=CSRF_FIELD,
                                              csrf=viewer.csrf if viewer else "", **context)
    return _html(text, status)


def _api(request: Request[Any, Any, Any]) -> Any:
    return request.app.state.api


def _page(request: Request[Any, Any, Any], template: str, viewer: Viewer, build: Callable[[Any], dict[str, Any]],
          **extra: Any) -> Response[str]:
    """``template`` for ``viewer``, filled with ``extra`` and what ``build(session)`` reads from the store."""
    with _api(request).store.read() as session:
        context = build(session)
    return render(request, template, viewer, **extra, **context)


def _one(form: dict[str, Any], key: str, default: str = "") -> str:
    value = form.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    return str(value).strip()


def _lines(text: str) -> list[str]:
    return [item.strip() for line in text.splitlines() for item in line.split(",") if item.strip()]


def _back(url: str) -> Redirect:
    return Redirect(url, status_code=303)


def _changed(request: Request[Any, Any, Any], form: dict[str, Any], work: Callable[[Viewer, Any], str],
             again: Callable[[Viewer, Any, StoreError], Response[str]]) -> Response[Any]:
    """A change: checks (``require_change``), ``work(viewer, session)`` in one write transaction
    returning where to go next; a refusal by the store re-renders with ``again``."""
    viewer = require_change(request, form)
    try:
        with _api(request).store.begin() as session:
            target = work(viewer, session)
    except StoreError as exc:
        return again(viewer, form, exc)
    return _back(target)


# ---------------------------------------------------------------------------- errors


def not_signed_in(request: Request[Any, Any, Any], exc: NotSignedIn) -> Response[Any]:
    target = "/console/sign-in" + ("?why=ended" if exc.reason else "")
    headers = {"HX-Redirect": target} if request.headers.get("hx-request") else {}
    response: Response[Any] = Redirect(target, status_code=303, headers={**SECURITY_HEADERS, **headers})
    if exc.reason:
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


def refused(request: Request[Any, Any, Any], exc: Refused) -> Response[str]:
    log.info("console refused %s %s: %s", request.method, request.url.path, exc.reason)
    return render(request, "refused.html", None, status=exc.status, reason=exc.reason)


def store_error(request: Request[Any, Any, Any], exc: StoreError) -> Response[str]:
    return render(request, "refused.html", None, status=STATUS.get(exc.code, 400), reason=str(exc))


# ---------------------------------------------------------------------------- sign-in


@get("/sign-in", sync_to_thread=False)
def sign_in_page(request: Request[Any, Any, Any], why: str = "") -> Response[str]:
    # A fixed text per reason: the page never shows text taken from the URL.
    return render(request, "sign_in.html", None, why=SIGN_IN_REASONS.get(why, ""))


@post("/sign-in", sync_to_thread=True)
def sign_in(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    """Password + TOTP (or a recovery code), and a console role: a new session cookie.

    A user with a console role and no TOTP yet enrols here: the password alone shows a new
    TOTP secret; the password again with a code from it turns TOTP on, shows the recovery
    codes once and signs in."""
    check_origin(request)
    api = _api(request)
    upn, password, code = _one(data, "upn"), str(data.get("password") or ""), _one(data, "code")
    source = request.client.host if request.client else None
    attempt = api.sign_ins.begin(upn.lower(), source)  # Throttled: 429
    ok = failed = False
    shown_codes: list[str] = []
    try:
        with api.store.read() as session:  # argon2 outside the write transaction
            found = users.check_password(session, upn, password)
            user_id, enrolling = found.id, not found.totp_enabled
            recovery_id = None if "-" not in code else totp.find_recovery_code(session, user_id, code)
        new_codes = totp.new_recovery_codes() if enrolling and code else None
        with api.store.begin() as session:
            user = users.get_user(session, user_id)
            if user.console_role is None:
                raise StoreError("auth_failed", f"{user.upn} may not use the web console (no console role)")
            if enrolling and not code:
                secret = totp.start_totp_enrolment(session, user.id, api.box)
                ok = True
                return render(request, "enrol.html", None, upn=user.upn, secret=secret,
                              uri=totp.totp_uri(user, secret))
            if enrolling:
                shown_codes, step = totp.confirm_totp(session, user.id, code, api.box, recovery_codes=new_codes)
            else:
                step = totp.verify_second_factor(session, user, api.box,
                                                 totp_code=None if recovery_id else code or None,
                                                 recovery_code=code if recovery_id else None,
                                                 recovery_code_id=recovery_id)
            if step is not None and not api.totp_steps.claim(user.id, step):
                raise StoreError("mfa_failed", "this TOTP code was already used: wait for the next one")
            token, _row = console_store.create_console_session(session, user, source=source or "",
                                                               lifetime=request.app.state.console.lifetime)
            upn, role = user.upn, user.console_role
        ok = True
    except StoreError as exc:
        failed = exc.code in ("auth_failed", "mfa_failed")
        status = {"account_disabled": 403, "conflict": 409}.get(exc.code, 401)
        return render(request, "sign_in.html", None, status=status, error=str(exc), upn=upn)
    except Throttled as exc:
        return render(request, "sign_in.html", None, status=429, error=str(exc), upn=upn)
    finally:
        api.sign_ins.finish(attempt, ok=ok, failed=failed)
    log.info("console: %s signed in (%s) from %s", upn, role, source)
    response: Response[Any]
    if shown_codes:
        response = render(request, "enrolled.html", None, recovery_codes=shown_codes)
    else:
        response = Redirect("/console", status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="strict", secure=is_tls(request),
                        max_age=int(request.app.state.console.lifetime.total_seconds()))
    return response


@post("/sign-out", sync_to_thread=True)
def sign_out(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    viewer = require_form(request, data)
    with _api(request).store.begin() as session:
        console_store.end_console_session(session, viewer.session_id, viewer.upn)
    # The browser forgets what it kept of the console's pages (a registration token, recovery codes).
    response: Response[Any] = Redirect("/console/sign-in", status_code=303,
                                       headers={**SECURITY_HEADERS, "Clear-Site-Data": '"cache", "storage"'})
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


# ---------------------------------------------------------------------------- overview


@get(["/", ""], sync_to_thread=True)
def overview(request: Request[Any, Any, Any]) -> Response[str]:
    viewer = viewer_of(request)
    api = _api(request)
    with api.store.read() as session:
        context = views.overview(session, api.heartbeat_interval, utcnow())
    # Only the page's own refresh (its #overview target) gets the partial: a boosted link to the
    # overview (HX-Request too, targeting the body) needs the whole page.
    refresh = request.headers.get("hx-request") == "true" and request.headers.get("hx-target") == "overview"
    template = "overview_body.html" if refresh else "overview.html"
    return render(request, template, viewer, **context)


# ---------------------------------------------------------------------------- applications


def _apps_again(request: Request[Any, Any, Any]) -> Callable[[Viewer, Any, StoreError], Response[str]]:
    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "applications.html", viewer, views.applications_page,
                     status=STATUS.get(exc.code, 400), error=str(exc), form=form)
    return again


@get("/applications", sync_to_thread=True)
def applications_list(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "applications.html", viewer_of(request), views.applications_page, form={})


def _segments(text: str, default_protocol: str = "tcp") -> list[dict[str, Any]]:
    """``destination ports [protocol]`` per line (``10.0.0.0/24 22,3389``, ``*.corp.example 443 tcp``)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            raise StoreError("invalid", f"segment line {number} ({line.strip()!r}): write DESTINATION PORTS "
                                        f"[tcp|udp], e.g. 10.0.0.0/24 22,3389 tcp")
        out.append({"destination": parts[0], "ports": parts[1],
                    "protocol": parts[2].lower() if len(parts) == 3 else default_protocol})
    return out


@post("/applications", sync_to_thread=True)
def applications_create(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        app = applications.create_application(session, viewer.actor, _one(data, "name"),
                                              kind=_one(data, "kind", "per_app"),
                                              connector_group=_one(data, "connector_group") or None,
                                              segments=_segments(_one(data, "segments")))
        return _app_url(app)
    return _changed(request, data, work, _apps_again(request))


def _name_in(session: Any, app_id: int) -> str:
    """Applications are named by id in console URLs (a name may hold any character, even ``/``)."""
    app = session.get(Application, app_id)
    if app is None:
        raise StoreError("not_found", f"application {app_id} not found")
    return str(app.name)


def _app_url(app: Application) -> str:
    return f"/console/applications/{app.id}"


def _app_again(request: Request[Any, Any, Any], app_id: int) -> Callable[[Viewer, Any, StoreError], Response[str]]:
    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "application.html", viewer,
                     lambda session: views.application_page(session, _name_in(session, app_id)),
                     status=STATUS.get(exc.code, 400), error=str(exc), form=form)
    return again


@get("/applications/{app_id:int}", sync_to_thread=True)
def application_detail(request: Request[Any, Any, Any], app_id: int) -> Response[str]:
    return _page(request, "application.html", viewer_of(request),
                 lambda session: views.application_page(session, _name_in(session, app_id)),
                 form={})


@post("/applications/{app_id:int}/edit", sync_to_thread=True)
def application_edit(request: Request[Any, Any, Any], app_id: int, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        name = _name_in(session, app_id)
        app = applications.update_application(session, viewer.actor, name, new_name=_one(data, "name") or None,
                                              connector_group=_one(data, "connector_group") or None)
        return _app_url(app)
    return _changed(request, data, work, _app_again(request, app_id))


@post("/applications/{app_id:int}/delete", sync_to_thread=True)
def application_delete(request: Request[Any, Any, Any], app_id: int, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        name = _name_in(session, app_id)
        applications.delete_application(session, viewer.actor, name)
        return "/console/applications"
    return _changed(request, data, work, _app_again(request, app_id))


@post("/applications/{app_id:int}/segments", sync_to_thread=True)
def segment_add(request: Request[Any, Any, Any], app_id: int, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        name = _name_in(session, app_id)
        applications.add_segment(session, viewer.actor, name, {
            "destination": _one(data, "destination"), "ports": _one(data, "ports"),
            "protocol": _one(data, "protocol", "tcp")})
        return _app_url(applications.get_application(session, name))
    return _changed(request, data, work, _app_again(request, app_id))


@post("/applications/{app_id:int}/segments/{segment_id:int}/remove", sync_to_thread=True)
def segment_remove(request: Request[Any, Any, Any], app_id: int, segment_id: int, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        name = _name_in(session, app_id)
        applications.remove_segment(session, viewer.actor, name, segment_id)
        return _app_url(applications.get_application(session, name))
    return _changed(request, data, work, _app_again(request, app_id))


@post("/applications/{app_id:int}/assignments", sync_to_thread=True)
def assignment_add(request: Request[Any, Any, Any], app_id: int, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        name = _name_in(session, app_id)
        user, group = _one(data, "user") or None, _one(data, "group") or None
        if (user is None) == (group is None):
            raise StoreError("invalid", "choose a user or a group (one of the two)")
        assignments.assign_application(session, viewer.actor, name, user=user, group=group)
        return _app_url(applications.get_application(session, name))
    return _changed(request, data, work, _app_again(request, app_id))


@post("/applications/{app_id:int}/assignments/remove", sync_to_thread=True)
def assignment_remove(request: Request[Any, Any, Any], app_id: int, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        name = _name_in(session, app_id)
        assignments.unassign_application(session, viewer.actor, name, user=_one(data, "user") or None,
                                         group=_one(data, "group") or None)
        return _app_url(applications.get_application(session, name))
    return _changed(request, data, work, _app_again(request, app_id))


# ---------------------------------------------------------------------------- connectors, groups, edges


def _nodes_again(request: Request[Any, Any, Any], template: str) -> Callable[[Viewer, Any, StoreError],
                                                                            Response[str]]:
    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        api = _api(request)
        with api.store.read() as session:
            page = views.connectors_page if template == "connectors.html" else views.edges_page
            context = page(session, api.heartbeat_interval, utcnow())
        return render(request, template, viewer, status=STATUS.get(exc.code, 400), error=str(exc), form=form,
                      **context)
    return again


@get("/connectors", sync_to_thread=True)
def connectors_list(request: Request[Any, Any, Any]) -> Response[str]:
    viewer = viewer_of(request)
    api = _api(request)
    with api.store.read() as session:
        context = views.connectors_page(session, api.heartbeat_interval, utcnow())
    return render(request, "connectors.html", viewer, form={}, **context)


@post("/connector-groups", sync_to_thread=True)
def group_create(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        connector_groups.create_group(session, viewer.actor, _one(data, "name"), _one(data, "region"),
                                      allowed=_lines(_one(data, "allowed")), denied=_lines(_one(data, "denied")))
        return "/console/connectors"
    return _changed(request, data, work, _nodes_again(request, "connectors.html"))


@post("/connector-groups/update", sync_to_thread=True)
def group_update(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        connector_groups.update_group(session, viewer.actor, _one(data, "name"), region=_one(data, "region"),
                                      allowed=_lines(_one(data, "allowed")), denied=_lines(_one(data, "denied")))
        return "/console/connectors"
    return _changed(request, data, work, _nodes_again(request, "connectors.html"))


def _register_command(request: Request[Any, Any, Any], role: str, token: str) -> str:
    control = f"{request.url.scheme}://{request.headers.get('host', '')}"
    extra = " --address EDGE_HOST:PORT" if role == "edge" else ""
    return f"ferryman {role} register --control {control} --token {token}{extra}"


@post("/registration-tokens", sync_to_thread=True)
def token_create(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    """A one-time registration token, shown once with the command line that uses it (no redirect)."""
    role = _one(data, "role")
    template = "edges.html" if role == "edge" else "connectors.html"
    viewer = require_change(request, data)
    api = _api(request)
    try:
        hours = float(_one(data, "hours", "1") or "1")
    except ValueError:
        hours = -1.0
    try:
        if not 0 < hours <= 24 * 7:
            raise StoreError("invalid", "token lifetime must be a number of hours, more than 0 and at most 168")
        with api.store.begin() as session:
            _row, plaintext = registration_tokens.create_registration_token(
                session, viewer.actor, role, group=_one(data, "group") or None if role == "connector" else None,
                ttl=timedelta(hours=hours))
    except StoreError as exc:
        return _nodes_again(request, template)(viewer, data, exc)
    with api.store.read() as session:
        page = views.connectors_page if template == "connectors.html" else views.edges_page
        context = page(session, api.heartbeat_interval, utcnow())
    return render(request, template, viewer, form={}, command=_register_command(request, role, plaintext), **context)


def _node_revoke(request: Request[Any, Any, Any], role: str, node_id: str, data: dict[str, Any]) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        nodes.revoke_node(session, viewer.actor, role, node_id, _one(data, "reason") or "revoked in the console")
        return f"/console/{role}s"
    return _changed(request, data, work, _nodes_again(request, f"{role}s.html"))


@post("/connectors/{node_id:str}/group", sync_to_thread=True)
def connector_move(request: Request[Any, Any, Any], node_id: str, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        nodes.move_connector(session, viewer.actor, node_id, _one(data, "group"))
        return "/console/connectors"
    return _changed(request, data, work, _nodes_again(request, "connectors.html"))


@post("/connectors/{node_id:str}/revoke", sync_to_thread=True)
def connector_revoke(request: Request[Any, Any, Any], node_id: str, data: Form) -> Response[Any]:
    return _node_revoke(request, "connector", node_id, data)


@post("/edges/{node_id:str}/revoke", sync_to_thread=True)
def edge_revoke(request: Request[Any, Any, Any], node_id: str, data: Form) -> Response[Any]:
    return _node_revoke(request, "edge", node_id, data)


@get("/edges", sync_to_thread=True)
def edges_list(request: Request[Any, Any, Any]) -> Response[str]:
    viewer = viewer_of(request)
    api = _api(request)
    with api.store.read() as session:
        context = views.edges_page(session, api.heartbeat_interval, utcnow())
    return render(request, "edges.html", viewer, form={}, **context)


# ---------------------------------------------------------------------------- users, groups, devices


def _users_again(request: Request[Any, Any, Any]) -> Callable[[Viewer, Any, StoreError], Response[str]]:
    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "users.html", viewer, views.users_page,
                     status=STATUS.get(exc.code, 400), error=str(exc), form=form)
    return again


def _user_again(request: Request[Any, Any, Any], ref: str) -> Callable[[Viewer, Any, StoreError], Response[str]]:
    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "user.html", viewer, lambda session: views.user_page(session, ref, utcnow()),
                     status=STATUS.get(exc.code, 400), error=str(exc))
    return again


@get("/users", sync_to_thread=True)
def users_list(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "users.html", viewer_of(request), views.users_page, form={})


@post("/users", sync_to_thread=True)
def user_create(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        password = str(data.get("password") or "") or None
        user = users.create_user(session, viewer.actor, _one(data, "upn"), display_name=_one(data, "display_name"),
                                 password=password)
        return f"/console/users/{user.id}"
    return _changed(request, data, work, _users_again(request))


@get("/users/{ref:str}", sync_to_thread=True)
def user_detail(request: Request[Any, Any, Any], ref: str) -> Response[str]:
    return _page(request, "user.html", viewer_of(request), lambda session: views.user_page(session, ref, utcnow()))


@post("/users/{ref:str}/console-role", sync_to_thread=True)
def user_console_role(request: Request[Any, Any, Any], ref: str, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        user = users.get_user(session, ref)
        if user.id == viewer.user_id and _one(data, "role") != "admin":
            raise StoreError("invalid", "you cannot take away your own admin role (another admin can)")
        console_store.set_console_role(session, viewer.actor, user.id, _one(data, "role") or None)
        return f"/console/users/{user.id}"
    return _changed(request, data, work, _user_again(request, ref))


@post("/users/{ref:str}/state", sync_to_thread=True)
def user_state(request: Request[Any, Any, Any], ref: str, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        wanted = _one(data, "disabled")
        if wanted not in ("true", "false"):
            raise StoreError("invalid", "disabled must be true or false")
        user = users.update_user(session, viewer.actor, ref, disabled=wanted == "true")
        return f"/console/users/{user.id}"
    return _changed(request, data, work, _user_again(request, ref))


@post("/users/{ref:str}/sessions/{session_id:str}/revoke", sync_to_thread=True)
def user_session_revoke(request: Request[Any, Any, Any], ref: str, session_id: str, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        user = users.get_user(session, ref)
        if sessions.get_session(session, session_id).user_id != user.id:
            raise StoreError("not_found", f"session {session_id} is not one of {user.upn}'s")
        sessions.revoke_session(session, viewer.actor, session_id, reason="revoked in the console")
        return f"/console/users/{user.id}"
    return _changed(request, data, work, _user_again(request, ref))


@post("/devices/{device_id:str}/revoke", sync_to_thread=True)
def device_revoke(request: Request[Any, Any, Any], device_id: str, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        device = devices.revoke_device(session, viewer.actor, device_id, reason="revoked in the console")
        return _one(data, "next") if _one(data, "next") in ("/console/devices",) else f"/console/users/{device.user_id}"

    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "devices.html", viewer, views.devices_page,
                     status=STATUS.get(exc.code, 400), error=str(exc))
    return _changed(request, data, work, again)


@get("/devices", sync_to_thread=True)
def devices_list(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "devices.html", viewer_of(request), views.devices_page)


@post("/user-groups", sync_to_thread=True)
def user_group_create(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        user_groups.create_user_group(session, viewer.actor, _one(data, "name"))
        return "/console/users"
    return _changed(request, data, work, _users_again(request))


@post("/user-groups/{ref:str}/members", sync_to_thread=True)
def user_group_member(request: Request[Any, Any, Any], ref: str, data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        if _one(data, "remove"):
            user_groups.remove_group_member(session, viewer.actor, ref, _one(data, "user"))
        else:
            user_groups.add_group_member(session, viewer.actor, ref, _one(data, "user"))
        return "/console/users"
    return _changed(request, data, work, _users_again(request))


# ---------------------------------------------------------------------------- policies


@get("/policies", sync_to_thread=True)
def policies_list(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "policies.html", viewer_of(request), views.policies_page)


# ---------------------------------------------------------------------------- traffic logs, discovery


def _time(value: str, what: str) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise StoreError("invalid", f"{what} {value[:40]!r} is not a time like 2026-05-01T12:00") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _traffic_filter(query: dict[str, str]) -> traffic.TrafficFilter:
    action = query.get("action", "")
    if action not in ("", "allow", "deny", "report"):
        raise StoreError("invalid", f"action must be allow, deny or report, not {action[:20]!r}")
    hours = query.get("hours", "")
    since = _time(query.get("since", ""), "since")
    if hours and since is None:
        try:
            since = utcnow() - timedelta(hours=float(hours))
        except (ValueError, OverflowError):
            raise StoreError("invalid", f"hours must be a number, not {hours[:20]!r}") from None
    return traffic.TrafficFilter(since=since, until=_time(query.get("until", ""), "until"),
                                 user=query.get("user") or None, app=query.get("app") or None, action=action or None,
                                 connector=query.get("connector") or None, device=query.get("device") or None,
                                 reason=query.get("reason") or None)


@get("/traffic", sync_to_thread=True)
def traffic_list(request: Request[Any, Any, Any]) -> Response[str]:
    viewer = viewer_of(request)
    query = {k: v.strip()[:300] for k, v in request.query_params.items() if isinstance(v, str)}
    picked = [c for c in request.query_params.getall("col", []) if c in views.TRAFFIC_CHOICES]
    columns = picked or list(views.TRAFFIC_COLUMNS)
    base = {k: v for k, v in query.items() if k not in ("before", "col")}
    try:
        f = _traffic_filter(query)
        before = int(query["before"]) if query.get("before") else None
    except (StoreError, ValueError) as exc:
        return render(request, "traffic.html", viewer, status=422, error=str(exc), rows=[], query=query,
                      columns=columns, choices=views.TRAFFIC_CHOICES, base=base, picked=picked)
    with _api(request).store.read() as session:
        context = views.traffic_page(session, f, before)
    export = urlencode({k: v for k, v in base.items() if v})
    template = "traffic_rows.html" if request.headers.get("hx-request") == "true" and \
        request.headers.get("hx-target") == "traffic-rows" else "traffic.html"
    return render(request, template, viewer, query=query, columns=columns, choices=views.TRAFFIC_CHOICES,
                  base=base, picked=picked, export=export, **context)


@get("/traffic/{record_id:int}", sync_to_thread=True)
def traffic_detail(request: Request[Any, Any, Any], record_id: int) -> Response[str]:
    viewer = viewer_of(request)
    with _api(request).store.read() as session:
        row = views.traffic_record(session, record_id)
    if row is None:
        raise Refused(f"no traffic record {record_id} (it may have aged out)", status=404)
    return render(request, "traffic_record.html", viewer, row=row, fields=views.TRAFFIC_FIELDS)


@get("/traffic/export", sync_to_thread=True)
def traffic_export(request: Request[Any, Any, Any], fmt: str = "jsonl") -> Stream:
    """Every matching record, oldest first, as JSON Lines (``fmt=jsonl``) or CSV (``fmt=csv``),
    streamed in pages of ``EXPORT_PAGE`` records (memory stays bounded however many match)."""
    viewer_of(request)
    if fmt not in ("jsonl", "csv"):
        raise Refused(f"export format must be jsonl or csv, not {fmt[:20]!r}", status=404)
    query = {k: v.strip()[:300] for k, v in request.query_params.items() if isinstance(v, str)}
    f = _traffic_filter(query)
    store = _api(request).store
    encoder = msgspec.json.Encoder()
    names = views.TRAFFIC_FIELDS

    def page(after: int) -> tuple[bytes, int, int]:
        with store.read() as session:
            rows = traffic.records_after(session, f, after, EXPORT_PAGE)
            if fmt == "jsonl":
                body = b"".join(encoder.encode(record_out(r)) + b"\n" for r in rows)
            else:
                text = io.StringIO()
                writer = csv.writer(text)
                for r in rows:
                    plain = msgspec.to_builtins(record_out(r))
                    writer.writerow([_csv_cell(plain.get(n, "")) for n in names])
                body = text.getvalue().encode()
            return body, len(rows), rows[-1].id if rows else after

    async def chunks() -> AsyncIterator[bytes]:
        if fmt == "csv":
            yield (",".join(names) + "\r\n").encode()
        after = 0
        while True:
            body, count, after = await anyio.to_thread.run_sync(page, after)
            if body:
                yield body
            if count < EXPORT_PAGE:
                return

    media = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    return Stream(chunks(), media_type=media, headers={
        **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="traffic.{fmt}"'})


_FORMULA = re.compile(r"(^|[,;\t])(\s*)([=+\-@\t\r])")


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (OWASP CSV injection): a ``'`` before a
    formula character at its start and after any ``,``, ``;`` or tab in it, since a spreadsheet
    whose list separator is ``;`` splits the cell there (the JSON Lines export keeps values
    exact)."""
    if isinstance(value, str):
        return _FORMULA.sub(r"\1\2'\3", value)
    return "" if value is None else value


@get("/discovery", sync_to_thread=True)
def discovery_list(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "discovery.html", viewer_of(request), views.discovery_page)


@post("/discovery/promote", sync_to_thread=True)
def discovery_promote(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        app = applications.create_application(session, viewer.actor, _one(data, "name"),
                                              connector_group=_one(data, "connector_group") or None,
                                              segments=[{"destination": _one(data, "destination"),
                                                         "ports": _one(data, "ports"),
                                                         "protocol": _one(data, "protocol", "tcp")}])
        return _app_url(app)

    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "discovery.html", viewer, views.discovery_page,
                     status=STATUS.get(exc.code, 400), error=str(exc))
    return _changed(request, data, work, again)


# ---------------------------------------------------------------------------- DNS, forwarding profile, audit


def _settings_again(request: Request[Any, Any, Any]) -> Callable[[Viewer, Any, StoreError], Response[str]]:
    def again(viewer: Viewer, form: dict[str, Any], exc: StoreError) -> Response[str]:
        return _page(request, "settings.html", viewer, views.settings_page,
                     status=STATUS.get(exc.code, 400), error=str(exc))
    return again


@get("/settings", sync_to_thread=True)
def settings_view(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "settings.html", viewer_of(request), views.settings_page)


@post("/dns-suffixes", sync_to_thread=True)
def dns_suffix_add(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        if _one(data, "remove"):
            dns_suffixes.remove_dns_suffix(session, viewer.actor, _one(data, "suffix"))
        else:
            dns_suffixes.add_dns_suffix(session, viewer.actor, _one(data, "suffix"))
        return "/console/settings"
    return _changed(request, data, work, _settings_again(request))


@post("/forwarding-profile", sync_to_thread=True)
def profile_set(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    def work(viewer: Viewer, session: Any) -> str:
        forwarding_profile.set_fail_mode(session, viewer.actor, _one(data, "fail_mode"))
        return "/console/settings"
    return _changed(request, data, work, _settings_again(request))


@get("/audit", sync_to_thread=True)
def audit_list(request: Request[Any, Any, Any], actor: str = "", object_type: str = "") -> Response[str]:
    return _page(request, "audit.html", viewer_of(request),
                 lambda session: views.audit_page(session, actor.strip()[:200], object_type.strip()[:64]),
                 actor=actor, object_type=object_type)


# ---------------------------------------------------------------------------- test access


@get("/test-access", sync_to_thread=True)
def test_access_page(request: Request[Any, Any, Any]) -> Response[str]:
    return _page(request, "test_access.html", viewer_of(request), views.test_access_page, form={})


@post("/test-access", sync_to_thread=True)
def test_access(request: Request[Any, Any, Any], data: Form) -> Response[str]:
    """The edge's decision (readers may ask: nothing changes; Origin, session and CSRF still checked)."""
    viewer = require_form(request, data)
    error, trial, status = "", None, 200
    try:
        port_text = _one(data, "port")
        if not port_text.isdigit():
            raise StoreError("invalid", f"port must be a number from 1 to 65535, not {port_text[:20]!r}")
        trial = try_access(_api(request), user=_one(data, "user"), device_id=_one(data, "device"),
                           host=_one(data, "host"), port=int(port_text), protocol=_one(data, "protocol", "tcp"),
                           source=_one(data, "source"), mfa=bool(_one(data, "mfa")))
    except StoreError as exc:
        error, status = str(exc), STATUS.get(exc.code, 400)
    if request.headers.get("hx-request"):
        return render(request, "test_access_result.html", viewer, status=status, error=error, trial=trial)
    return _page(request, "test_access.html", viewer, views.test_access_page,
                 status=status, error=error, trial=trial, form=data)


HANDLERS = [
    sign_in_page, sign_in, sign_out, overview, applications_list, applications_create, application_detail,
    application_edit, application_delete, segment_add, segment_remove, assignment_add, assignment_remove,
    connectors_list, group_create, group_update, token_create, connector_move, connector_revoke, edge_revoke, edges_list, users_list, user_create,
    user_detail, user_console_role, user_state, user_session_revoke, device_revoke, devices_list, user_group_create,
    user_group_member, policies_list, traffic_list, traffic_export, traffic_detail, discovery_list,
    discovery_promote, settings_view, dns_suffix_add, profile_set, audit_list, test_access_page, test_access,
]


def console_router() -> Router:
    """``/console``: the pages and their static files (no admin key: a console session instead)."""
    static = create_static_files_router(path="/static", directories=[HERE / "static"], include_in_schema=False,
                                        cache_control=None, name="console-static")
    return Router(path="/console", route_handlers=[*HANDLERS, static], include_in_schema=False, security=[],
                  exception_handlers={NotSignedIn: not_signed_in, Refused: refused,  # type: ignore[dict-item]
                                      StoreError: store_error})
