"""Admin API keys: who may call the admin API (``Authorization: Bearer fmk_...``).

A key is 32 random bytes (``secrets``), handed out once in plain text and stored as its
SHA-256 (``values.hash_secret``): for a 256-bit random secret a single hash is as strong as
a slow password hash and keeps checking a key on every API request cheap. ``last_used_at``
is written at most once per ``LAST_USED_RESOLUTION``, so admins' reads rarely write.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .errors import StoreError
from .models import AdminKey, utcnow
from .values import aware_now, hash_secret, refuse_taken, valid_name

ADMIN_KEY_PREFIX = "fmk_"
# ``AdminKey.last_used_at`` is written at most this often per key (not on every request).
LAST_USED_RESOLUTION = timedelta(minutes=1)


def list_admin_keys(session: Session) -> list[AdminKey]:
    return list(session.scalars(select(AdminKey).order_by(AdminKey.name)))


def live_admin_keys(session: Session) -> int:
    """How many admin keys are not revoked."""
    return session.scalar(select(func.count()).select_from(AdminKey).where(AdminKey.revoked_at.is_(None))) or 0


def find_admin_key(session: Session, name: str) -> AdminKey | None:
    return session.scalar(select(AdminKey).where(AdminKey.name == name))


@change
def create_admin_key(session: Session, actor: str, name: str) -> tuple[AdminKey, str]:
    """A new admin key and its plain text (``fmk_...``): shown this once, only its hash is kept."""
    name = valid_name(name, "admin key name")
    refuse_taken(session, AdminKey.name, name, "admin key")
    plaintext = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    key = AdminKey(name=name, key_hash=hash_secret(plaintext), created_at=utcnow(), created_by=actor)
    session.add(key)
    session.flush()
    record_change(session, actor, "admin_key.create", "admin_key", key.id, None, row_state(key), config=False)
    return key, plaintext


def live_key(session: Session, plaintext: str) -> AdminKey | None:
    """The live (not revoked) admin key whose plain text this is, else None (a read: nothing is written)."""
    key = session.scalar(select(AdminKey).where(AdminKey.key_hash == hash_secret(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def use_is_noted(key: AdminKey, now: datetime) -> bool:
    """Whether ``key.last_used_at`` is recent enough that a use at ``now`` need not be written."""
    return key.last_used_at is not None and now - key.last_used_at < LAST_USED_RESOLUTION


def verify_admin_key(session: Session, plaintext: str, now: datetime | None = None) -> AdminKey | None:
    """The live (not revoked) admin key whose plain text this is, else None; notes its last use."""
    key = live_key(session, plaintext)
    if key is None:
        return None
    now = aware_now(now)
    if not use_is_noted(key, now):
        key.last_used_at = now
        session.flush()
    return key


@change
def revoke_admin_key(session: Session, actor: str, name: str) -> AdminKey:
    key = find_admin_key(session, name)
    if key is None:
        raise StoreError("not_found", f"admin key {name!r} does not exist")
    if key.revoked_at is not None:
        raise StoreError("conflict", f"admin key {name!r} was already revoked at "
                                     f"{key.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    before = row_state(key)
    key.revoked_at = utcnow()
    session.flush()
    record_change(session, actor, "admin_key.revoke", "admin_key", key.id, before, row_state(key), config=False)
    return key
