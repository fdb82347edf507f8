"""Identity in the store: users, user groups, devices, sign-in sessions and the TOTP second factor.

Same conventions as ``repo``: every function takes the caller's ``Session`` and never
commits; a change takes an ``actor`` and writes an audit record (secrets never appear in
it: no password hash, TOTP secret, refresh-token or recovery-code hash); a refused change
raises ``StoreError`` with a precise message and leaves nothing behind (savepoint).

What edges decide flows from (``snapshot_users``, ``snapshot_devices``,
``revoked_session_ids``) changes the configuration version: creating, renaming (UPN),
disabling, enabling, re-rating or deleting a user; creating, renaming or deleting a user
group and every membership change; registering a device, changing its compliance or OS,
revoking it; revoking a session. Signing in and refreshing do not (they are not
configuration); a sign-in writes one ``session.create`` audit record, actor ``user:<id>``.

Secrets:

- passwords: argon2id (``PASSWORD_HASHER``: 19 MiB, 2 passes, 1 lane, the OWASP minimum;
  about 50 ms per check), ``MIN_PASSWORD_LENGTH`` to ``MAX_PASSWORD_LENGTH`` characters.
  ``check_password`` spends the same argon2 work on an unknown user (a dummy hash) and gives
  one message for an unknown user and a wrong password; "account is disabled" is only said
  once the password was right.
- refresh tokens: ``fmrt_<session id>.<32 random bytes, urlsafe base64>``, stored as their
  SHA-256 (a 256-bit random secret needs no slow hash). Each refresh hands out a new one;
  the session id in the token finds the session when an *old* token comes back, which is
  taken as theft (refresh-token reuse detection, RFC 9700 §4.14.2): the session is revoked.
  Knowing a session id alone does not let anyone refresh, but does let them end that session
  this way; session ids are only in access tokens and admin views.
- TOTP (RFC 6238, 6 digits, 30 s, one step of clock drift either way): a base32 secret per
  user, stored as such (the control plane must compute codes); recovery codes: 10 of
  12 hex digits, shown once, stored as SHA-256, each usable once. This module checks codes;
  refusing a TOTP code already used (replay within its 90 s) is up to the caller, which
  gets the code's time step back (``verify_second_factor``, ``confirm_totp``).

Limits: ``MAX_DEVICES_PER_USER`` live devices, ``MAX_GROUPS_PER_USER`` group memberships,
``MAX_SESSIONS_PER_USER`` live sessions (a new sign-in beyond it revokes the oldest).
"""

from __future__ import annotations

import functools
import hmac
import re
import secrets
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .errors import StoreError
from .models import (
    USER_RISK_LEVELS,
    ConfigVersion,
    Device,
    GroupMember,
    RecoveryCode,
    SignInSession,
    User,
    UserGroup,
    utcnow,
)
from .repo import _change, _lock_config, _name, _now, _record, hash_secret, is_revoked, revoke_certificate

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
MAX_UPN_LENGTH = 255  # users.upn
MAX_DISPLAY_NAME = 200  # users.display_name, devices.name, user_groups.name
MAX_OS_FIELD = 64  # devices.os, devices.os_version
MAX_REASON = 200
MAX_DEVICES_PER_USER = 50  # devices not revoked
MAX_GROUPS_PER_USER = 100  # they all go into every access token, which must fit a HELLO (8192 characters)
MAX_SESSIONS_PER_USER = 100  # sessions neither revoked nor expired
DEFAULT_SESSION_LIFETIME = timedelta(days=30)
MAX_SESSION_LIFETIME = timedelta(days=365)
REFRESH_TOKEN_PREFIX = "fmrt_"
TOTP_ISSUER = "Ferryman"
TOTP_DIGITS = 6
TOTP_PERIOD = 30  # seconds
TOTP_VALID_WINDOW = 1  # time steps accepted either side of the current one (clock drift)
RECOVERY_CODE_COUNT = 10
AUTH_FAILED = "user name or password is wrong"
ACCOUNT_DISABLED = "account is disabled"
AMR_VALUES = (("pwd",), ("pwd", "mfa"))
# argon2id with the OWASP Password Storage Cheat Sheet's minimum: m=19 MiB, t=2, p=1.
PASSWORD_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16,
                                 type=Type.ID)
REUSE_ACTOR = "control-plane:refresh-token-reuse"

_UPN_RE = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@(?=.{1,253}$)"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_REFRESH_RE = re.compile(re.escape(REFRESH_TOKEN_PREFIX) + r"(?P<sid>" + _UUID_RE.pattern + r")\.[A-Za-z0-9_-]{43}")
_RECOVERY_RE = re.compile(r"[0-9a-f]{12}")


# ---------------------------------------------------------------------------- validation, audit states


def normalize_upn(value: object) -> str:
    """``value`` as stored: stripped, lower-case, ``name@domain``; refused (``invalid``) otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise StoreError("invalid", "user principal name (UPN) must be a non-empty string such as alice@corp.example")
    upn = value.strip().lower()
    if len(upn) > MAX_UPN_LENGTH:
        raise StoreError("invalid", f"user principal name {upn[:20]!r}... is longer than {MAX_UPN_LENGTH} characters")
    if not _UPN_RE.fullmatch(upn):
        raise StoreError("invalid", f"user principal name {upn!r} is not of the form name@domain (ASCII letters, "
                                    f"digits and .-_+' in the name, a DNS domain after the @)")
    return upn


def _text(value: object, what: str, limit: int) -> str:
    """``value`` stripped; may be empty; refused unless a string of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise StoreError("invalid", f"{what} must be a string")
    text = value.strip()
    if len(text) > limit:
        raise StoreError("invalid", f"{what} {text[:20]!r}... is longer than {limit} characters")
    return text


def _risk(value: object) -> str:
    if value not in USER_RISK_LEVELS:
        raise StoreError("invalid", f"risk level {value!r} is not one of {', '.join(USER_RISK_LEVELS)}")
    return str(value)


def _check_password(password: object) -> str:
    if not isinstance(password, str):
        raise StoreError("invalid", "password must be a string")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise StoreError("invalid", f"password must be at least {MIN_PASSWORD_LENGTH} characters long")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise StoreError("invalid", f"password is longer than {MAX_PASSWORD_LENGTH} characters")
    return password


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _user_state(user: User) -> dict[str, Any]:
    return {"id": user.id, "upn": user.upn, "display_name": user.display_name, "disabled": user.disabled,
            "risk_level": user.risk_level, "has_password": user.password_hash is not None,
            "totp_enabled": user.totp_enabled, "totp_pending": user.totp_secret is not None and not user.totp_enabled}


def _group_state(group: UserGroup) -> dict[str, Any]:
    return {"id": group.id, "name": group.name, "created_at": _iso(group.created_at)}


def _device_state(device: Device) -> dict[str, Any]:
    return {"id": device.id, "user_id": device.user_id, "name": device.name, "os": device.os,
            "os_version": device.os_version, "compliant": device.compliant, "cert_serial": device.cert_serial,
            "cert_not_after": _iso(device.cert_not_after), "revoked_at": _iso(device.revoked_at)}


def _session_state(row: SignInSession) -> dict[str, Any]:
    return {"id": row.id, "user_id": row.user_id, "device_id": row.device_id, "amr": row.amr,
            "auth_time": _iso(row.auth_time), "expires_at": _iso(row.expires_at),
            "revoked_at": _iso(row.revoked_at)}


# ---------------------------------------------------------------------------- users


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.upn)))


def get_user(session: Session, ref: str) -> User:
    """The user with id ``ref``, or with UPN ``ref`` (any case) when it contains an ``@``."""
    user = None
    if isinstance(ref, str) and ref.strip():
        key = ref.strip()
        if "@" in key:
            user = session.scalar(select(User).where(User.upn == key.lower()))
        else:
            user = session.get(User, key)
    if user is None:
        raise StoreError("not_found", f"user {ref!r} does not exist")
    return user


@_change
def create_user(session: Session, actor: str, upn: str, *, display_name: str = "",
                password: str | None = None) -> User:
    """A new user (id: a new UUID); without ``password`` it cannot sign in with one until it gets one."""
    key = normalize_upn(upn)
    display = _text(display_name, "display name", MAX_DISPLAY_NAME)
    password_hash = None if password is None else PASSWORD_HASHER.hash(_check_password(password))
    _lock_config(session)
    if session.scalar(select(User.id).where(User.upn == key)) is not None:
        raise StoreError("conflict", f"user {key!r} already exists")
    now = utcnow()
    user = User(id=str(uuid.uuid4()), upn=key, display_name=display, password_hash=password_hash, disabled=False,
                risk_level="none", totp_secret=None, totp_enabled=False, created_at=now, updated_at=now)
    session.add(user)
    session.flush()
    _record(session, actor, "user.create", "user", user.id, None, _user_state(user), config=True)
    return user


@_change
def update_user(session: Session, actor: str, ref: str, *, upn: str | None = None, display_name: str | None = None,
                disabled: bool | None = None, risk_level: str | None = None) -> User:
    """Change a user's UPN, display name, disabled flag and/or risk level (None: unchanged).

    A change that changes nothing is not recorded; one that edges need (UPN, disabled, risk
    level) bumps the configuration version.
    """
    _lock_config(session)
    user = get_user(session, ref)
    before = _user_state(user)
    if upn is not None:
        key = normalize_upn(upn)
        if key != user.upn:
            if session.scalar(select(User.id).where(User.upn == key)) is not None:
                raise StoreError("conflict", f"user {key!r} already exists")
            user.upn = key
    if display_name is not None:
        user.display_name = _text(display_name, "display name", MAX_DISPLAY_NAME)
    if disabled is not None:
        if not isinstance(disabled, bool):
            raise StoreError("invalid", f"disabled must be true or false, not {disabled!r}")
        user.disabled = disabled
    if risk_level is not None:
        user.risk_level = _risk(risk_level)
    after = _user_state(user)
    if after == before:
        return user
    user.updated_at = utcnow()
    session.flush()
    config = any(before[field] != after[field] for field in ("upn", "disabled", "risk_level"))
    _record(session, actor, "user.update", "user", user.id, before, after, config=config)
    return user


def disable_user(session: Session, actor: str, ref: str) -> User:
    """Disable sign-in, refresh and (at the edges) every flow of the user."""
    return update_user(session, actor, ref, disabled=True)


def enable_user(session: Session, actor: str, ref: str) -> User:
    return update_user(session, actor, ref, disabled=False)


def set_risk_level(session: Session, actor: str, ref: str, risk_level: str) -> User:
    """``none``, ``low``, ``medium`` or ``high``: conditional-access policies may act on it."""
    return update_user(session, actor, ref, risk_level=risk_level)


@_change
def set_password(session: Session, actor: str, ref: str, password: str | None) -> User:
    """Set (argon2id) or, with None, remove the user's password. Not configuration; audited without the hash."""
    password_hash = None if password is None else PASSWORD_HASHER.hash(_check_password(password))
    user = get_user(session, ref)
    had = user.password_hash is not None
    user.password_hash = password_hash
    user.updated_at = utcnow()
    session.flush()
    _record(session, actor, "user.set_password" if password is not None else "user.remove_password", "user",
            user.id, {"upn": user.upn, "has_password": had}, {"upn": user.upn, "has_password": password is not None},
            config=False)
    return user


@_change
def delete_user(session: Session, actor: str, ref: str) -> None:
    """Delete a user with its devices (their certificates revoked first), sessions, memberships
    and recovery codes (the database cascades)."""
    _lock_config(session)
    user = get_user(session, ref)
    before = {**_user_state(user), "groups": user_group_ids(session, user.id)}
    for device in session.scalars(select(Device).where(Device.user_id == user.id).order_by(Device.id)):
        if device.cert_serial and not is_revoked(session, int(device.cert_serial, 16)):
            revoke_certificate(session, actor, int(device.cert_serial, 16), f"user {user.upn} deleted")
    session.delete(user)
    session.flush()
    session.expire_all()  # devices, sessions and memberships went with it (ON DELETE CASCADE)
    _record(session, actor, "user.delete", "user", before["id"], before, None, config=True)


# ---------------------------------------------------------------------------- passwords at sign-in


@functools.cache
def _dummy_hash() -> str:
    """A hash no password matches, verified for unknown users so they cost the same argon2 work."""
    return PASSWORD_HASHER.hash(secrets.token_urlsafe(32))


def _verify_hash(password_hash: str, password: str) -> bool:
    try:
        return PASSWORD_HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def check_password(session: Session, upn: str, password: str) -> User:
    """The user named ``upn`` once ``password`` is theirs (a read: nothing is written).

    Refused with ``auth_failed`` ("user name or password is wrong") for an unknown user, a
    user without a password and a wrong password alike, each after one argon2
    verification; with ``account_disabled`` for a disabled user whose password was right.
    """
    try:
        key: str | None = normalize_upn(upn)
    except StoreError:
        key = None
    user = session.scalar(select(User).where(User.upn == key)) if key is not None else None
    usable = (isinstance(password, str) and len(password) <= MAX_PASSWORD_LENGTH)
    stored = user.password_hash if user is not None and user.password_hash else _dummy_hash()
    matched = _verify_hash(stored, password if usable else "")
    if user is None or user.password_hash is None or not usable or not matched:
        raise StoreError("auth_failed", AUTH_FAILED)
    if user.disabled:
        raise StoreError("account_disabled", ACCOUNT_DISABLED)
    return user


# ---------------------------------------------------------------------------- user groups


def list_user_groups(session: Session) -> list[UserGroup]:
    return list(session.scalars(select(UserGroup).order_by(UserGroup.name)))


def get_user_group(session: Session, ref: str) -> UserGroup:
    """The user group with id ``ref``, else the one named ``ref``."""
    group = None
    if isinstance(ref, str) and ref.strip():
        group = session.get(UserGroup, ref.strip()) or session.scalar(
            select(UserGroup).where(UserGroup.name == ref.strip()))
    if group is None:
        raise StoreError("not_found", f"user group {ref!r} does not exist")
    return group


def _group_name_free(session: Session, name: str) -> None:
    if session.scalar(select(UserGroup.id).where(UserGroup.name == name)) is not None:
        raise StoreError("conflict", f"user group {name!r} already exists")
    if _UUID_RE.fullmatch(name) and session.get(UserGroup, name) is not None:
        raise StoreError("conflict", f"user group name {name!r} is the id of another group")


@_change
def create_user_group(session: Session, actor: str, name: str) -> UserGroup:
    _lock_config(session)
    name = _name(name, "user group name", MAX_DISPLAY_NAME)
    _group_name_free(session, name)
    group = UserGroup(id=str(uuid.uuid4()), name=name, created_at=utcnow())
    session.add(group)
    session.flush()
    _record(session, actor, "user_group.create", "user_group", group.id, None, _group_state(group), config=True)
    return group


@_change
def rename_user_group(session: Session, actor: str, ref: str, new_name: str) -> UserGroup:
    _lock_config(session)
    group = get_user_group(session, ref)
    new_name = _name(new_name, "user group name", MAX_DISPLAY_NAME)
    if new_name == group.name:
        return group
    _group_name_free(session, new_name)
    before = _group_state(group)
    group.name = new_name
    session.flush()
    _record(session, actor, "user_group.update", "user_group", group.id, before, _group_state(group), config=True)
    return group


@_change
def delete_user_group(session: Session, actor: str, ref: str) -> None:
    """Delete a group; its memberships and application assignments go with it (cascade)."""
    _lock_config(session)
    group = get_user_group(session, ref)
    before = {**_group_state(group), "members": [u.id for u in group_members(session, group.id)]}
    session.delete(group)
    session.flush()
    session.expire_all()
    _record(session, actor, "user_group.delete", "user_group", before["id"], before, None, config=True)


def group_members(session: Session, ref: str) -> list[User]:
    """The members of a group, by UPN."""
    group = get_user_group(session, ref)
    return list(session.scalars(select(User).join(GroupMember, GroupMember.user_id == User.id)
                                .where(GroupMember.group_id == group.id).order_by(User.upn)))


def user_group_ids(session: Session, user_id: str) -> list[str]:
    """The ids of the groups ``user_id`` is a member of, sorted."""
    return sorted(session.scalars(select(GroupMember.group_id).where(GroupMember.user_id == user_id)))


@_change
def add_group_member(session: Session, actor: str, group_ref: str, user_ref: str) -> GroupMember:
    _lock_config(session)
    group = get_user_group(session, group_ref)
    user = get_user(session, user_ref)
    if session.get(GroupMember, (group.id, user.id)) is not None:
        raise StoreError("conflict", f"user {user.upn!r} is already a member of group {group.name!r}")
    count = session.scalar(select(func.count()).select_from(GroupMember).where(GroupMember.user_id == user.id))
    if count is not None and count >= MAX_GROUPS_PER_USER:
        raise StoreError("conflict", f"user {user.upn!r} is already in {count} groups, the most a user may be in "
                                     f"({MAX_GROUPS_PER_USER}, every one goes into each access token)")
    member = GroupMember(group_id=group.id, user_id=user.id)
    session.add(member)
    session.flush()
    _record(session, actor, "user_group.add_member", "user_group", group.id, None,
            {"group": group.name, "user_id": user.id, "upn": user.upn}, config=True)
    return member


@_change
def remove_group_member(session: Session, actor: str, group_ref: str, user_ref: str) -> None:
    _lock_config(session)
    group = get_user_group(session, group_ref)
    user = get_user(session, user_ref)
    member = session.get(GroupMember, (group.id, user.id))
    if member is None:
        raise StoreError("not_found", f"user {user.upn!r} is not a member of group {group.name!r}")
    session.delete(member)
    session.flush()
    _record(session, actor, "user_group.remove_member", "user_group", group.id,
            {"group": group.name, "user_id": user.id, "upn": user.upn}, None, config=True)


# ---------------------------------------------------------------------------- devices


def list_devices(session: Session, user_id: str | None = None) -> list[Device]:
    """Every device (or ``user_id``'s), oldest first."""
    query = select(Device).order_by(Device.created_at, Device.id)
    if user_id is not None:
        query = query.where(Device.user_id == user_id)
    return list(session.scalars(query))


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id) if isinstance(device_id, str) and device_id else None
    if device is None:
        raise StoreError("not_found", f"device {device_id!r} does not exist")
    return device


@_change
def register_device(session: Session, actor: str, user_id: str, *, name: str = "", os: str = "",
                    os_version: str = "") -> Device:
    """A new device of ``user_id`` (id: a new UUID, the CN of the client certificate it gets; not compliant
    until an admin or an MDM says so)."""
    _lock_config(session)
    user = get_user(session, user_id)
    name = _text(name, "device name", MAX_DISPLAY_NAME)
    os = _text(os, "device os", MAX_OS_FIELD)
    os_version = _text(os_version, "device os_version", MAX_OS_FIELD)
    live = session.scalar(select(func.count()).select_from(Device)
                          .where(Device.user_id == user.id, Device.revoked_at.is_(None)))
    if live is not None and live >= MAX_DEVICES_PER_USER:
        raise StoreError("conflict", f"user {user.upn!r} already has {live} devices, the most allowed "
                                     f"({MAX_DEVICES_PER_USER}): revoke one first")
    device = Device(id=str(uuid.uuid4()), user_id=user.id, name=name, os=os, os_version=os_version, compliant=False,
                    created_at=utcnow())
    session.add(device)
    session.flush()
    _record(session, actor, "device.create", "device", device.id, None, _device_state(device), config=True)
    return device


@_change
def record_device_certificate(session: Session, actor: str, device_id: str, serial: int,
                              not_after: datetime) -> Device:
    """The device got a client certificate (CN = its id): it becomes the device's current one."""
    device = get_device(session, device_id)
    if device.revoked_at is not None:
        raise StoreError("conflict", f"device {device.id} is revoked: it gets no new certificate")
    if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
        raise StoreError("invalid", f"certificate serial {serial!r} must be a positive integer")
    before = _device_state(device)
    device.cert_serial, device.cert_not_after = format(serial, "x"), not_after
    session.flush()
    _record(session, actor, "device.certificate", "device", device.id, before, _device_state(device), config=False)
    return device


@_change
def update_device(session: Session, actor: str, device_id: str, *, compliant: bool | None = None,
                  os: str | None = None, os_version: str | None = None, name: str | None = None) -> Device:
    """What an admin or an MDM says about a device (None: unchanged); a change of compliance or OS
    bumps the configuration version, a change that changes nothing is not recorded."""
    _lock_config(session)
    device = get_device(session, device_id)
    before = _device_state(device)
    if compliant is not None:
        if not isinstance(compliant, bool):
            raise StoreError("invalid", f"compliant must be true or false, not {compliant!r}")
        device.compliant = compliant
    if os is not None:
        device.os = _text(os, "device os", MAX_OS_FIELD)
    if os_version is not None:
        device.os_version = _text(os_version, "device os_version", MAX_OS_FIELD)
    if name is not None:
        device.name = _text(name, "device name", MAX_DISPLAY_NAME)
    after = _device_state(device)
    if after == before:
        return device
    session.flush()
    config = any(before[field] != after[field] for field in ("compliant", "os", "os_version"))
    _record(session, actor, "device.update", "device", device.id, before, after, config=config)
    return device


def set_device_compliant(session: Session, actor: str, device_id: str, compliant: bool) -> Device:
    return update_device(session, actor, device_id, compliant=compliant)


@_change
def revoke_device(session: Session, actor: str, device_id: str, reason: str = "",
                  now: datetime | None = None) -> Device:
    """Revoke a device: its current certificate (into ``revocations``) and its live sessions;
    edges refuse it once they hold the new configuration version."""
    _lock_config(session)
    now = _now(now)
    device = get_device(session, device_id)
    if device.revoked_at is not None:
        raise StoreError("conflict", f"device {device.id} was already revoked at "
                                     f"{device.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    reason = _text(reason, "revocation reason", MAX_REASON) or f"device {device.id} revoked"
    before = _device_state(device)
    if device.cert_serial and not is_revoked(session, int(device.cert_serial, 16)):
        revoke_certificate(session, actor, int(device.cert_serial, 16), reason)
    ended = []
    for row in session.scalars(select(SignInSession).where(SignInSession.device_id == device.id,
                                                           SignInSession.revoked_at.is_(None),
                                                           SignInSession.expires_at > now)
                               .order_by(SignInSession.id)):
        row.revoked_at = now
        ended.append(row.id)
    device.revoked_at = now
    session.flush()
    _record(session, actor, "device.revoke", "device", device.id, before,
            {**_device_state(device), "reason": reason, "sessions_revoked": ended}, config=True)
    return device


def _touch_device(session: Session, device_id: str | None, now: datetime) -> None:
    if device_id is not None:
        device = session.get(Device, device_id)
        if device is not None:
            device.last_seen = now


# ---------------------------------------------------------------------------- sessions


def session_status(row: SignInSession, now: datetime | None = None) -> str:
    """``revoked``, ``expired`` or ``active``."""
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if _now(now) >= row.expires_at else "active"


def list_sessions(session: Session, user_id: str) -> list[SignInSession]:
    """The sessions of ``user_id``, newest first."""
    user = get_user(session, user_id)
    return list(session.scalars(select(SignInSession).where(SignInSession.user_id == user.id)
                                .order_by(SignInSession.created_at.desc(), SignInSession.id)))


def get_session(session: Session, session_id: str) -> SignInSession:
    row = session.get(SignInSession, session_id) if isinstance(session_id, str) and session_id else None
    if row is None:
        raise StoreError("not_found", f"session {session_id!r} does not exist")
    return row


def _new_refresh_token(session_id: str) -> str:
    return f"{REFRESH_TOKEN_PREFIX}{session_id}.{secrets.token_urlsafe(32)}"


@_change
def create_session(session: Session, user_id: str, *, device_id: str | None = None,
                   amr: Sequence[str] = ("pwd",), now: datetime | None = None,
                   lifetime: timedelta = DEFAULT_SESSION_LIFETIME) -> tuple[SignInSession, str]:
    """A sign-in's session and its first refresh token (plain text: hand it out, only its hash is kept).

    ``amr`` is what the sign-in proved (``("pwd",)`` or ``("pwd", "mfa")``); ``device_id``
    binds the session to a device of the user (not revoked). Beyond
    ``MAX_SESSIONS_PER_USER`` live sessions the oldest is revoked; the user's expired
    sessions are deleted. Audited as ``session.create`` by ``user:<id>``; not configuration.
    """
    now = _now(now)
    amr = tuple(amr)
    if amr not in AMR_VALUES:
        raise StoreError("invalid", f"amr {list(amr)!r} is not one of {[list(a) for a in AMR_VALUES]}")
    if not timedelta(0) < lifetime <= MAX_SESSION_LIFETIME:
        raise StoreError("invalid", f"session lifetime {lifetime} must be positive and at most {MAX_SESSION_LIFETIME}")
    user = get_user(session, user_id)
    if user.disabled:
        raise StoreError("account_disabled", ACCOUNT_DISABLED)
    actor = f"user:{user.id}"
    if device_id is not None:
        device = session.get(Device, device_id)
        if device is None or device.user_id != user.id:
            raise StoreError("device_refused", f"device {device_id!r} is not a device of {user.upn}")
        if device.revoked_at is not None:
            raise StoreError("device_refused", f"device {device_id} is revoked: register the device again")
        device.last_seen = now
    session.execute(delete(SignInSession).where(SignInSession.user_id == user.id,
                                                SignInSession.expires_at <= now))
    live = list(session.scalars(select(SignInSession).where(SignInSession.user_id == user.id,
                                                            SignInSession.revoked_at.is_(None))
                                .order_by(SignInSession.created_at, SignInSession.id)))
    for oldest in live[:max(0, len(live) - MAX_SESSIONS_PER_USER + 1)]:
        revoke_session(session, actor, oldest.id, reason=f"more than {MAX_SESSIONS_PER_USER} sessions", now=now)
    row = SignInSession(id=str(uuid.uuid4()), user_id=user.id, device_id=device_id, amr=",".join(amr),
                        auth_time=now, created_at=now, expires_at=now + lifetime, refresh_hash="")
    token = _new_refresh_token(row.id)
    row.refresh_hash = hash_secret(token)
    session.add(row)
    session.flush()
    _record(session, actor, "session.create", "session", row.id, None, _session_state(row), config=False)
    return row, token


def _check_device(session: Session, row: SignInSession) -> None:
    """Refuse (``device_revoked``) a session whose device was revoked (said before "session revoked":
    revoking a device revokes its sessions too, and this is the reason)."""
    if row.device_id is not None:
        device = session.get(Device, row.device_id)
        if device is None or device.revoked_at is not None:
            raise StoreError("device_revoked", f"device {row.device_id} of this session is revoked: sign in again "
                                               f"and register the device anew")


def refresh_session(session: Session, refresh_token: str, *, now: datetime | None = None) -> tuple[SignInSession, str]:
    """Trade the session's current refresh token for a new one (the old one stops working).

    Refused with ``refresh_invalid`` (malformed, or no such session), ``device_revoked``,
    ``session_revoked``, ``session_expired`` or ``account_disabled``. A refresh token of the
    session that is no longer its current one was stolen or replayed: the session is
    revoked (audited, configuration) and ``refresh_reused`` raised. **The caller must commit
    its transaction before passing that error on**, or the revocation is rolled back with it.
    """
    now = _now(now)
    match = _REFRESH_RE.fullmatch(refresh_token) if isinstance(refresh_token, str) else None
    if match is None:
        raise StoreError("refresh_invalid", f"refresh token is malformed (expected {REFRESH_TOKEN_PREFIX}"
                                            f"<session id>.<secret>, as handed out at sign-in)")
    row = session.scalar(select(SignInSession).where(SignInSession.id == match["sid"]).with_for_update())
    if row is None:
        raise StoreError("refresh_invalid", "refresh token is not valid: its session does not exist "
                                            "(signed out long ago, or the user was deleted): sign in again")
    _check_device(session, row)
    if row.revoked_at is not None:
        raise StoreError("session_revoked", f"session {row.id} was revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} "
                                            f"UTC: sign in again")
    if not hmac.compare_digest(row.refresh_hash, hash_secret(refresh_token)):
        revoke_session(session, REUSE_ACTOR, row.id, reason="an old refresh token was used again", now=now)
        raise StoreError("refresh_reused", f"refresh token was already used: session {row.id} is revoked, since "
                                           f"its refresh token may be stolen; sign in again")
    if now >= row.expires_at:
        raise StoreError("session_expired", f"session {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC: "
                                            f"sign in again")
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        raise StoreError("account_disabled", ACCOUNT_DISABLED)
    token = _new_refresh_token(row.id)
    row.refresh_hash = hash_secret(token)
    row.last_refresh_at = now
    _touch_device(session, row.device_id, now)
    session.flush()
    return row, token


def active_session(session: Session, session_id: str, now: datetime | None = None) -> tuple[SignInSession, User]:
    """The session and its user while the session may act (for requests bearing its access token):
    refused with ``device_revoked``, ``session_revoked``, ``session_expired`` or ``account_disabled``."""
    now = _now(now)
    row = session.get(SignInSession, session_id) if isinstance(session_id, str) and session_id else None
    if row is None:
        raise StoreError("session_revoked", f"session {session_id!r} does not exist any more: sign in again")
    _check_device(session, row)
    if row.revoked_at is not None:
        raise StoreError("session_revoked", f"session {row.id} was revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} "
                                            f"UTC: sign in again")
    if now >= row.expires_at:
        raise StoreError("session_expired", f"session {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        raise StoreError("account_disabled", ACCOUNT_DISABLED)
    return row, user


@_change
def revoke_session(session: Session, actor: str, session_id: str, reason: str = "",
                   now: datetime | None = None) -> SignInSession:
    """End a session: its refresh token stops working and edges refuse its access tokens
    (configuration: ``revoked_session_ids``)."""
    _lock_config(session)
    now = _now(now)
    row = get_session(session, session_id)
    if row.revoked_at is not None:
        raise StoreError("conflict", f"session {row.id} was already revoked at "
                                     f"{row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    if now >= row.expires_at:
        raise StoreError("conflict", f"session {row.id} already expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    reason = _text(reason, "revocation reason", MAX_REASON)
    before = _session_state(row)
    row.revoked_at = now
    session.flush()
    _record(session, actor, "session.revoke", "session", row.id, before, {**_session_state(row), "reason": reason},
            config=True)
    return row


# ---------------------------------------------------------------------------- TOTP second factor


def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD)


def totp_step(now: datetime) -> int:
    """The RFC 6238 time step (counter) of ``now``."""
    return int(now.timestamp()) // TOTP_PERIOD


def _totp_match(secret: str, code: object, now: datetime) -> int | None:
    """The time step whose code ``code`` is (current, then one either side), or None."""
    if not isinstance(code, str):
        return None
    code = code.strip().replace(" ", "")
    if not re.fullmatch(rf"[0-9]{{{TOTP_DIGITS}}}", code):
        return None
    totp, current = _totp(secret), totp_step(now)
    drifts = sorted(range(-TOTP_VALID_WINDOW, TOTP_VALID_WINDOW + 1), key=abs)  # 0, -1, 1: the current step first
    for step in (current + drift for drift in drifts):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def totp_uri(user: User, secret: str) -> str:
    """The ``otpauth://`` URI authenticator apps read (usually from a QR code)."""
    return _totp(secret).provisioning_uri(name=user.upn, issuer_name=TOTP_ISSUER)


@_change
def start_totp_enrolment(session: Session, user_id: str) -> str:
    """A new TOTP secret for the user, not in force until ``confirm_totp``; returns it (base32).

    Refused (``conflict``) while TOTP is enabled: an admin resets it first (``reset_totp``),
    so a stolen password-only session cannot replace the second factor.
    """
    user = get_user(session, user_id)
    if user.totp_enabled:
        raise StoreError("conflict", f"TOTP is already enabled for {user.upn}: an admin must reset it before a new "
                                     f"enrolment")
    before = _user_state(user)
    secret = pyotp.random_base32()
    user.totp_secret = secret
    user.updated_at = utcnow()
    session.flush()
    _record(session, f"user:{user.id}", "user.totp_enrol", "user", user.id, before, _user_state(user), config=False)
    return secret


def _new_recovery_codes(session: Session, user_id: str) -> list[str]:
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = secrets.token_hex(6)
        session.add(RecoveryCode(user_id=user_id, code_hash=hash_secret(raw), used_at=None))
        codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return codes


@_change
def confirm_totp(session: Session, user_id: str, code: str, *, now: datetime | None = None) -> tuple[list[str], int]:
    """Enable TOTP once ``code`` matches the pending secret; returns the ``RECOVERY_CODE_COUNT``
    recovery codes (plain text, this once; older ones are replaced) and the code's time step."""
    now = _now(now)
    user = get_user(session, user_id)
    if user.totp_enabled:
        raise StoreError("conflict", f"TOTP is already enabled for {user.upn}")
    if user.totp_secret is None:
        raise StoreError("conflict", f"no TOTP enrolment is in progress for {user.upn}: start one first")
    step = _totp_match(user.totp_secret, code, now)
    if step is None:
        raise StoreError("mfa_failed", "TOTP code is wrong (codes change every 30 s: check the clock of the "
                                       "device that shows them)")
    before = _user_state(user)
    user.totp_enabled = True
    user.updated_at = now
    codes = _new_recovery_codes(session, user.id)
    session.flush()
    _record(session, f"user:{user.id}", "user.totp_enable", "user", user.id, before,
            {**_user_state(user), "recovery_codes": RECOVERY_CODE_COUNT}, config=False)
    return codes, step


@_change
def verify_second_factor(session: Session, user: User, *, totp_code: str | None = None,
                         recovery_code: str | None = None, now: datetime | None = None) -> int | None:
    """Check the user's second factor at sign-in: a TOTP code (returns its time step: the caller
    refuses a step it saw used already) or an unused recovery code (marked used; returns None).

    Refused with ``mfa_required`` when neither is given, ``mfa_failed`` when wrong, and
    ``invalid`` when both are given or the user has no TOTP enabled.
    """
    now = _now(now)
    if totp_code is not None and recovery_code is not None:
        raise StoreError("invalid", "give either a TOTP code or a recovery code, not both")
    if not user.totp_enabled or user.totp_secret is None:
        raise StoreError("invalid", f"{user.upn} has no TOTP second factor enabled: sign in without a code")
    if totp_code is None and recovery_code is None:
        raise StoreError("mfa_required", "a TOTP code is required")
    if totp_code is not None:
        step = _totp_match(user.totp_secret, totp_code, now)
        if step is None:
            raise StoreError("mfa_failed", "TOTP code is wrong (codes change every 30 s: check the clock of the "
                                           "device that shows them)")
        return step
    normal = recovery_code.strip().lower().replace("-", "").replace(" ", "") if isinstance(recovery_code, str) else ""
    row = None
    if _RECOVERY_RE.fullmatch(normal):
        row = session.scalar(select(RecoveryCode).where(RecoveryCode.user_id == user.id,
                                                        RecoveryCode.code_hash == hash_secret(normal),
                                                        RecoveryCode.used_at.is_(None)).with_for_update())
    if row is None:
        raise StoreError("mfa_failed", "recovery code is wrong or was already used")
    row.used_at = now
    session.flush()
    left = recovery_codes_left(session, user.id)
    _record(session, f"user:{user.id}", "user.recovery_code_use", "user", user.id, None,
            {"upn": user.upn, "recovery_codes_left": left}, config=False)
    return None


def recovery_codes_left(session: Session, user_id: str) -> int:
    return session.scalar(select(func.count()).select_from(RecoveryCode)
                          .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))) or 0


@_change
def reset_totp(session: Session, actor: str, ref: str) -> User:
    """Remove the user's TOTP secret and recovery codes (admin; e.g. a lost phone). They may enrol again."""
    user = get_user(session, ref)
    if user.totp_secret is None and not user.totp_enabled:
        raise StoreError("conflict", f"{user.upn} has no TOTP set up: nothing to reset")
    before = _user_state(user)
    user.totp_secret, user.totp_enabled = None, False
    user.updated_at = utcnow()
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    session.flush()
    _record(session, actor, "user.totp_reset", "user", user.id, before, _user_state(user), config=False)
    return user


# ---------------------------------------------------------------------------- reads for the configuration snapshot


def snapshot_users(session: Session) -> list[tuple[str, str, list[str], bool, str]]:
    """Every user as ``(id, upn, sorted group ids, disabled, risk level)``, sorted by id."""
    groups: dict[str, list[str]] = defaultdict(list)
    for group_id, user_id in session.execute(select(GroupMember.group_id, GroupMember.user_id)):
        groups[user_id].append(group_id)
    rows = session.execute(select(User.id, User.upn, User.disabled, User.risk_level).order_by(User.id))
    return [(uid, upn, sorted(groups.get(uid, ())), bool(disabled), risk) for uid, upn, disabled, risk in rows]


def snapshot_devices(session: Session) -> list[tuple[str, str, str, str, bool, bool]]:
    """Every device as ``(id, user id, os, os version, compliant, revoked)``, sorted by id."""
    rows = session.execute(select(Device.id, Device.user_id, Device.os, Device.os_version, Device.compliant,
                                  Device.revoked_at).order_by(Device.id))
    return [(did, uid, os, version, bool(compliant), revoked is not None)
            for did, uid, os, version, compliant, revoked in rows]


def revoked_session_ids(session: Session) -> list[str]:
    """The ids of sessions revoked and not expired (their access tokens may still be live), sorted.

    "Not expired" is judged at the time of the configuration version's change, not now, so
    a version always lists the same sessions (equal snapshots on every control-plane node);
    a session that expires later stays listed until the next change, which is harmless:
    its access tokens expire with it.
    """
    as_of = session.scalar(select(ConfigVersion.changed_at).where(ConfigVersion.id == 1))
    return list(session.scalars(select(SignInSession.id).where(SignInSession.revoked_at.is_not(None),
                                                               SignInSession.expires_at > as_of)
                                .order_by(SignInSession.id)))
