"""One-time registration tokens: how a connector or an edge proves it may register (``POST /v1/register``).

A token is 32 random bytes (``fmr_...``), shown once and stored as its SHA-256; it names the
role and, for a connector, the connector group, expires after its lifetime and is used up
by the registration that succeeds.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .connector_groups import group_or_default
from .errors import StoreError
from .models import TOKEN_ROLES, RegistrationToken
from .values import aware_now, hash_secret, valid_name

REGISTRATION_TOKEN_PREFIX = "fmr_"
DEFAULT_TOKEN_TTL = timedelta(hours=24)
_A_ROLE = {"connector": "a connector", "edge": "an edge"}


def list_registration_tokens(session: Session) -> list[RegistrationToken]:
    """Every token issued, newest first."""
    return list(session.scalars(select(RegistrationToken).order_by(RegistrationToken.id.desc())))


def token_role(session: Session, plaintext: str) -> str:
    """The role the token was issued for; 'connector' for an unknown token (consuming it then says so)."""
    role = session.scalar(select(RegistrationToken.role)
                          .where(RegistrationToken.token_hash == hash_secret(plaintext)))
    return role or "connector"


@change
def create_registration_token(session: Session, actor: str, role: str, *, group: str | None = None,
                              ttl: timedelta = DEFAULT_TOKEN_TTL,
                              now: datetime | None = None) -> tuple[RegistrationToken, str]:
    """A one-time token for a connector (into ``group``, default: the default group) or an edge.

    Returns the row and the plain text (``fmr_...``), shown this once; only its hash is kept.
    """
    if role not in TOKEN_ROLES:
        raise StoreError("invalid", f"registration token role {role!r} is not one of {', '.join(TOKEN_ROLES)}")
    if ttl <= timedelta(0):
        raise StoreError("invalid", f"registration token lifetime {ttl} must be positive")
    if role == "edge" and group is not None:
        raise StoreError("invalid", "an edge registration token has no connector group")
    target = group_or_default(session, group) if role == "connector" else None
    now = aware_now(now)
    plaintext = REGISTRATION_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = RegistrationToken(token_hash=hash_secret(plaintext), role=role, group=target, created_at=now,
                              created_by=actor, expires_at=now + ttl)
    session.add(token)
    session.flush()
    after = {**row_state(token), "group": target.name if target else None}
    record_change(session, actor, "registration_token.create", "registration_token", token.id, None, after,
                  config=False)
    return token, plaintext


@change
def consume_registration_token(session: Session, plaintext: str, role: str, *, used_by: str,
                               now: datetime | None = None) -> RegistrationToken:
    """Use a registration token once, for a node of ``role``; ``used_by`` names that node.

    Refused with code ``token_unknown``, ``token_used`` or ``token_expired`` (each its own
    message), or ``invalid`` when the token is for the other role. The row is locked, so two
    concurrent uses cannot both succeed.
    """
    now = aware_now(now)
    token = session.scalar(select(RegistrationToken).where(RegistrationToken.token_hash == hash_secret(plaintext))
                           .with_for_update(of=RegistrationToken))
    if token is None:
        raise StoreError("token_unknown", "registration token is not known (mistyped, or never issued here)")
    if token.used_at is not None:
        raise StoreError("token_used", f"registration token was already used at "
                                       f"{token.used_at:%Y-%m-%d %H:%M:%S} UTC by {token.used_by}")
    if now >= token.expires_at:
        raise StoreError("token_expired", f"registration token expired at {token.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    if token.role != role:
        raise StoreError("invalid", f"registration token is for {_A_ROLE[token.role]}, not for {_A_ROLE[role]}")
    before = row_state(token)
    token.used_at, token.used_by = now, valid_name(used_by, "registering node name")
    session.flush()
    record_change(session, token.used_by, "registration_token.use", "registration_token", token.id, before,
                  row_state(token), config=False)
    return token
