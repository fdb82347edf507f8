"""What the control plane's replay guards remember, shared by every control-plane node on one
database (table ``guard_marks``), so a replay sent to another node is refused too.

- ``first_use(store, kind, key, expires_at)``: record ``key`` (e.g. a node request token's id)
  until ``expires_at``; True the first time, False while an earlier record is alive. One
  statement (``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``), so two nodes racing on
  the same key cannot both see True.
- ``claim_step(store, kind, key, step, expires_at)``: record ``step`` (a user's TOTP time step)
  if it is above the one recorded; True when it was, False when that step or a later one was
  claimed already. Atomic the same way.
- ``forget_expired(store)``: delete the records past their time (the callers do it now and
  then, so the table holds only live records).

Both dialects (PostgreSQL, SQLite 3.35+) run the same upsert; each call is its own short
transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from .db import Store
from .models import GuardMark, utcnow

KEY_MAX = 200


def _insert(store: Store):  # type: ignore[no-untyped-def]
    return (postgresql.insert if store.engine.dialect.name == "postgresql" else sqlite.insert)(GuardMark)


def _check(kind: str, key: str) -> None:
    if not kind or len(kind) > 32 or not key or len(key) > KEY_MAX:
        raise ValueError(f"a guard mark needs a kind of 1-32 and a key of 1-{KEY_MAX} characters")


def first_use(store: Store, kind: str, key: str, expires_at: datetime, now: datetime | None = None) -> bool:
    """True when ``key`` of ``kind`` has no live record (it is recorded until ``expires_at``)."""
    _check(kind, key)
    now = now or utcnow()
    stmt = _insert(store).values(kind=kind, key=key, value=0, expires_at=expires_at)
    stmt = stmt.on_conflict_do_update(index_elements=[GuardMark.kind, GuardMark.key],
                                      set_={"expires_at": stmt.excluded.expires_at, "value": 0},
                                      where=GuardMark.expires_at < now).returning(GuardMark.key)
    with store.begin() as session:
        return session.execute(stmt).first() is not None


def claim_step(store: Store, kind: str, key: str, step: int, expires_at: datetime) -> bool:
    """True when ``step`` is above every step claimed for ``key`` of ``kind`` (it is recorded)."""
    _check(kind, key)
    stmt = _insert(store).values(kind=kind, key=key, value=step, expires_at=expires_at)
    stmt = stmt.on_conflict_do_update(index_elements=[GuardMark.kind, GuardMark.key],
                                      set_={"value": stmt.excluded.value, "expires_at": stmt.excluded.expires_at},
                                      where=GuardMark.value < stmt.excluded.value).returning(GuardMark.key)
    with store.begin() as session:
        return session.execute(stmt).first() is not None


def forget_expired(store: Store, now: datetime | None = None) -> int:
    """Delete every record past its time; return how many."""
    with store.begin() as session:
        result = session.execute(delete(GuardMark).where(GuardMark.expires_at < (now or utcnow())))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
