"""Access configuration in the store: application assignments, named locations, conditional-access policies.

Service-layer functions in the style of ``repo``: each takes the caller's ``Session`` and
never commits; each change takes an ``actor``, runs in a savepoint (a refused change
leaves nothing behind), writes an audit record and bumps the configuration version (edges
decide flows from these), and refuses with ``StoreError`` and a precise message.

- **assignments**: an application is assigned to users and groups (``AppAssignment``); at
  the edge a flow is allowed only to a user assigned directly or through a group. Users
  are named by id or UPN, groups by id or name. (The schema's unique index cannot catch a
  duplicate, since one of its columns is always NULL; ``assign_application`` checks it under
  the configuration lock.)
- **named locations**: a name for source networks (``10.0.0.0/8,2001:db8::/32``), for the
  ``locations`` condition of policies. Entries are stored in canonical form
  (``ipaddress.ip_network(strict=False)``: ``10.1.2.3/8`` is ``10.0.0.0/8``). Renaming a
  location renames it in the policies that use it; deleting one that a policy uses is
  refused.
- **policies** (``AccessPolicy``): targets (application names, user ids/UPNs, group
  ids/names, resolved and stored as ids) and conditions (``CONDITION_KEYS``), every one
  checked: unknown keys, unknown names, bad values are refused naming the culprit.

Reading back: ``assignment_views`` and ``policy_views`` give the rows with names/UPNs next to
the ids (a user or group deleted since shows as None), for the API and audit records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import identity
from .errors import StoreError
from .models import (
    POLICY_GRANTS,
    POLICY_STATES,
    AccessPolicy,
    AppAssignment,
    Application,
    NamedLocation,
    User,
    UserGroup,
    utcnow,
)
from .repo import _change, _lock_config, _name, _record, get_application

MAX_POLICIES = 200
MAX_LOCATION_ENTRIES = 1000
MAX_POLICY_TARGETS = 1000  # per list: applications, users, groups
MAX_POLICY_LOCATIONS = 100
MAX_DEVICE_OS = 20
MAX_DEVICE_OS_LENGTH = 64  # as ``Device.os``
MAX_SIGNIN_AGE = 365 * 86400  # seconds
RISK_LEVELS = ("low", "medium", "high")
CONDITION_KEYS = ("locations", "device_os", "user_risk_at_least", "signin_older_than")


# ---------------------------------------------------------------------------- looking up users and groups


def find_user(session: Session, ref: object) -> User:
    """The user whose id or UPN (any case) is ``ref`` (``identity.get_user``); ``not_found`` otherwise."""
    return identity.get_user(session, _name(ref, "user (id or UPN)", 255))


def find_group(session: Session, ref: object) -> UserGroup:
    """The user group whose id or name is ``ref`` (``identity.get_user_group``); ``not_found`` otherwise."""
    return identity.get_user_group(session, _name(ref, "group (id or name)"))


def _upns(session: Session, ids: Iterable[str]) -> dict[str, str]:
    wanted = set(ids)
    if not wanted:
        return {}
    return {user_id: upn for user_id, upn in session.execute(select(User.id, User.upn).where(User.id.in_(wanted)))}


def _group_names(session: Session, ids: Iterable[str]) -> dict[str, str]:
    wanted = set(ids)
    if not wanted:
        return {}
    rows = session.execute(select(UserGroup.id, UserGroup.name).where(UserGroup.id.in_(wanted)))
    return {group_id: name for group_id, name in rows}


def _app_names(session: Session, ids: Iterable[int]) -> dict[int, str]:
    wanted = set(ids)
    if not wanted:
        return {}
    rows = session.execute(select(Application.id, Application.name).where(Application.id.in_(wanted)))
    return {app_id: name for app_id, name in rows}


# ---------------------------------------------------------------------------- application assignments


@dataclass(frozen=True)
class AssignmentView:
    """An assignment with names: exactly one of ``user_id`` (with ``upn``) and ``group_id`` (with ``group``)."""

    id: int
    application: str
    user_id: str | None
    upn: str | None
    group_id: str | None
    group: str | None

    def target(self) -> str:
        return f"user {self.upn!r}" if self.user_id is not None else f"group {self.group!r}"

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "application": self.application, "user_id": self.user_id, "upn": self.upn,
                "group_id": self.group_id, "group": self.group}


def assignment_views(session: Session, app: Application, rows: Sequence[AppAssignment]) -> list[AssignmentView]:
    """``rows`` (assignments of ``app``) with UPNs and group names: users by UPN, then groups by name."""
    upns = _upns(session, (r.user_id for r in rows if r.user_id is not None))
    groups = _group_names(session, (r.group_id for r in rows if r.group_id is not None))
    views = [AssignmentView(id=r.id, application=app.name, user_id=r.user_id,
                            upn=None if r.user_id is None else upns.get(r.user_id),
                            group_id=r.group_id, group=None if r.group_id is None else groups.get(r.group_id))
             for r in rows]
    return sorted(views, key=lambda v: (v.user_id is None, v.upn or v.group or "", v.id))


def list_assignments(session: Session, app_name: str) -> list[AssignmentView]:
    """Who application ``app_name`` is assigned to (users by UPN, then groups by name)."""
    app = get_application(session, app_name)
    rows = list(session.scalars(select(AppAssignment).where(AppAssignment.application_id == app.id)))
    return assignment_views(session, app, rows)


def _target(session: Session, user: str | None, group: str | None) -> tuple[User | None, UserGroup | None]:
    if (user is None) == (group is None):
        raise StoreError("invalid", "an assignment names exactly one target: a user (id or UPN) or a group "
                                    "(id or name)")
    if user is not None:
        return find_user(session, user), None
    return None, find_group(session, group)


def _find_assignment(session: Session, app: Application, user: User | None,
                     group: UserGroup | None) -> AppAssignment | None:
    query = select(AppAssignment).where(AppAssignment.application_id == app.id)
    if user is not None:
        query = query.where(AppAssignment.user_id == user.id)
    else:
        assert group is not None
        query = query.where(AppAssignment.group_id == group.id)
    return session.scalar(query)


def _target_text(user: User | None, group: UserGroup | None) -> str:
    return f"user {user.upn!r}" if user is not None else f"group {group.name!r}"  # type: ignore[union-attr]


@_change
def assign_application(session: Session, actor: str, app_name: str, *, user: str | None = None,
                       group: str | None = None) -> AssignmentView:
    """Assign application ``app_name`` to one user (id or UPN) or one group (id or name).

    Refused: ``not_found`` for an unknown application, user or group; ``conflict`` when the
    assignment exists already; ``invalid`` unless exactly one of ``user`` and ``group`` is given.
    """
    _lock_config(session)
    app = get_application(session, app_name)
    target_user, target_group = _target(session, user, group)
    if _find_assignment(session, app, target_user, target_group) is not None:
        raise StoreError("conflict", f"application {app.name!r} is already assigned to "
                                     f"{_target_text(target_user, target_group)}")
    row = AppAssignment(application_id=app.id, user_id=target_user.id if target_user else None,
                        group_id=target_group.id if target_group else None)
    session.add(row)
    session.flush()
    (view,) = assignment_views(session, app, [row])
    _record(session, actor, "app_assignment.create", "app_assignment", row.id, None, view.state(), config=True)
    return view


@_change
def unassign_application(session: Session, actor: str, app_name: str, *, user: str | None = None,
                         group: str | None = None) -> None:
    """Remove the assignment of ``app_name`` to a user (id or UPN) or a group (id or name)."""
    _lock_config(session)
    app = get_application(session, app_name)
    target_user, target_group = _target(session, user, group)
    row = _find_assignment(session, app, target_user, target_group)
    if row is None:
        raise StoreError("not_found", f"application {app.name!r} is not assigned to "
                                      f"{_target_text(target_user, target_group)}")
    (view,) = assignment_views(session, app, [row])
    session.delete(row)
    session.flush()
    _record(session, actor, "app_assignment.delete", "app_assignment", view.id, view.state(), None, config=True)


# ---------------------------------------------------------------------------- named locations


def location_cidrs(location: NamedLocation) -> list[str]:
    """The location's networks, in their stored (canonical) form and order."""
    return [c for c in location.cidrs.split(",") if c]


def _location_state(location: NamedLocation) -> dict[str, Any]:
    return {"id": location.id, "name": location.name, "cidrs": location_cidrs(location),
            "created_at": location.created_at.isoformat()}


def _cidrs(name: str, value: object) -> str:
    """``value`` (a list of CIDR strings) checked and in canonical comma-separated form."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise StoreError("invalid", f"named location {name!r}: cidrs must be a list of networks such as "
                                    f"['10.0.0.0/8', '2001:db8::/32']")
    if not value:
        raise StoreError("invalid", f"named location {name!r} needs at least one network")
    if len(value) > MAX_LOCATION_ENTRIES:
        raise StoreError("invalid", f"named location {name!r} has {len(value)} networks; at most "
                                    f"{MAX_LOCATION_ENTRIES} are allowed")
    seen: dict[str, int] = {}
    out = []
    for number, entry in enumerate(value, 1):
        if not isinstance(entry, str) or not entry.strip():
            raise StoreError("invalid", f"named location {name!r}: entry {number} ({entry!r}) must be a network "
                                        f"such as 10.0.0.0/8")
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise StoreError("invalid", f"named location {name!r}: entry {number} {entry.strip()!r} is not an IP "
                                        f"network (expected an address or a CIDR such as 10.0.0.0/8 or "
                                        f"2001:db8::/32)") from None
        text = str(network)
        if text in seen:
            raise StoreError("invalid", f"named location {name!r}: entry {number} {entry.strip()!r} is the same "
                                        f"network as entry {seen[text]} ({text})")
        seen[text] = number
        out.append(text)
    return ",".join(out)


def list_locations(session: Session) -> list[NamedLocation]:
    return list(session.scalars(select(NamedLocation).order_by(NamedLocation.name)))


def get_location(session: Session, name: str) -> NamedLocation:
    location = session.scalar(select(NamedLocation).where(NamedLocation.name == name))
    if location is None:
        raise StoreError("not_found", f"named location {name!r} does not exist")
    return location


def _policies_using_location(session: Session, name: str) -> list[AccessPolicy]:
    return [p for p in list_policies(session) if name in (p.conditions or {}).get("locations", [])]


@_change
def create_location(session: Session, actor: str, name: str, cidrs: Sequence[str]) -> NamedLocation:
    """A named location: ``cidrs`` are IP networks (at most 1000), stored in canonical form."""
    _lock_config(session)
    name = _name(name, "named location name")
    if session.scalar(select(NamedLocation.id).where(NamedLocation.name == name)) is not None:
        raise StoreError("conflict", f"named location {name!r} already exists")
    location = NamedLocation(name=name, cidrs=_cidrs(name, cidrs), created_at=utcnow())
    session.add(location)
    session.flush()
    _record(session, actor, "named_location.create", "named_location", location.id, None,
            _location_state(location), config=True)
    return location


@_change
def update_location(session: Session, actor: str, name: str, *, new_name: str | None = None,
                    cidrs: Sequence[str] | None = None) -> NamedLocation:
    """Rename a named location and/or replace its networks (None: unchanged).

    A rename is carried into the conditions of every policy naming the location (each such
    policy gets its own audit record). A change that changes nothing is not recorded.
    """
    _lock_config(session)
    location = get_location(session, name)
    before = _location_state(location)
    old_name = location.name
    if new_name is not None:
        new_name = _name(new_name, "named location name")
        if new_name != location.name:
            if session.scalar(select(NamedLocation.id).where(NamedLocation.name == new_name)) is not None:
                raise StoreError("conflict", f"named location {new_name!r} already exists")
            location.name = new_name
    if cidrs is not None:
        location.cidrs = _cidrs(location.name, cidrs)
    session.flush()
    after = _location_state(location)
    if after == before:
        return location
    _record(session, actor, "named_location.update", "named_location", location.id, before, after, config=True)
    if location.name != old_name:
        for policy in _policies_using_location(session, old_name):
            policy_before = _policy_state(session, policy)
            conditions = dict(policy.conditions)
            conditions["locations"] = [location.name if n == old_name else n for n in conditions["locations"]]
            policy.conditions = conditions
            policy.updated_at = utcnow()
            session.flush()
            _record(session, actor, "access_policy.update", "access_policy", policy.id, policy_before,
                    _policy_state(session, policy), config=True)
    return location


@_change
def delete_location(session: Session, actor: str, name: str) -> None:
    """Delete a named location; refused (``conflict``, naming them) while policies use it."""
    _lock_config(session)
    location = get_location(session, name)
    users = _policies_using_location(session, location.name)
    if users:
        names = ", ".join(repr(p.name) for p in users)
        raise StoreError("conflict", f"named location {location.name!r} is used by "
                                     f"polic{'ies' if len(users) > 1 else 'y'} {names}: remove it from "
                                     f"{'their' if len(users) > 1 else 'its'} conditions first")
    before = _location_state(location)
    session.delete(location)
    session.flush()
    _record(session, actor, "named_location.delete", "named_location", before["id"], before, None, config=True)


# ---------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class PolicyView:
    """A policy with names next to ids (``None``: that application, user or group no longer exists)."""

    id: int
    name: str
    state: str
    grant: str
    applications: list[tuple[int, str | None]]
    users: list[tuple[str, str | None]]
    groups: list[tuple[str, str | None]]
    conditions: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "grant": self.grant,
                "applications": [{"id": i, "name": n} for i, n in self.applications],
                "users": [{"id": i, "upn": n} for i, n in self.users],
                "groups": [{"id": i, "name": n} for i, n in self.groups],
                "conditions": dict(self.conditions),
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat()}


def policy_views(session: Session, policies: Sequence[AccessPolicy]) -> list[PolicyView]:
    """``policies`` with application names, UPNs and group names (looked up once for all)."""
    apps = _app_names(session, (i for p in policies for i in p.applications))
    upns = _upns(session, (i for p in policies for i in p.users))
    groups = _group_names(session, (i for p in policies for i in p.groups))
    return [PolicyView(id=p.id, name=p.name, state=p.state, grant=p.grant_control,
                       applications=[(i, apps.get(i)) for i in p.applications],
                       users=[(i, upns.get(i)) for i in p.users], groups=[(i, groups.get(i)) for i in p.groups],
                       conditions=dict(p.conditions or {}), created_at=p.created_at, updated_at=p.updated_at)
            for p in policies]


def _policy_state(session: Session, policy: AccessPolicy) -> dict[str, Any]:
    return policy_views(session, [policy])[0].as_dict()


def list_policies(session: Session) -> list[AccessPolicy]:
    """Every policy, by name."""
    return list(session.scalars(select(AccessPolicy).order_by(AccessPolicy.name)))


def get_policy(session: Session, name: str) -> AccessPolicy:
    policy = session.scalar(select(AccessPolicy).where(AccessPolicy.name == name))
    if policy is None:
        raise StoreError("not_found", f"policy {name!r} does not exist")
    return policy


def _choice(value: object, what: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise StoreError("invalid", f"{what} {value!r} is not one of {', '.join(choices)}")
    return value


def _list(policy: str, value: object, what: str, limit: int) -> list[object]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise StoreError("invalid", f"policy {policy!r}: {what} must be a list, not {type(value).__name__}")
    if len(value) > limit:
        raise StoreError("invalid", f"policy {policy!r}: {len(value)} {what}; at most {limit} are allowed")
    return list(value)


def _once(policy: str, seen: dict[object, str], key: object, text: str, what: str) -> None:
    if key in seen:
        same = "" if seen[key] == text else f" (as {seen[key]!r})"
        raise StoreError("invalid", f"policy {policy!r}: {what} {text!r} is listed twice{same}")
    seen[key] = text


def _application_ids(session: Session, policy: str, value: object) -> list[int]:
    ids: list[int] = []
    seen: dict[object, str] = {}
    for entry in _list(policy, value, "applications", MAX_POLICY_TARGETS):
        name = _name(entry, f"policy {policy!r}: application name")
        app_id = session.scalar(select(Application.id).where(Application.name == name))
        if app_id is None:
            raise StoreError("not_found", f"policy {policy!r}: application {name!r} does not exist")
        _once(policy, seen, app_id, name, "application")
        ids.append(app_id)
    return ids


def _member_ids(session: Session, policy: str, value: object, what: str,
                find: Callable[[Session, object], User | UserGroup]) -> list[str]:
    """The ids of the users or groups (``what``) a policy names, each found by ``find`` once."""
    ids: list[str] = []
    seen: dict[object, str] = {}
    for entry in _list(policy, value, f"{what}s", MAX_POLICY_TARGETS):
        try:
            found = find(session, entry)
        except StoreError as exc:
            raise StoreError(exc.code, f"policy {policy!r}: {exc}") from None
        _once(policy, seen, found.id, str(entry).strip(), what)
        ids.append(found.id)
    return ids


def _user_ids(session: Session, policy: str, value: object) -> list[str]:
    return _member_ids(session, policy, value, "user", find_user)


def _group_ids(session: Session, policy: str, value: object) -> list[str]:
    return _member_ids(session, policy, value, "group", find_group)


def _conditions(session: Session, policy: str, value: object) -> dict[str, Any]:
    """Checked conditions in canonical form: only the conditions set, in ``CONDITION_KEYS`` order.

    A key whose value is None (or an empty list, or a zero ``signin_older_than``) is not set.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StoreError("invalid", f"policy {policy!r}: conditions must be an object with the keys "
                                    f"{', '.join(CONDITION_KEYS)}")
    unknown = [key for key in value if key not in CONDITION_KEYS]
    if unknown:
        raise StoreError("invalid", f"policy {policy!r}: unknown condition {str(unknown[0])!r} (known conditions: "
                                    f"{', '.join(CONDITION_KEYS)})")
    out: dict[str, Any] = {}
    locations = value.get("locations")
    if locations is not None:
        names: list[str] = []
        seen: dict[object, str] = {}
        for entry in _list(policy, locations, "locations", MAX_POLICY_LOCATIONS):
            name = _name(entry, f"policy {policy!r}: location name")
            if session.scalar(select(NamedLocation.id).where(NamedLocation.name == name)) is None:
                raise StoreError("not_found", f"policy {policy!r}: named location {name!r} does not exist")
            _once(policy, seen, name, name, "location")
            names.append(name)
        if names:
            out["locations"] = names
    device_os = value.get("device_os")
    if device_os is not None:
        systems: list[str] = []
        seen = {}
        for entry in _list(policy, device_os, "device_os entries", MAX_DEVICE_OS):
            if not isinstance(entry, str) or not entry.strip():
                raise StoreError("invalid", f"policy {policy!r}: device_os entry {entry!r} must be a non-empty "
                                            f"string such as 'Windows'")
            text = entry.strip()
            if len(text) > MAX_DEVICE_OS_LENGTH:
                raise StoreError("invalid", f"policy {policy!r}: device_os entry {text[:20]!r}... is longer than "
                                            f"{MAX_DEVICE_OS_LENGTH} characters")
            _once(policy, seen, text.lower(), text, "device OS")
            systems.append(text)
        if systems:
            out["device_os"] = systems
    risk = value.get("user_risk_at_least")
    if risk is not None:
        out["user_risk_at_least"] = _choice(risk, f"policy {policy!r}: user_risk_at_least", RISK_LEVELS)
    age = value.get("signin_older_than")
    if age is not None:
        if isinstance(age, bool) or not isinstance(age, int) or not 0 <= age <= MAX_SIGNIN_AGE:
            raise StoreError("invalid", f"policy {policy!r}: signin_older_than {age!r} must be a number of seconds "
                                        f"from 0 to {MAX_SIGNIN_AGE}")
        if age:
            out["signin_older_than"] = age
    return out


@_change
def create_policy(session: Session, actor: str, name: str, *, grant: str, state: str = "on",
                  applications: Sequence[str] = (), users: Sequence[str] = (), groups: Sequence[str] = (),
                  conditions: Mapping[str, Any] | None = None) -> AccessPolicy:
    """A conditional-access policy (at most ``MAX_POLICIES``).

    ``applications`` are names (empty: every application); ``users`` are ids or UPNs and
    ``groups`` ids or names (both empty: every user); all are stored as ids. ``conditions``
    may set ``locations`` (named-location names), ``device_os`` (list of OS names),
    ``user_risk_at_least`` (low, medium, high) and ``signin_older_than`` (seconds).
    """
    _lock_config(session)
    name = _name(name, "policy name")
    if session.scalar(select(AccessPolicy.id).where(AccessPolicy.name == name)) is not None:
        raise StoreError("conflict", f"policy {name!r} already exists")
    count = session.scalar(select(func.count()).select_from(AccessPolicy)) or 0
    if count >= MAX_POLICIES:
        raise StoreError("conflict", f"there are already {count} policies, the most allowed ({MAX_POLICIES}): "
                                     f"delete one first")
    now = utcnow()
    policy = AccessPolicy(
        name=name, state=_choice(state, f"policy {name!r}: state", POLICY_STATES),
        grant_control=_choice(grant, f"policy {name!r}: grant", POLICY_GRANTS),
        applications=_application_ids(session, name, applications), users=_user_ids(session, name, users),
        groups=_group_ids(session, name, groups), conditions=_conditions(session, name, conditions),
        created_at=now, updated_at=now,
    )
    session.add(policy)
    session.flush()
    _record(session, actor, "access_policy.create", "access_policy", policy.id, None, _policy_state(session, policy),
            config=True)
    return policy


@_change
def update_policy(session: Session, actor: str, name: str, *, new_name: str | None = None, state: str | None = None,
                  grant: str | None = None, applications: Sequence[str] | None = None,
                  users: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                  conditions: Mapping[str, Any] | None = None) -> AccessPolicy:
    """Change a policy: each argument given (not None) replaces that part; ``conditions``
    replaces every condition. Checked as in ``create_policy``; a change that changes
    nothing is not recorded."""
    _lock_config(session)
    policy = get_policy(session, name)
    before = _policy_state(session, policy)
    if new_name is not None:
        new_name = _name(new_name, "policy name")
        if new_name != policy.name:
            if session.scalar(select(AccessPolicy.id).where(AccessPolicy.name == new_name)) is not None:
                raise StoreError("conflict", f"policy {new_name!r} already exists")
            policy.name = new_name
    label = policy.name
    if state is not None:
        policy.state = _choice(state, f"policy {label!r}: state", POLICY_STATES)
    if grant is not None:
        policy.grant_control = _choice(grant, f"policy {label!r}: grant", POLICY_GRANTS)
    if applications is not None:
        policy.applications = _application_ids(session, label, applications)
    if users is not None:
        policy.users = _user_ids(session, label, users)
    if groups is not None:
        policy.groups = _group_ids(session, label, groups)
    if conditions is not None:
        policy.conditions = _conditions(session, label, conditions)
    session.flush()
    if _policy_state(session, policy) == before:
        return policy
    policy.updated_at = utcnow()
    session.flush()
    _record(session, actor, "access_policy.update", "access_policy", policy.id, before,
            _policy_state(session, policy), config=True)
    return policy


@_change
def delete_policy(session: Session, actor: str, name: str) -> None:
    _lock_config(session)
    policy = get_policy(session, name)
    before = _policy_state(session, policy)
    session.delete(policy)
    session.flush()
    _record(session, actor, "access_policy.delete", "access_policy", before["id"], before, None, config=True)

