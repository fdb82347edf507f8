"""Users: who signs in (named by id or UPN), their passwords, disabled flag and risk level,
and the OIDC provider's account each may be linked to.

Creating, renaming (UPN), disabling, enabling, re-rating or deleting a user changes the
configuration version (edges decide flows from ``snapshot_users``); a password change does
not. Audit records never hold the password hash.

Passwords: argon2id (``PASSWORD_HASHER``: 19 MiB, 2 passes, 1 lane, the OWASP minimum; about
50 ms per check), ``MIN_PASSWORD_LENGTH`` to ``MAX_PASSWORD_LENGTH`` characters.
``check_password`` spends the same argon2 work on an unknown user (a dummy hash) and gives
one message for an unknown user and a wrong password; "account is disabled" is only said
once the password was right.

OIDC accounts: a user may be linked to one account of an OIDC provider, named by the ID
token's ``iss`` and ``sub`` (unique: one user per account). Sign-in through the provider
finds the user by that pair only (``find_oidc_user``); the link is made by an admin
(``link_oidc``) or at the first sign-in whose verified email is the user's UPN
(``control.api.oidc``). Linking is audited (``user.oidc_link`` / ``user.oidc_unlink``),
not configuration.
"""

from __future__ import annotations

import functools
import re
import secrets
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .audit import change, record_change
from .certificates import is_revoked, revoke_certificate
from .config_version import lock_config
from .errors import StoreError
from .models import USER_RISK_LEVELS, ConsoleSession, Device, GroupMember, User, utcnow
from .values import names_by_id, refuse_taken, valid_name, valid_text

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
MAX_UPN_LENGTH = 255  # users.upn
MAX_DISPLAY_NAME = 200  # users.display_name, devices.name, user_groups.name
AUTH_FAILED = "user name or password is wrong"
ACCOUNT_DISABLED = "account is disabled"
# argon2id with the OWASP Password Storage Cheat Sheet's minimum: m=19 MiB, t=2, p=1.
PASSWORD_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16,
                                 type=Type.ID)

_UPN_RE = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@(?=.{1,253}$)"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


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


def user_state(user: User) -> dict[str, Any]:
    """A user as its audit records show it (no secret: whether a password and TOTP are set)."""
    return {"id": user.id, "upn": user.upn, "display_name": user.display_name, "disabled": user.disabled,
            "risk_level": user.risk_level, "has_password": user.password_hash is not None,
            "totp_enabled": user.totp_enabled, "totp_pending": user.totp_secret is not None and not user.totp_enabled,
            "oidc_issuer": user.oidc_issuer, "oidc_subject": user.oidc_subject}


# ---------------------------------------------------------------------------- reads


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


def find_user(session: Session, ref: object) -> User:
    """The user whose id or UPN (any case) is ``ref`` (``get_user``), ``ref`` checked first; ``not_found`` otherwise."""
    return get_user(session, valid_name(ref, "user (id or UPN)", 255))


def upns_of(session: Session, ids: Iterable[str]) -> dict[str, str]:
    """The UPNs of the users with these ids (ids of deleted users left out)."""
    return names_by_id(session, User.id, User.upn, ids)


def user_group_ids(session: Session, user_id: str) -> list[str]:
    """The ids of the groups ``user_id`` is a member of, sorted."""
    return sorted(session.scalars(select(GroupMember.group_id).where(GroupMember.user_id == user_id)))


def snapshot_users(session: Session) -> list[tuple[str, str, list[str], bool, str]]:
    """Every user as ``(id, upn, sorted group ids, disabled, risk level)``, sorted by id (for the configuration)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for group_id, user_id in session.execute(select(GroupMember.group_id, GroupMember.user_id)):
        groups[user_id].append(group_id)
    rows = session.execute(select(User.id, User.upn, User.disabled, User.risk_level).order_by(User.id))
    return [(uid, upn, sorted(groups.get(uid, ())), bool(disabled), risk) for uid, upn, disabled, risk in rows]


# ---------------------------------------------------------------------------- changes


@change
def create_user(session: Session, actor: str, upn: str, *, display_name: str = "",
                password: str | None = None) -> User:
    """A new user (id: a new UUID); without ``password`` it cannot sign in with one until it gets one."""
    key = normalize_upn(upn)
    display = valid_text(display_name, "display name", MAX_DISPLAY_NAME)
    password_hash = None if password is None else PASSWORD_HASHER.hash(_check_password(password))
    lock_config(session)
    refuse_taken(session, User.upn, key, "user")
    now = utcnow()
    user = User(id=str(uuid.uuid4()), upn=key, display_name=display, password_hash=password_hash, disabled=False,
                risk_level="none", totp_secret=None, totp_enabled=False, created_at=now, updated_at=now)
    session.add(user)
    session.flush()
    record_change(session, actor, "user.create", "user", user.id, None, user_state(user), config=True)
    return user


@change
def update_user(session: Session, actor: str, ref: str, *, upn: str | None = None, display_name: str | None = None,
                disabled: bool | None = None, risk_level: str | None = None) -> User:
    """Change a user's UPN, display name, disabled flag and/or risk level (None: unchanged).

    A change that changes nothing is not recorded; one that edges need (UPN, disabled, risk
    level) bumps the configuration version.
    """
    lock_config(session)
    user = get_user(session, ref)
    before = user_state(user)
    if upn is not None:
        key = normalize_upn(upn)
        if key != user.upn:
            refuse_taken(session, User.upn, key, "user")
            user.upn = key
    if display_name is not None:
        user.display_name = valid_text(display_name, "display name", MAX_DISPLAY_NAME)
    if disabled is not None:
        if not isinstance(disabled, bool):
            raise StoreError("invalid", f"disabled must be true or false, not {disabled!r}")
        user.disabled = disabled
    if risk_level is not None:
        user.risk_level = _risk(risk_level)
    after = user_state(user)
    if after == before:
        return user
    user.updated_at = utcnow()
    session.flush()
    config = any(before[field] != after[field] for field in ("upn", "disabled", "risk_level"))
    record_change(session, actor, "user.update", "user", user.id, before, after, config=config)
    return user


def disable_user(session: Session, actor: str, ref: str) -> User:
    """Disable sign-in, refresh and (at the edges) every flow of the user."""
    return update_user(session, actor, ref, disabled=True)


def enable_user(session: Session, actor: str, ref: str) -> User:
    return update_user(session, actor, ref, disabled=False)


def set_risk_level(session: Session, actor: str, ref: str, risk_level: str) -> User:
    """``none``, ``low``, ``medium`` or ``high``: conditional-access policies may act on it."""
    return update_user(session, actor, ref, risk_level=risk_level)


def end_console_sessions(session: Session, user_id: str) -> None:
    """End every live console session of the user: their role changed, or the credentials a
    session was signed in with (password, TOTP) were changed or reset, perhaps because someone
    else knew them."""
    session.execute(update(ConsoleSession).where(ConsoleSession.user_id == user_id,
                                                 ConsoleSession.revoked_at.is_(None)).values(revoked_at=utcnow()))


@change
def set_password(session: Session, actor: str, ref: str, password: str | None) -> User:
    """Set (argon2id) or, with None, remove the user's password. Not configuration; audited without the hash."""
    password_hash = None if password is None else PASSWORD_HASHER.hash(_check_password(password))
    user = get_user(session, ref)
    had = user.password_hash is not None
    user.password_hash = password_hash
    user.updated_at = utcnow()
    end_console_sessions(session, user.id)
    session.flush()
    record_change(session, actor, "user.set_password" if password is not None else "user.remove_password", "user",
                  user.id, {"upn": user.upn, "has_password": had},
                  {"upn": user.upn, "has_password": password is not None}, config=False)
    return user


@change
def delete_user(session: Session, actor: str, ref: str) -> None:
    """Delete a user with its devices (their certificates revoked first), sessions, memberships
    and recovery codes (the database cascades)."""
    lock_config(session)
    user = get_user(session, ref)
    before = {**user_state(user), "groups": user_group_ids(session, user.id)}
    for device in session.scalars(select(Device).where(Device.user_id == user.id).order_by(Device.id)):
        if device.cert_serial and not is_revoked(session, int(device.cert_serial, 16)):
            revoke_certificate(session, actor, int(device.cert_serial, 16), f"user {user.upn} deleted")
    session.delete(user)
    session.flush()
    session.expire_all()  # devices, sessions and memberships went with it (ON DELETE CASCADE)
    record_change(session, actor, "user.delete", "user", before["id"], before, None, config=True)


MAX_OIDC_VALUE = 255  # characters of an issuer URL or a subject


def find_oidc_user(session: Session, issuer: str, subject: str) -> User | None:
    """The user linked to the OIDC account (``iss``, ``sub``), or None."""
    return session.scalar(select(User).where(User.oidc_issuer == issuer, User.oidc_subject == subject))


@change
def link_oidc(session: Session, actor: str, ref: str, issuer: str, subject: str | None) -> User:
    """Link the user to the OIDC account (``issuer``, ``subject``), replacing any link it had; with
    ``subject`` None, unlink it. Refused (``conflict``) when another user has that account."""
    user = get_user(session, ref)
    before = user_state(user)
    if subject is None:
        if user.oidc_subject is None:
            return user
        user.oidc_issuer = user.oidc_subject = None
        action = "user.oidc_unlink"
    else:
        issuer = valid_name(issuer, "OIDC issuer", MAX_OIDC_VALUE)
        subject = valid_name(subject, "OIDC subject (sub)", MAX_OIDC_VALUE)
        other = find_oidc_user(session, issuer, subject)
        if other is not None and other.id != user.id:
            raise StoreError("conflict", f"the OIDC account {subject!r} of {issuer} is linked to user {other.upn} "
                                         f"already")
        if (user.oidc_issuer, user.oidc_subject) == (issuer, subject):
            return user
        user.oidc_issuer, user.oidc_subject = issuer, subject
        action = "user.oidc_link"
    user.updated_at = utcnow()
    session.flush()
    record_change(session, actor, action, "user", user.id, before, user_state(user), config=False)
    return user


# ---------------------------------------------------------------------------- passwords at sign-in


@functools.cache
def _dummy_hash() -> str:
    """A hash no password matches, verified for unknown users so they cost the same argon2 work."""
    return PASSWORD_HASHER.hash(secrets.token_urlsafe(32))


def verify_hash(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches the argon2 ``password_hash`` (False for a malformed hash too)."""
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
    matched = verify_hash(stored, password if usable else "")
    if user is None or user.password_hash is None or not usable or not matched:
        raise StoreError("auth_failed", AUTH_FAILED)
    if user.disabled:
        raise StoreError("account_disabled", ACCOUNT_DISABLED)
    return user
