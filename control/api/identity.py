"""The identity admin routes under ``/v1`` (admin key required: ``guards.require_admin``): users,
user groups, devices and sign-in sessions. Thin shells around ``control.store.users``,
``user_groups``, ``devices``, ``sessions`` and ``totp`` (one transaction, the store call that
validates, audits with the admin key's name as actor and bumps the configuration version,
conversion to ``identity_schemas``).

A user is named by id or UPN, a user group by id or name, in paths and bodies.

- users: ``GET/POST /v1/users``, ``GET/PATCH/DELETE /v1/users/{user}``,
  ``POST /v1/users/{user}/totp/reset``, ``GET /v1/users/{user}/sessions``;
- user groups: ``GET/POST /v1/user-groups``, ``PATCH/DELETE /v1/user-groups/{group}``,
  ``GET/POST /v1/user-groups/{group}/members``, ``DELETE /v1/user-groups/{group}/members/{user}``;
- devices: ``GET /v1/devices?user=``, ``GET/PATCH /v1/devices/{id}`` (compliance and OS: also
  what an MDM calls), ``POST /v1/devices/{id}/revoke``;
- sessions: ``GET /v1/sessions/{id}``, ``POST /v1/sessions/{id}/revoke``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from litestar import Router, delete, get, patch, post
from litestar.params import Parameter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from control.store import StoreError, console, devices, sessions, totp, user_groups, users
from control.store.models import Device, GroupMember, SignInSession, User, UserGroup, utcnow

from .guards import Api, admin_routes
from .identity_schemas import (
    DeviceOut,
    DeviceUpdate,
    MemberAdd,
    MemberOut,
    RevokeRequest,
    SessionOut,
    UserCreate,
    UserGroupCreate,
    UserGroupOut,
    UserGroupUpdate,
    UserOut,
    UserUpdate,
)

# ---------------------------------------------------------------------------- conversions


def _user_out(session: Session, user: User, groups: list[str] | None = None) -> UserOut:
    return UserOut(id=user.id, upn=user.upn, display_name=user.display_name, disabled=user.disabled,
                   risk_level=user.risk_level, has_password=user.password_hash is not None,
                   totp_enabled=user.totp_enabled,
                   groups=users.user_group_ids(session, user.id) if groups is None else groups,
                   created_at=user.created_at, updated_at=user.updated_at, oidc_issuer=user.oidc_issuer,
                   oidc_subject=user.oidc_subject, console_role=user.console_role)


def _users_out(session: Session, rows: list[User]) -> list[UserOut]:
    memberships: dict[str, list[str]] = {}
    for group_id, user_id in session.execute(select(GroupMember.group_id, GroupMember.user_id)
                                             .order_by(GroupMember.group_id)):
        memberships.setdefault(user_id, []).append(group_id)
    return [_user_out(session, u, memberships.get(u.id, [])) for u in rows]


def _group_out(session: Session, group: UserGroup) -> UserGroupOut:
    members = session.scalar(select(func.count()).select_from(GroupMember).where(GroupMember.group_id == group.id))
    return UserGroupOut(id=group.id, name=group.name, members=members or 0, created_at=group.created_at)


def _device_out(device: Device, upn: str) -> DeviceOut:
    return DeviceOut(id=device.id, user_id=device.user_id, upn=upn, name=device.name, os=device.os,
                     os_version=device.os_version, compliant=device.compliant, cert_serial=device.cert_serial,
                     cert_not_after=device.cert_not_after, created_at=device.created_at, last_seen=device.last_seen,
                     revoked_at=device.revoked_at)


def _upn_of(session: Session, user_id: str) -> str:
    return session.scalar(select(User.upn).where(User.id == user_id)) or ""


def _session_out(row: SignInSession, now: datetime) -> SessionOut:
    return SessionOut(id=row.id, user_id=row.user_id, device_id=row.device_id, amr=row.amr.split(","),
                      auth_time=row.auth_time, created_at=row.created_at, expires_at=row.expires_at,
                      last_refresh_at=row.last_refresh_at, revoked_at=row.revoked_at,
                      status=sessions.session_status(row, now))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- users


@get("/users", sync_to_thread=True)
def list_users(api: Api) -> list[UserOut]:
    """Every user, by UPN."""
    with api.store.read() as session:
        return _users_out(session, users.list_users(session))


@get("/users/{user_ref:str}", sync_to_thread=True)
def get_user(api: Api, user_ref: str) -> UserOut:
    with api.store.read() as session:
        return _user_out(session, users.get_user(session, user_ref))


@post("/users", sync_to_thread=True)
def create_user(api: Api, actor: str, data: UserCreate) -> UserOut:
    """A new user (UPN stored lower-case); with ``password`` (8 to 1024 characters) it can sign in."""
    with api.store.begin() as session:
        user = users.create_user(session, actor, data.upn, display_name=data.display_name, password=data.password)
        return _user_out(session, user)


@patch("/users/{user_ref:str}", sync_to_thread=True)
def update_user(api: Api, actor: str, user_ref: str, data: UserUpdate) -> UserOut:
    """Change UPN, display name, password, disabled flag, risk level and/or the linked OIDC account
    (``oidc_subject``: the ``sub`` at the control plane's OIDC provider; "" unlinks)."""
    if data.oidc_subject is not None and data.oidc_subject.strip() and api.oidc is None:
        raise StoreError("invalid", "OIDC sign-in is not configured on this control plane (FERRYMAN_OIDC_ISSUER): "
                                    "there is no provider to link an account of")
    with api.store.begin() as session:
        user = users.update_user(session, actor, user_ref, upn=data.upn, display_name=data.display_name,
                                 disabled=data.disabled, risk_level=data.risk_level)
        if data.password is not None:
            user = users.set_password(session, actor, user.id, data.password)
        if data.oidc_subject is not None:
            subject = data.oidc_subject.strip() or None
            issuer = api.oidc.config.issuer if api.oidc is not None else ""
            user = users.link_oidc(session, actor, user.id, issuer, subject)
        if data.console_role is not None:
            user = console.set_console_role(session, actor, user.id, data.console_role)
        return _user_out(session, user)


@delete("/users/{user_ref:str}", sync_to_thread=True)
def delete_user(api: Api, actor: str, user_ref: str) -> None:
    """Delete a user, its devices (certificates revoked), sessions and memberships."""
    with api.store.begin() as session:
        users.delete_user(session, actor, user_ref)


@post("/users/{user_ref:str}/totp/reset", sync_to_thread=True, status_code=200)
def reset_totp(api: Api, actor: str, user_ref: str) -> UserOut:
    """Remove the user's TOTP second factor and recovery codes (e.g. a lost phone); they may enrol again."""
    with api.store.begin() as session:
        return _user_out(session, totp.reset_totp(session, actor, user_ref))


@get("/users/{user_ref:str}/sessions", sync_to_thread=True)
def list_user_sessions(api: Api, user_ref: str) -> list[SessionOut]:
    """The user's sign-in sessions, newest first."""
    now = utcnow()
    with api.store.read() as session:
        return [_session_out(row, now) for row in sessions.list_sessions(session, user_ref)]


# ---------------------------------------------------------------------------- user groups


@get("/user-groups", sync_to_thread=True)
def list_user_groups(api: Api) -> list[UserGroupOut]:
    with api.store.read() as session:
        return [_group_out(session, g) for g in user_groups.list_user_groups(session)]


@post("/user-groups", sync_to_thread=True)
def create_user_group(api: Api, actor: str, data: UserGroupCreate) -> UserGroupOut:
    with api.store.begin() as session:
        return _group_out(session, user_groups.create_user_group(session, actor, data.name))


@patch("/user-groups/{group_ref:str}", sync_to_thread=True)
def rename_user_group(api: Api, actor: str, group_ref: str, data: UserGroupUpdate) -> UserGroupOut:
    with api.store.begin() as session:
        return _group_out(session, user_groups.rename_user_group(session, actor, group_ref, data.name))


@delete("/user-groups/{group_ref:str}", sync_to_thread=True)
def delete_user_group(api: Api, actor: str, group_ref: str) -> None:
    """Delete a user group with its memberships and application assignments."""
    with api.store.begin() as session:
        user_groups.delete_user_group(session, actor, group_ref)


@get("/user-groups/{group_ref:str}/members", sync_to_thread=True)
def list_members(api: Api, group_ref: str) -> list[UserOut]:
    with api.store.read() as session:
        return _users_out(session, user_groups.group_members(session, group_ref))


@post("/user-groups/{group_ref:str}/members", sync_to_thread=True)
def add_member(api: Api, actor: str, group_ref: str, data: MemberAdd) -> MemberOut:
    """Add a user (id or UPN) to the group."""
    with api.store.begin() as session:
        member = user_groups.add_group_member(session, actor, group_ref, data.user)
        group = user_groups.get_user_group(session, member.group_id)
        return MemberOut(group_id=group.id, group=group.name, user_id=member.user_id,
                         upn=_upn_of(session, member.user_id))


@delete("/user-groups/{group_ref:str}/members/{user_ref:str}", sync_to_thread=True)
def remove_member(api: Api, actor: str, group_ref: str, user_ref: str) -> None:
    with api.store.begin() as session:
        user_groups.remove_group_member(session, actor, group_ref, user_ref)


# ---------------------------------------------------------------------------- devices


@get("/devices", sync_to_thread=True)
def list_devices(
    api: Api,
    # Not named ``user`` in Python, to keep it apart from the path parameters named ``user_ref``.
    filter_user: Annotated[str | None, Parameter(query="user", description="only this user's (id or UPN)")] = None,
) -> list[DeviceOut]:
    """Every device, oldest first (or only one user's)."""
    with api.store.read() as session:
        if filter_user is not None:
            user = users.get_user(session, filter_user)
            return [_device_out(d, user.upn) for d in devices.list_devices(session, user.id)]
        upns = dict(session.execute(select(User.id, User.upn)).tuples().all())
        return [_device_out(d, upns.get(d.user_id, "")) for d in devices.list_devices(session)]


@get("/devices/{device_id:str}", sync_to_thread=True)
def get_device(api: Api, device_id: str) -> DeviceOut:
    with api.store.read() as session:
        device = devices.get_device(session, device_id)
        return _device_out(device, _upn_of(session, device.user_id))


@patch("/devices/{device_id:str}", sync_to_thread=True)
def update_device(api: Api, actor: str, device_id: str, data: DeviceUpdate) -> DeviceOut:
    """Set compliance, OS, OS version and/or name (an admin, or an MDM with an admin key)."""
    with api.store.begin() as session:
        device = devices.update_device(session, actor, device_id, compliant=data.compliant, os=data.os,
                                       os_version=data.os_version, name=data.name)
        return _device_out(device, _upn_of(session, device.user_id))


@post("/devices/{device_id:str}/revoke", sync_to_thread=True, status_code=200)
def revoke_device(api: Api, actor: str, device_id: str, data: RevokeRequest | None = None) -> DeviceOut:
    """Revoke a device: its certificate and live sessions; edges refuse it within seconds."""
    with api.store.begin() as session:
        device = devices.revoke_device(session, actor, device_id, data.reason if data is not None else "")
        return _device_out(device, _upn_of(session, device.user_id))


# ---------------------------------------------------------------------------- sessions


@get("/sessions/{session_id:str}", sync_to_thread=True)
def get_session(api: Api, session_id: str) -> SessionOut:
    with api.store.read() as session:
        return _session_out(sessions.get_session(session, session_id), utcnow())


@post("/sessions/{session_id:str}/revoke", sync_to_thread=True, status_code=200)
def revoke_session(api: Api, actor: str, session_id: str, data: RevokeRequest | None = None) -> SessionOut:
    """End a session: its refresh token stops working and edges refuse its access tokens (a new
    configuration version only while one of them may still be valid)."""
    with api.store.begin() as session:
        row = sessions.revoke_session(session, actor, session_id, data.reason if data is not None else "",
                                      token_lifetime=timedelta(seconds=api.token_signer.lifetime))
        return _session_out(row, utcnow())


IDENTITY_HANDLERS = [
    list_users, get_user, create_user, update_user, delete_user, reset_totp, list_user_sessions,
    list_user_groups, create_user_group, rename_user_group, delete_user_group, list_members, add_member,
    remove_member, list_devices, get_device, update_device, revoke_device, get_session, revoke_session,
]


def identity_router() -> Router:
    """The identity admin routes under ``/v1``, each guarded by an admin key; ``actor`` is that key's name."""
    return admin_routes(IDENTITY_HANDLERS, tags=["identity"])
