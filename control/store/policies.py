"""Conditional-access policies (``AccessPolicy``): which applications and users a policy targets,
under which conditions, and what it demands (block, MFA, a compliant device).

Targets (application names, user ids/UPNs, group ids/names) are resolved and stored as ids;
conditions are ``CONDITION_KEYS``. Every one is checked: unknown keys, unknown names and bad
values are refused naming the culprit. ``policy_views`` gives policies with names/UPNs next
to the ids (a target deleted since shows as None), for the API and audit records. Every
change is configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .applications import application_names_of
from .audit import change, record_change
from .config_version import lock_config
from .errors import StoreError
from .models import POLICY_GRANTS, POLICY_STATES, AccessPolicy, Application, NamedLocation, User, UserGroup, utcnow
from .user_groups import find_group, group_names_of
from .users import find_user, upns_of
from .values import refuse_taken, valid_name

MAX_POLICIES = 200
MAX_POLICY_TARGETS = 1000  # per list: applications, users, groups
MAX_POLICY_LOCATIONS = 100
MAX_DEVICE_OS = 20
MAX_DEVICE_OS_LENGTH = 64  # as ``Device.os``
MAX_SIGNIN_AGE = 365 * 86400  # seconds
RISK_LEVELS = ("low", "medium", "high")
CONDITION_KEYS = ("locations", "device_os", "user_risk_at_least", "signin_older_than")


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
    apps = application_names_of(session, (i for p in policies for i in p.applications))
    upns = upns_of(session, (i for p in policies for i in p.users))
    groups = group_names_of(session, (i for p in policies for i in p.groups))
    return [PolicyView(id=p.id, name=p.name, state=p.state, grant=p.grant_control,
                       applications=[(i, apps.get(i)) for i in p.applications],
                       users=[(i, upns.get(i)) for i in p.users], groups=[(i, groups.get(i)) for i in p.groups],
                       conditions=dict(p.conditions or {}), created_at=p.created_at, updated_at=p.updated_at)
            for p in policies]


def policy_state(session: Session, policy: AccessPolicy) -> dict[str, Any]:
    return policy_views(session, [policy])[0].as_dict()


def list_policies(session: Session) -> list[AccessPolicy]:
    """Every policy, by name."""
    return list(session.scalars(select(AccessPolicy).order_by(AccessPolicy.name)))


def policies_using_location(session: Session, name: str) -> list[AccessPolicy]:
    """The policies whose ``locations`` condition names location ``name``."""
    return [p for p in list_policies(session) if name in (p.conditions or {}).get("locations", [])]


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
        name = valid_name(entry, f"policy {policy!r}: application name")
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
            name = valid_name(entry, f"policy {policy!r}: location name")
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


@change
def create_policy(session: Session, actor: str, name: str, *, grant: str, state: str = "on",
                  applications: Sequence[str] = (), users: Sequence[str] = (), groups: Sequence[str] = (),
                  conditions: Mapping[str, Any] | None = None) -> AccessPolicy:
    """A conditional-access policy (at most ``MAX_POLICIES``).

    ``applications`` are names (empty: every application); ``users`` are ids or UPNs and
    ``groups`` ids or names (both empty: every user); all are stored as ids. ``conditions``
    may set ``locations`` (named-location names), ``device_os`` (list of OS names),
    ``user_risk_at_least`` (low, medium, high) and ``signin_older_than`` (seconds).
    """
    lock_config(session)
    name = valid_name(name, "policy name")
    refuse_taken(session, AccessPolicy.name, name, "policy")
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
    record_change(session, actor, "access_policy.create", "access_policy", policy.id, None,
                  policy_state(session, policy), config=True)
    return policy


@change
def update_policy(session: Session, actor: str, name: str, *, new_name: str | None = None, state: str | None = None,
                  grant: str | None = None, applications: Sequence[str] | None = None,
                  users: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                  conditions: Mapping[str, Any] | None = None) -> AccessPolicy:
    """Change a policy: each argument given (not None) replaces that part; ``conditions``
    replaces every condition. Checked as in ``create_policy``; a change that changes
    nothing is not recorded."""
    lock_config(session)
    policy = get_policy(session, name)
    before = policy_state(session, policy)
    if new_name is not None:
        new_name = valid_name(new_name, "policy name")
        if new_name != policy.name:
            refuse_taken(session, AccessPolicy.name, new_name, "policy")
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
    if policy_state(session, policy) == before:
        return policy
    policy.updated_at = utcnow()
    session.flush()
    record_change(session, actor, "access_policy.update", "access_policy", policy.id, before,
                  policy_state(session, policy), config=True)
    return policy


@change
def delete_policy(session: Session, actor: str, name: str) -> None:
    lock_config(session)
    policy = get_policy(session, name)
    before = policy_state(session, policy)
    session.delete(policy)
    session.flush()
    record_change(session, actor, "access_policy.delete", "access_policy", before["id"], before, None, config=True)
