"""The web console's people and sessions: who may use it (a user's ``console_role``) and the
sessions its cookie names (``ConsoleSession``).

A session is made at sign-in (``create_console_session``) with a new random token for the
cookie and a new CSRF token; only the SHA-256 of the cookie's token is stored, so a copy of
the database does not sign anyone in. ``live_console_session`` finds the session of a
cookie and checks, on every request, that it is not revoked, within its absolute lifetime
and idle time, and that its user is enabled and still has a console role; ``last_seen_at``
is written at most once per ``TOUCH_RESOLUTION`` (reads by the console do not queue behind
SQLite's writer). Changing a user's role ends their console sessions, as does deleting the
user (the database cascades).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from .audit import change, record_change
from .errors import StoreError
from .models import CONSOLE_ROLES, ConsoleSession, User, utcnow
from .users import end_console_sessions, get_user
from .values import hash_secret

TOUCH_RESOLUTION = timedelta(seconds=60)
MAX_SOURCE = 64


def console_role_of(value: object) -> str | None:
    """A console role (``admin``, ``reader``), or None for "none" / "" (no console access)."""
    if value is None or value in ("", "none"):
        return None
    if value not in CONSOLE_ROLES:
        raise StoreError("invalid", f"console role must be one of {', '.join(CONSOLE_ROLES)} or none, not {value!r}")
    return str(value)


def console_admins(session: Session) -> int:
    """How many enabled users have the console role ``admin``."""
    return int(session.scalar(select(func.count()).select_from(User)
                              .where(User.console_role == "admin", User.disabled.is_(False))) or 0)


@change
def set_console_role(session: Session, actor: str, ref: str, role: object) -> User:
    """Give a user a console role, or take it away (None); their console sessions end either way."""
    wanted = console_role_of(role)
    user = get_user(session, ref)
    before = user.console_role
    if before == wanted:
        return user
    user.console_role = wanted
    user.updated_at = utcnow()
    end_console_sessions(session, user.id)
    session.flush()
    record_change(session, actor, "user.console_role", "user", user.id, {"upn": user.upn, "console_role": before},
                  {"upn": user.upn, "console_role": wanted}, config=False)
    return user


def create_console_session(session: Session, user: User, *, source: str, lifetime: timedelta,
                           now: datetime | None = None) -> tuple[str, ConsoleSession]:
    """A new console session of ``user`` (who must have a console role): the cookie's token and the row.

    The user's sessions that have ended are deleted on the way (their number stays bounded)."""
    if user.console_role is None:
        raise StoreError("auth_failed", f"{user.upn} has no web console role")
    now = now or utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id,
                                                 (ConsoleSession.expires_at <= now)
                                                 | ConsoleSession.revoked_at.is_not(None)))
    token = secrets.token_urlsafe(32)
    row = ConsoleSession(id=hash_secret(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                         source=(source or "")[:MAX_SOURCE], created_at=now, last_seen_at=now,
                         expires_at=now + lifetime, revoked_at=None)
    session.add(row)
    session.flush()
    record_change(session, f"console:{user.upn}", "console.sign_in", "user", user.id, None,
                  {"upn": user.upn, "console_role": user.console_role, "source": row.source}, config=False)
    return token, row


def live_console_session(session: Session, token: str, *, idle: timedelta,
                         now: datetime | None = None) -> tuple[ConsoleSession, User]:
    """The live session named by a cookie's ``token`` and its user; ``session_expired`` /
    ``session_revoked`` / ``auth_failed`` otherwise (the caller signs the browser out)."""
    now = now or utcnow()
    row = session.get(ConsoleSession, hash_secret(token)) if token else None
    if row is None:
        raise StoreError("auth_failed", "not signed in")
    if row.revoked_at is not None:
        raise StoreError("session_revoked", "the console session was ended: sign in again")
    if now >= row.expires_at:
        raise StoreError("session_expired", "the console session has expired: sign in again")
    if now - row.last_seen_at >= idle:
        raise StoreError("session_expired", "the console session ended after a time without use: sign in again")
    user = session.get(User, row.user_id)
    if user is None or user.disabled or user.console_role is None:
        raise StoreError("session_revoked", "this account may no longer use the console")
    return row, user


def needs_touch(row: ConsoleSession, now: datetime) -> bool:
    return now - row.last_seen_at >= TOUCH_RESOLUTION


def touch_console_session(session: Session, session_id: str, now: datetime) -> None:
    """Record use of a session (its idle time starts again)."""
    session.execute(update(ConsoleSession).where(ConsoleSession.id == session_id).values(last_seen_at=now))


def end_console_session(session: Session, session_id: str, upn: str) -> None:
    """Sign-out: the session stops working at once."""
    row = session.get(ConsoleSession, session_id)
    if row is None or row.revoked_at is not None:
        return
    row.revoked_at = utcnow()
    session.flush()
    record_change(session, f"console:{upn}", "console.sign_out", "user", row.user_id, None, {"upn": upn},
                  config=False)
