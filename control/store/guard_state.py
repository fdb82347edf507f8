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
- Sign-in attempts (``sign_in_attempts``), for the limits of ``control.api.throttle``
  shared by every node: ``sign_in_begin`` takes a database-wide lock (PostgreSQL advisory
  lock, held to the end of its short transaction), counts the failures within the window
  per (account, source), source, account and in all, attempts in flight counting as
  failures, and either returns the wait of the first limit reached (nothing recorded) or
  records the attempt in flight; ``sign_in_finish`` turns it into a failure, or deletes it
  (and on success the pair's failures, and marks the source known for the account).
  In-flight records older than ``FLIGHT_MAX`` seconds (their node died) are not counted.

Both dialects (PostgreSQL, SQLite 3.35+) run the same upsert; each call is its own short
transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from .db import Store
from .models import GuardMark, SignInAttempt, utcnow

KEY_MAX = 200
FLIGHT_MAX = 120.0  # seconds an attempt may stay in flight and still be counted
_SIGN_IN_LOCK = 0x46525349  # PostgreSQL advisory lock serialising sign-in limit checks ("FRSI")
ALL = "*"


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


# ---------------------------------------------------------------------------- sign-in attempts


@dataclass(frozen=True)
class SignInLimit:
    """One limit: ``name`` (``pair``, ``source``, ``account``, ``total``) and its most failures."""

    name: str
    limit: int


def _known_key(account: str, source: str) -> str:
    return hashlib.sha256(f"{account}\0{source}".encode()).hexdigest()


def sign_in_begin(store: Store, account: str, source: str, limits: list[SignInLimit], window: float,
                  now: datetime | None = None) -> tuple[int | None, str | None, float]:
    """(attempt id, None, 0) when the attempt may go ahead (recorded in flight), else (None, the
    name of the limit reached, seconds to wait). ``limits`` are checked in order; ``source``,
    ``account`` and ``total`` are skipped when the source is known for the account."""
    now = now or utcnow()
    since = now - timedelta(seconds=window)
    flight_since = now - timedelta(seconds=FLIGHT_MAX)
    live = or_(and_(SignInAttempt.state == "failed", SignInAttempt.at > since),
               and_(SignInAttempt.state == "flight", SignInAttempt.at > flight_since))
    scopes = {"pair": and_(SignInAttempt.account == account, SignInAttempt.source == source),
              "source": SignInAttempt.source == source, "account": SignInAttempt.account == account,
              "total": SignInAttempt.id.is_not(None)}
    with store.begin() as session:
        if store.engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SIGN_IN_LOCK})
        session.execute(delete(SignInAttempt).where(SignInAttempt.at <= min(since, flight_since)))
        known = session.scalar(select(GuardMark.key).where(
            GuardMark.kind == "known-source", GuardMark.key == _known_key(account, source),
            GuardMark.expires_at > now)) is not None
        for check in limits:
            if known and check.name != "pair":
                continue
            where = and_(scopes[check.name], live)
            used = session.scalar(select(func.count()).select_from(SignInAttempt).where(where)) or 0
            if used < check.limit:
                continue
            nth = session.scalar(select(SignInAttempt.at).where(and_(where, SignInAttempt.state == "failed"))
                                 .order_by(SignInAttempt.at.desc()).offset(check.limit - 1).limit(1))
            wait = 1.0 if nth is None else max(0.0, (nth + timedelta(seconds=window) - now).total_seconds())
            return None, check.name, wait
        row = SignInAttempt(account=account, source=source, state="flight", at=now)
        session.add(row)
        session.flush()
        return row.id, None, 0.0


def sign_in_finish(store: Store, attempt_id: int, account: str, source: str, *, ok: bool, failed: bool,
                   known_for: float, now: datetime | None = None) -> None:
    """End the attempt ``attempt_id``: ``failed`` counts it; ``ok`` clears the pair's failures and
    makes ``source`` known for ``account`` for ``known_for`` seconds; neither forgets it."""
    now = now or utcnow()
    with store.begin() as session:
        if failed:
            session.execute(update(SignInAttempt).where(SignInAttempt.id == attempt_id)
                            .values(state="failed", at=now))
        else:
            session.execute(delete(SignInAttempt).where(SignInAttempt.id == attempt_id))
        if ok:
            session.execute(delete(SignInAttempt).where(SignInAttempt.account == account,
                                                        SignInAttempt.source == source,
                                                        SignInAttempt.state == "failed"))
            until = now + timedelta(seconds=known_for)
            stmt = _insert(store).values(kind="known-source", key=_known_key(account, source), value=0,
                                         expires_at=until)
            session.execute(stmt.on_conflict_do_update(index_elements=[GuardMark.kind, GuardMark.key],
                                                       set_={"expires_at": stmt.excluded.expires_at}))
