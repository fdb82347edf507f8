"""The web application routes under ``/v1`` (admin key required: ``guards.require_admin``).

- ``GET/POST /v1/webapps``, ``GET/PATCH/DELETE /v1/webapps/{name}``: published web apps
  (``control.store.webapps``: external and internal URL, connector group, pre-authentication,
  backend timeout and options);
- ``GET/POST/DELETE /v1/webapps/{name}/assignments``: who may use one (the same assignments as
  ``/v1/applications/{name}/assignments``, refused for an application that is not a web app).

Each handler is a thin shell around the store (which validates, audits with the admin key's
name as actor and bumps the configuration version, so edges publish the change within
seconds). ``conditional_access`` in the answer says whether sign-in and policies apply:
``false`` for a ``passthrough`` app, which anyone who can reach the edge can use.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from litestar import Router, delete, get, patch, post
from litestar.exceptions import ValidationException

from control.store import assignments, webapps
from control.store.models import WebApplication

from .guards import Api, admin_routes
from .policy_schemas import AssignmentIn, AssignmentOut, GroupRef, UserRef
from .schemas import _Request


class WebAppCreate(_Request):
    name: str
    external_url: str
    internal_url: str
    connector_group: str | None = None  # default: the default connector group
    preauth: Literal["ferryman", "passthrough"] = "ferryman"
    backend_timeout: Literal["default", "long"] = "default"
    translate_headers: bool = True
    translate_body: bool = False
    cookie_http_only: bool = True
    cookie_persistent: bool = False
    websocket: bool = True
    verify_backend: bool = True
    cors_preflight_bypass: bool = False
    header_sso: dict[str, str] = {}
    backend_ca: str = ""
    certificate: str = ""  # custom domain: PEM chain, leaf first
    certificate_key: str = ""  # its key (PEM); stored sealed, never shown


class WebAppUpdate(_Request):
    """Fields left out (or null) stay as they are."""

    name: str | None = None
    external_url: str | None = None
    internal_url: str | None = None
    connector_group: str | None = None
    preauth: Literal["ferryman", "passthrough"] | None = None
    backend_timeout: Literal["default", "long"] | None = None
    translate_headers: bool | None = None
    translate_body: bool | None = None
    cookie_http_only: bool | None = None
    cookie_persistent: bool | None = None
    websocket: bool | None = None
    verify_backend: bool | None = None
    cors_preflight_bypass: bool | None = None
    header_sso: dict[str, str] | None = None
    backend_ca: str | None = None
    certificate: str | None = None  # with certificate_key; both "" remove the custom certificate
    certificate_key: str | None = None


class WebAppOut(msgspec.Struct):
    id: int
    name: str
    external_url: str
    internal_url: str
    connector_group: str
    preauth: str
    conditional_access: bool  # false for passthrough: no sign-in, no assignments, no policies
    backend_timeout: str
    translate_headers: bool
    translate_body: bool
    cookie_http_only: bool
    cookie_persistent: bool
    websocket: bool
    verify_backend: bool
    cors_preflight_bypass: bool
    header_sso: dict[str, str]
    backend_ca: str
    certificate_sha256: str  # of the custom-domain certificate ("" for none: the edges' own)
    certificate_not_after: str


def webapp_out(row: WebApplication) -> WebAppOut:
    state = webapps.web_state(row)
    return WebAppOut(id=row.application_id, conditional_access=row.preauth != "passthrough", **state)


def _assignment_out(view: assignments.AssignmentView) -> AssignmentOut:
    return AssignmentOut(id=view.id, application=view.application,
                         user=None if view.user_id is None else UserRef(id=view.user_id, upn=view.upn),
                         group=None if view.group_id is None else GroupRef(id=view.group_id, name=view.group))


@get("/webapps", sync_to_thread=True, tags=["webapps"])
def list_webapps(api: Api) -> list[WebAppOut]:
    with api.store.read() as session:
        return [webapp_out(w) for w in webapps.list_webapps(session)]


@get("/webapps/{name:str}", sync_to_thread=True, tags=["webapps"])
def get_webapp(api: Api, name: str) -> WebAppOut:
    with api.store.read() as session:
        return webapp_out(webapps.get_webapp(session, name))


@post("/webapps", sync_to_thread=True, tags=["webapps"])
def create_webapp(api: Api, actor: str, data: WebAppCreate) -> WebAppOut:
    """A new web app; 409 when its name or external host is taken."""
    fields = msgspec.structs.asdict(data)
    name = fields.pop("name")
    with api.store.begin() as session:
        return webapp_out(webapps.create_webapp(session, actor, name, box=api.box, **fields))


@patch("/webapps/{name:str}", sync_to_thread=True, tags=["webapps"])
def update_webapp(api: Api, actor: str, name: str, data: WebAppUpdate) -> WebAppOut:
    fields = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
    new_name = fields.pop("name", None)
    with api.store.begin() as session:
        return webapp_out(webapps.update_webapp(session, actor, name, new_name=new_name, box=api.box, **fields))


@delete("/webapps/{name:str}", sync_to_thread=True, tags=["webapps"])
def delete_webapp(api: Api, actor: str, name: str) -> None:
    with api.store.begin() as session:
        webapps.delete_webapp(session, actor, name)


@get("/webapps/{name:str}/assignments", sync_to_thread=True, tags=["webapps"])
def list_webapp_assignments(api: Api, name: str) -> list[AssignmentOut]:
    with api.store.read() as session:
        webapps.get_webapp(session, name)
        return [_assignment_out(v) for v in assignments.list_assignments(session, name)]


@post("/webapps/{name:str}/assignments", sync_to_thread=True, tags=["webapps"])
def assign_webapp(api: Api, actor: str, name: str, data: AssignmentIn) -> AssignmentOut:
    with api.store.begin() as session:
        webapps.get_webapp(session, name)
        return _assignment_out(assignments.assign_application(session, actor, name, user=data.user,
                                                              group=data.group))


@delete("/webapps/{name:str}/assignments", sync_to_thread=True, tags=["webapps"])
def unassign_webapp(api: Api, actor: str, name: str, data: AssignmentIn | None = None,
                    user: str | None = None, group: str | None = None) -> None:
    """Remove an assignment; the target goes in the body or as ``?user=`` / ``?group=``."""
    if data is not None and (user is not None or group is not None):
        raise ValidationException("give the user or group either in the body or as a query parameter, not both")
    if data is not None:
        user, group = data.user, data.group
    with api.store.begin() as session:
        webapps.get_webapp(session, name)
        assignments.unassign_application(session, actor, name, user=user, group=group)


WEBAPP_HANDLERS = [list_webapps, get_webapp, create_webapp, update_webapp, delete_webapp, list_webapp_assignments,
                   assign_webapp, unassign_webapp]


def webapp_router() -> Router:
    """The ``/v1/webapps`` routes, each guarded by an admin key; ``actor`` is that key's name."""
    return admin_routes(WEBAPP_HANDLERS)
