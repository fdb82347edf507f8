"""How the store checks and keeps the values every resource has: names (and that a unique one
is free), free texts, times, certificate serials and secret hashes; and names looked up by
id. Each refusal is a ``StoreError`` naming the value.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from .errors import StoreError
from .models import utcnow

MAX_NAME = 200  # names of applications, connectors, edges, keys, ...; certificate revocation reasons
MAX_REASON = 200  # why a device or a sign-in session was revoked
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def valid_name(value: object, what: str, limit: int = MAX_NAME) -> str:
    """``value`` stripped; refused unless a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise StoreError("invalid", f"{what} must be a non-empty string")
    name = value.strip()
    if len(name) > limit:
        raise StoreError("invalid", f"{what} {name[:20]!r}... is longer than {limit} characters")
    return name


def refuse_taken(session: Session, column: InstrumentedAttribute[Any], value: object, what: str) -> None:
    """Refuse (``conflict``: "``what`` 'value' already exists") a ``value`` a unique ``column`` already has."""
    if session.scalar(select(column.class_.id).where(column == value)) is not None:
        raise StoreError("conflict", f"{what} {value!r} already exists")


def names_by_id(session: Session, id_column: InstrumentedAttribute[Any], name_column: InstrumentedAttribute[Any],
                ids: Iterable[Hashable]) -> dict[Any, Any]:
    """``{id: name}`` of the rows with these ids (ids of rows deleted since are left out)."""
    wanted = set(ids)
    if not wanted:
        return {}
    return dict(session.execute(select(id_column, name_column).where(id_column.in_(wanted))).all())


def valid_text(value: object, what: str, limit: int) -> str:
    """``value`` stripped; may be empty; refused unless a string of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise StoreError("invalid", f"{what} must be a string")
    text = value.strip()
    if len(text) > limit:
        raise StoreError("invalid", f"{what} {text[:20]!r}... is longer than {limit} characters")
    return text


def aware_now(now: datetime | None) -> datetime:
    """``now``, or the current time when None; a naive time is refused."""
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise StoreError("invalid", "times given to the store must be timezone-aware")
    return now


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def hash_secret(secret: str) -> str:
    """What is kept of a 256-bit random secret (admin key, token, refresh token, recovery code): its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def serial_text(serial: int) -> str:
    """A certificate serial as stored (lower-case hex); refused unless a positive integer."""
    if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
        raise StoreError("invalid", f"certificate serial {serial!r} must be a positive integer")
    return format(serial, "x")
