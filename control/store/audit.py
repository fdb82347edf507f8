"""How every change is written: in a savepoint, with an audit record (and, for configuration, a new version).

Every store function works inside the caller's transaction (``Store.begin()``) and never
commits, so a caller can make several changes atomically. A change takes an ``actor`` (who:
``admin-key:<name>``, ``connector:<id>``, ``user:<id>``, ...) and writes an ``AuditRecord``
with the object's state before and after (``row_state``: secret hashes left out), in the
same transaction (``record_change``). A change runs in a savepoint (``@change``): when it is
refused (``StoreError``) it leaves nothing behind and the caller's transaction stays usable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from .config_version import bump
from .errors import StoreError
from .models import AuditRecord, utcnow

_SECRET_COLUMNS = frozenset({"key_hash", "token_hash"})

_P = ParamSpec("_P")
_R = TypeVar("_R")


def change(fn: Callable[Concatenate[Session, _P], _R]) -> Callable[Concatenate[Session, _P], _R]:
    """Run a change in a savepoint, so that a refused change leaves nothing behind."""

    @functools.wraps(fn)
    def run(session: Session, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with session.begin_nested():
            return fn(session, *args, **kwargs)

    return run


def record_change(session: Session, actor: str, action: str, object_type: str, object_id: object,
                  before: dict[str, Any] | None, after: dict[str, Any] | None, *, config: bool) -> None:
    """Write the audit record of a change; ``config``: also bump the configuration version."""
    if not isinstance(actor, str) or not actor.strip():
        raise StoreError("invalid", "every change needs an actor (who makes it)")
    now = utcnow()
    session.add(AuditRecord(at=now, actor=actor.strip(), action=action, object_type=object_type,
                            object_id=str(object_id), before=before, after=after))
    if config:
        bump(session, now)
    session.flush()


def row_state(obj: object) -> dict[str, Any]:
    """JSON-ready column values of a row (secret hashes left out), for audit records."""
    out: dict[str, Any] = {}
    for attr in inspect(obj).mapper.column_attrs:
        if attr.key in _SECRET_COLUMNS:
            continue
        value = getattr(obj, attr.key)
        out[attr.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


def list_audit(session: Session, limit: int = 100, object_type: str | None = None, *, actor: str | None = None,
               since: datetime | None = None) -> list[AuditRecord]:
    """The latest audit records, newest first (only ``actor``'s, of ``object_type``, at or after ``since``)."""
    query = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if actor is not None:
        query = query.where(AuditRecord.actor == actor)
    if object_type is not None:
        query = query.where(AuditRecord.object_type == object_type)
    if since is not None:
        query = query.where(AuditRecord.at >= since)
    return list(session.scalars(query))
