"""Sign-in sessions and their refresh tokens; revoking a session is configuration (``revoked_session_ids``).

Signing in and refreshing are not configuration; a sign-in writes one ``session.create``
audit record, actor ``user:<id>`` (never the refresh-token hash).

Refresh tokens: ``fmrt_<session id>.<32 bytes, urlsafe base64>``, stored as their SHA-256
(a 256-bit secret needs no slow hash). A sign-in's first token is random; each refresh
hands out the next one, ``successor(token)``: an HMAC of the token presented under a key
derived from the secrets key (``SecretBox.mac``), as unguessable as a random one to anyone
without that key. The session id in the token finds the session when an *old* token comes
back, which is taken as theft (refresh-token reuse detection, RFC 9700 §4.14.2): the
session is revoked. Knowing a session id alone does not let anyone refresh, but does let
them end that session this way; session ids are only in access tokens and admin views.

Lost answers: a client whose refresh answer was lost (a timeout, a dropped connection)
retries with the same token. Within ``grace`` seconds (``FERRYMAN_REFRESH_GRACE``) of that
rotation, the token whose successor is the session's current one gets the same new token
again (computed anew, nothing is stored in the clear) instead of revoking the session;
later, or for any older token, reuse revokes as above. The window is the price: a thief
replaying a stolen token within it is not detected.

At most ``MAX_SESSIONS_PER_USER`` live sessions per user: a new sign-in beyond it revokes the oldest.

What reaches the edges: creating and refreshing a session change no configuration. Revoking
one does (its access tokens must be refused), but only while an access token issued for it
may still be accepted (``tokens_valid_until``): the configuration version is bumped then, and
``revoked_session_ids`` lists the session until that moment has passed, no longer. Callers
that know the access tokens' lifetime pass it (``token_lifetime``); without it a revocation
always counts and a session is listed until it expires. With it, a sign-in beyond the limit
revokes the oldest sessions whose tokens have all expired, quietly, and is refused
(``too_many_sessions``) when every live session still holds a valid token: one user's
sign-ins never push a new configuration to every node.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dataplane.contract.snapshot import TOKEN_LEEWAY

from .audit import change, record_change
from .config_version import lock_config
from .devices import touch_device
from .errors import StoreError
from .models import ConfigVersion, Device, SignInSession, User
from .secretbox import SecretBox
from .users import ACCOUNT_DISABLED, get_user
from .values import MAX_REASON, UUID_RE, aware_now, hash_secret, iso, valid_text

MAX_SESSIONS_PER_USER = 100  # sessions neither revoked nor expired
DEFAULT_SESSION_LIFETIME = timedelta(days=30)
MAX_SESSION_LIFETIME = timedelta(days=365)
REFRESH_TOKEN_PREFIX = "fmrt_"
AMR_VALUES = (("pwd",), ("pwd", "mfa"))
REUSE_ACTOR = "control-plane:refresh-token-reuse"

_REFRESH_RE = re.compile(re.escape(REFRESH_TOKEN_PREFIX) + r"(?P<sid>" + UUID_RE.pattern + r")\.[A-Za-z0-9_-]{43}")


def _session_state(row: SignInSession) -> dict[str, Any]:
    return {"id": row.id, "user_id": row.user_id, "device_id": row.device_id, "amr": row.amr,
            "auth_time": iso(row.auth_time), "expires_at": iso(row.expires_at),
            "revoked_at": iso(row.revoked_at)}


def session_status(row: SignInSession, now: datetime | None = None) -> str:
    """``revoked``, ``expired`` or ``active``."""
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if aware_now(now) >= row.expires_at else "active"


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


# An access token is signed just after its session row is written (sign-in) or refreshed: its
# ``iat`` may be this much later than the row's time.
_ISSUE_SLACK = timedelta(seconds=5)


def tokens_valid_until(row: SignInSession, token_lifetime: timedelta | None) -> datetime:
    """The moment after which no edge accepts an access token of session ``row`` any more.

    Its newest token was issued at sign-in or at the last refresh and lives ``token_lifetime``
    (None: unknown, so up to the session's own expiry), never past the session's expiry;
    edges allow ``TOKEN_LEEWAY`` seconds of clock skew beyond that.
    """
    end = row.expires_at
    if token_lifetime is not None:
        issued = max(row.created_at, row.last_refresh_at or row.created_at)
        end = min(end, issued + token_lifetime + _ISSUE_SLACK)
    return end + timedelta(seconds=TOKEN_LEEWAY)


def revoked_session_ids(session: Session, *, token_lifetime: timedelta | None = None) -> list[str]:
    """The ids of revoked sessions whose access tokens edges may still accept, sorted.

    A session is listed when it was revoked while a token of it was valid (``tokens_valid_until``)
    and that token is still valid at the time of the configuration version's change (not now,
    so a version always lists the same sessions: equal snapshots on every control-plane node).
    A session leaves the list with the first change after its last token can no longer be
    valid, so the list holds at most the revocations of one token lifetime, however many
    sign-ins and sign-outs there were.
    """
    as_of = session.scalar(select(ConfigVersion.changed_at).where(ConfigVersion.id == 1))
    leeway = timedelta(seconds=TOKEN_LEEWAY)
    query = select(SignInSession).where(SignInSession.revoked_at.is_not(None),
                                        SignInSession.expires_at > as_of - leeway)
    if token_lifetime is not None:  # no token is issued after a revocation: an upper bound, for the index
        query = query.where(SignInSession.revoked_at > as_of - token_lifetime - _ISSUE_SLACK - leeway)
    out = []
    for row in session.scalars(query.order_by(SignInSession.id)):
        valid_until = tokens_valid_until(row, token_lifetime)
        if row.revoked_at is not None and row.revoked_at < valid_until and valid_until > as_of:
            out.append(row.id)
    return out


def _new_refresh_token(session_id: str) -> str:
    return f"{REFRESH_TOKEN_PREFIX}{session_id}.{secrets.token_urlsafe(32)}"


def successor(box: SecretBox, session_id: str, refresh_token: str) -> str:
    """The refresh token that a refresh with ``refresh_token`` hands out (module doc)."""
    mac = box.mac("refresh-token", refresh_token.encode())
    return f"{REFRESH_TOKEN_PREFIX}{session_id}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


@change
def create_session(session: Session, user_id: str, *, device_id: str | None = None,
                   amr: Sequence[str] = ("pwd",), now: datetime | None = None,
                   lifetime: timedelta = DEFAULT_SESSION_LIFETIME,
                   token_lifetime: timedelta | None = None) -> tuple[SignInSession, str]:
    """A sign-in's session and its first refresh token (plain text: hand it out, only its hash is kept).

    ``amr`` is what the sign-in proved (``("pwd",)`` or ``("pwd", "mfa")``); ``device_id``
    binds the session to a device of the user (not revoked). Beyond
    ``MAX_SESSIONS_PER_USER`` live sessions the oldest is revoked; with ``token_lifetime``
    (the access tokens' lifetime) only sessions whose tokens have all expired are (no
    configuration change), and the sign-in is refused with ``too_many_sessions`` when there
    are not enough of those. The user's expired sessions are deleted. Audited as
    ``session.create`` by ``user:<id>``; not configuration.
    """
    now = aware_now(now)
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
    excess = max(0, len(live) - MAX_SESSIONS_PER_USER + 1)
    if token_lifetime is not None and excess:
        idle = [row for row in live if tokens_valid_until(row, token_lifetime) <= now]
        if len(idle) < excess:
            first = min(tokens_valid_until(row, token_lifetime) for row in live)
            raise StoreError("too_many_sessions", f"{user.upn} already has {len(live)} sessions whose access "
                                                  f"tokens are still valid, the most allowed "
                                                  f"({MAX_SESSIONS_PER_USER}): sign out of one, or sign in after "
                                                  f"{first:%Y-%m-%d %H:%M:%S} UTC")
        live = idle
    for oldest in live[:excess]:
        revoke_session(session, actor, oldest.id, reason=f"more than {MAX_SESSIONS_PER_USER} sessions", now=now,
                       token_lifetime=token_lifetime)
    row = SignInSession(id=str(uuid.uuid4()), user_id=user.id, device_id=device_id, amr=",".join(amr),
                        auth_time=now, created_at=now, expires_at=now + lifetime, refresh_hash="")
    token = _new_refresh_token(row.id)
    row.refresh_hash = hash_secret(token)
    session.add(row)
    session.flush()
    record_change(session, actor, "session.create", "session", row.id, None, _session_state(row), config=False)
    return row, token


def _check_not_revoked(session: Session, row: SignInSession) -> None:
    """Refuse a session whose device was revoked (``device_revoked``, said first: revoking a device
    revokes its sessions too, and this is the reason) or that was revoked (``session_revoked``)."""
    if row.device_id is not None:
        device = session.get(Device, row.device_id)
        if device is None or device.revoked_at is not None:
            raise StoreError("device_revoked", f"device {row.device_id} of this session is revoked: sign in again "
                                               f"and register the device anew")
    if row.revoked_at is not None:
        raise StoreError("session_revoked", f"session {row.id} was revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} "
                                            f"UTC: sign in again")


def _enabled_user(session: Session, row: SignInSession) -> User:
    """The session's user; ``account_disabled`` when deleted or disabled."""
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        raise StoreError("account_disabled", ACCOUNT_DISABLED)
    return user


def refresh_session(session: Session, refresh_token: str, box: SecretBox, *, grace: float = 0.0,
                    now: datetime | None = None) -> tuple[SignInSession, str]:
    """Trade the session's current refresh token for its successor (the old one stops working).

    Refused with ``refresh_invalid`` (malformed, or no such session), ``device_revoked``,
    ``session_revoked``, ``session_expired`` or ``account_disabled``. A refresh token of the
    session that is no longer its current one was stolen or replayed: the session is
    revoked (audited, configuration) and ``refresh_reused`` raised — unless it is the token
    the current one succeeded within ``grace`` seconds (a retry after a lost answer), which
    gets the current one again. **The caller must commit its transaction before passing
    ``refresh_reused`` on**, or the revocation is rolled back with it.
    """
    now = aware_now(now)
    match = _REFRESH_RE.fullmatch(refresh_token) if isinstance(refresh_token, str) else None
    if match is None:
        raise StoreError("refresh_invalid", f"refresh token is malformed (expected {REFRESH_TOKEN_PREFIX}"
                                            f"<session id>.<secret>, as handed out at sign-in)")
    row = session.scalar(select(SignInSession).where(SignInSession.id == match["sid"]).with_for_update())
    if row is None:
        raise StoreError("refresh_invalid", "refresh token is not valid: its session does not exist "
                                            "(signed out long ago, or the user was deleted): sign in again")
    _check_not_revoked(session, row)
    token = successor(box, row.id, refresh_token)
    if not hmac.compare_digest(row.refresh_hash, hash_secret(refresh_token)):
        retried = (grace > 0 and row.last_refresh_at is not None
                   and timedelta(0) <= now - row.last_refresh_at <= timedelta(seconds=grace)
                   and hmac.compare_digest(row.refresh_hash, hash_secret(token)))
        if not retried:
            revoke_session(session, REUSE_ACTOR, row.id, reason="an old refresh token was used again", now=now)
            raise StoreError("refresh_reused", f"refresh token was already used: session {row.id} is revoked, "
                                               f"since its refresh token may be stolen; sign in again")
        if now >= row.expires_at:
            raise StoreError("session_expired", f"session {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M:%S} "
                                                f"UTC: sign in again")
        _enabled_user(session, row)
        return row, token  # the answer this token got already: the same new token, nothing rotates
    if now >= row.expires_at:
        raise StoreError("session_expired", f"session {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC: "
                                            f"sign in again")
    _enabled_user(session, row)
    row.refresh_hash = hash_secret(token)
    row.last_refresh_at = now
    touch_device(session, row.device_id, now)
    session.flush()
    return row, token


def active_session(session: Session, session_id: str, now: datetime | None = None) -> tuple[SignInSession, User]:
    """The session and its user while the session may act (for requests bearing its access token):
    refused with ``device_revoked``, ``session_revoked``, ``session_expired`` or ``account_disabled``."""
    now = aware_now(now)
    row = session.get(SignInSession, session_id) if isinstance(session_id, str) and session_id else None
    if row is None:
        raise StoreError("session_revoked", f"session {session_id!r} does not exist any more: sign in again")
    _check_not_revoked(session, row)
    if now >= row.expires_at:
        raise StoreError("session_expired", f"session {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    return row, _enabled_user(session, row)


@change
def revoke_session(session: Session, actor: str, session_id: str, reason: str = "",
                   now: datetime | None = None, token_lifetime: timedelta | None = None) -> SignInSession:
    """End a session: its refresh token stops working and edges refuse its access tokens
    (configuration: ``revoked_session_ids``). With ``token_lifetime``, a session none of whose
    access tokens can still be valid is ended without a configuration change (edges refuse
    its tokens as expired already)."""
    lock_config(session)
    now = aware_now(now)
    row = get_session(session, session_id)
    if row.revoked_at is not None:
        raise StoreError("conflict", f"session {row.id} was already revoked at "
                                     f"{row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    if now >= row.expires_at:
        raise StoreError("conflict", f"session {row.id} already expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    reason = valid_text(reason, "revocation reason", MAX_REASON)
    before = _session_state(row)
    row.revoked_at = now
    session.flush()
    record_change(session, actor, "session.revoke", "session", row.id, before,
                  {**_session_state(row), "reason": reason},
                  config=now < tokens_valid_until(row, token_lifetime))
    return row
