"""The access routes under ``/v1`` (admin key required: ``guards.require_admin``): who an
application is assigned to, named locations, and conditional-access policies.

- ``GET/POST/DELETE /v1/applications/{name}/assignments`` (body ``{"user": id-or-UPN}`` or
  ``{"group": id-or-name}``; DELETE also takes them as query parameters);
- ``GET/POST /v1/named-locations``, ``GET/PATCH/DELETE /v1/named-locations/{name}``;
- ``GET/POST /v1/policies``, ``GET/PATCH/DELETE /v1/policies/{name}``.

Each handler is a thin shell around ``control.store.assignments``, ``named_locations`` or
``policies`` (which validates, audits with the admin key's name as actor and bumps the
configuration version, so edges get the change within seconds). Responses name targets
(application names, UPNs, group names) next to ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Router, delete, get, patch, post
from litestar.exceptions import ValidationException
from sqlalchemy.orm import Session

from control.store import assignments, named_locations, policies
from control.store.models import AccessPolicy, NamedLocation

from .guards import Api, admin_routes
from .policy_schemas import (
    AppRef,
    AssignmentIn,
    AssignmentOut,
    ConditionsIn,
    ConditionsOut,
    GroupRef,
    NamedLocationCreate,
    NamedLocationOut,
    NamedLocationUpdate,
    PolicyCreate,
    PolicyOut,
    PolicyUpdate,
    UserRef,
)

# ---------------------------------------------------------------------------- conversions


def _assignment_out(view: assignments.AssignmentView) -> AssignmentOut:
    return AssignmentOut(id=view.id, application=view.application,
                         user=None if view.user_id is None else UserRef(id=view.user_id, upn=view.upn),
                         group=None if view.group_id is None else GroupRef(id=view.group_id, name=view.group))


def _locations_out(session: Session, rows: Sequence[NamedLocation]) -> list[NamedLocationOut]:
    used = [(p.name, (p.conditions or {}).get("locations", [])) for p in policies.list_policies(session)]
    return [NamedLocationOut(id=row.id, name=row.name, cidrs=named_locations.location_cidrs(row),
                             policies=[name for name, locations in used if row.name in locations],
                             created_at=row.created_at)
            for row in rows]


def _policies_out(session: Session, rows: Sequence[AccessPolicy]) -> list[PolicyOut]:
    return [PolicyOut(id=v.id, name=v.name, state=v.state, grant=v.grant,
                      applications=[AppRef(id=i, name=n) for i, n in v.applications],
                      users=[UserRef(id=i, upn=n) for i, n in v.users],
                      groups=[GroupRef(id=i, name=n) for i, n in v.groups],
                      conditions=msgspec.convert(v.conditions, ConditionsOut), created_at=v.created_at,
                      updated_at=v.updated_at)
            for v in policies.policy_views(session, rows)]


def _conditions_in(conditions: ConditionsIn | None) -> dict[str, Any] | None:
    if conditions is None:
        return None
    return {k: v for k, v in msgspec.structs.asdict(conditions).items() if v is not None}


# ---------------------------------------------------------------------------- assignments


@get("/applications/{name:str}/assignments", sync_to_thread=True, tags=["access"])
def list_assignments(api: Api, name: str) -> list[AssignmentOut]:
    """Who the application is assigned to: users (by UPN), then groups (by name)."""
    with api.store.read() as session:
        return [_assignment_out(v) for v in assignments.list_assignments(session, name)]


@post("/applications/{name:str}/assignments", sync_to_thread=True, tags=["access"])
def assign_application(api: Api, actor: str, name: str, data: AssignmentIn) -> AssignmentOut:
    """Assign the application to a user (id or UPN) or a group (id or name); 409 if it already is."""
    with api.store.begin() as session:
        return _assignment_out(assignments.assign_application(session, actor, name, user=data.user, group=data.group))


@delete("/applications/{name:str}/assignments", sync_to_thread=True, tags=["access"])
def unassign_application(api: Api, actor: str, name: str, data: AssignmentIn | None = None,
                         user: str | None = None, group: str | None = None) -> None:
    """Remove an assignment; the target goes in the body or as ``?user=`` / ``?group=``."""
    if data is not None and (user is not None or group is not None):
        raise ValidationException("give the user or group either in the body or as a query parameter, not both")
    if data is not None:
        user, group = data.user, data.group
    with api.store.begin() as session:
        assignments.unassign_application(session, actor, name, user=user, group=group)


# ---------------------------------------------------------------------------- named locations


@get("/named-locations", sync_to_thread=True, tags=["access"])
def list_locations(api: Api) -> list[NamedLocationOut]:
    with api.store.read() as session:
        return _locations_out(session, named_locations.list_locations(session))


@get("/named-locations/{name:str}", sync_to_thread=True, tags=["access"])
def get_location(api: Api, name: str) -> NamedLocationOut:
    with api.store.read() as session:
        return _locations_out(session, [named_locations.get_location(session, name)])[0]


@post("/named-locations", sync_to_thread=True, tags=["access"])
def create_location(api: Api, actor: str, data: NamedLocationCreate) -> NamedLocationOut:
    """A named location (source networks for policy conditions); 422 names a bad entry."""
    with api.store.begin() as session:
        return _locations_out(session, [named_locations.create_location(session, actor, data.name, data.cidrs)])[0]


@patch("/named-locations/{name:str}", sync_to_thread=True, tags=["access"])
def update_location(api: Api, actor: str, name: str, data: NamedLocationUpdate) -> NamedLocationOut:
    """Rename (carried into the policies using it) and/or replace the networks."""
    with api.store.begin() as session:
        row = named_locations.update_location(session, actor, name, new_name=data.name, cidrs=data.cidrs)
        return _locations_out(session, [row])[0]


@delete("/named-locations/{name:str}", sync_to_thread=True, tags=["access"])
def delete_location(api: Api, actor: str, name: str) -> None:
    """Delete a named location; 409 naming the policies that still use it."""
    with api.store.begin() as session:
        named_locations.delete_location(session, actor, name)


# ---------------------------------------------------------------------------- policies


@get("/policies", sync_to_thread=True, tags=["access"])
def list_policies(api: Api) -> list[PolicyOut]:
    with api.store.read() as session:
        return _policies_out(session, policies.list_policies(session))


@get("/policies/{name:str}", sync_to_thread=True, tags=["access"])
def get_policy(api: Api, name: str) -> PolicyOut:
    with api.store.read() as session:
        return _policies_out(session, [policies.get_policy(session, name)])[0]


@post("/policies", sync_to_thread=True, tags=["access"])
def create_policy(api: Api, actor: str, data: PolicyCreate) -> PolicyOut:
    """A conditional-access policy (at most 200); every target and condition is checked."""
    with api.store.begin() as session:
        row = policies.create_policy(session, actor, data.name, grant=data.grant, state=data.state,
                                     applications=data.applications, users=data.users, groups=data.groups,
                                     conditions=_conditions_in(data.conditions))
        return _policies_out(session, [row])[0]


@patch("/policies/{name:str}", sync_to_thread=True, tags=["access"])
def update_policy(api: Api, actor: str, name: str, data: PolicyUpdate) -> PolicyOut:
    """Change a policy: each field given replaces that part (``conditions``: all of them)."""
    with api.store.begin() as session:
        row = policies.update_policy(session, actor, name, new_name=data.name, state=data.state, grant=data.grant,
                                     applications=data.applications, users=data.users, groups=data.groups,
                                     conditions=_conditions_in(data.conditions))
        return _policies_out(session, [row])[0]


@delete("/policies/{name:str}", sync_to_thread=True, tags=["access"])
def delete_policy(api: Api, actor: str, name: str) -> None:
    with api.store.begin() as session:
        policies.delete_policy(session, actor, name)


POLICY_HANDLERS = [
    list_assignments, assign_application, unassign_application,
    list_locations, get_location, create_location, update_location, delete_location,
    list_policies, get_policy, create_policy, update_policy, delete_policy,
]


def policy_router() -> Router:
    """The access routes under ``/v1``, each guarded by an admin key; ``actor`` is that key's name."""
    return admin_routes(POLICY_HANDLERS)
