"""The TOTP second factor (RFC 6238) and recovery codes.

TOTP: 6 digits, 30 s, one step of clock drift either way; a base32 secret per user, stored
as such (the control plane must compute codes), never in audit records. Recovery codes: 10
of 12 hex digits, shown once, stored as SHA-256, each usable once. This module checks codes;
refusing a TOTP code already used (replay within its 90 s) is up to the caller, which gets
the code's time step back (``verify_second_factor``, ``confirm_totp``).
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import datetime

import pyotp
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .audit import change, record_change
from .errors import StoreError
from .models import RecoveryCode, User, utcnow
from .users import get_user, user_state
from .values import aware_now, hash_secret

TOTP_ISSUER = "Ferryman"
TOTP_DIGITS = 6
TOTP_PERIOD = 30  # seconds
TOTP_VALID_WINDOW = 1  # time steps accepted either side of the current one (clock drift)
RECOVERY_CODE_COUNT = 10
TOTP_WRONG = "TOTP code is wrong (codes change every 30 s: check the clock of the device that shows them)"

_RECOVERY_RE = re.compile(r"[0-9a-f]{12}")


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


@change
def start_totp_enrolment(session: Session, user_id: str) -> str:
    """A new TOTP secret for the user, not in force until ``confirm_totp``; returns it (base32).

    Refused (``conflict``) while TOTP is enabled: an admin resets it first (``reset_totp``),
    so a stolen password-only session cannot replace the second factor.
    """
    user = get_user(session, user_id)
    if user.totp_enabled:
        raise StoreError("conflict", f"TOTP is already enabled for {user.upn}: an admin must reset it before a new "
                                     f"enrolment")
    before = user_state(user)
    secret = pyotp.random_base32()
    user.totp_secret = secret
    user.updated_at = utcnow()
    session.flush()
    record_change(session, f"user:{user.id}", "user.totp_enrol", "user", user.id, before, user_state(user),
                  config=False)
    return secret


def _new_recovery_codes(session: Session, user_id: str) -> list[str]:
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = secrets.token_hex(6)
        session.add(RecoveryCode(user_id=user_id, code_hash=hash_secret(raw), used_at=None))
        codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return codes


@change
def confirm_totp(session: Session, user_id: str, code: str, *, now: datetime | None = None) -> tuple[list[str], int]:
    """Enable TOTP once ``code`` matches the pending secret; returns the ``RECOVERY_CODE_COUNT``
    recovery codes (plain text, this once; older ones are replaced) and the code's time step."""
    now = aware_now(now)
    user = get_user(session, user_id)
    if user.totp_enabled:
        raise StoreError("conflict", f"TOTP is already enabled for {user.upn}")
    if user.totp_secret is None:
        raise StoreError("conflict", f"no TOTP enrolment is in progress for {user.upn}: start one first")
    step = _totp_match(user.totp_secret, code, now)
    if step is None:
        raise StoreError("mfa_failed", TOTP_WRONG)
    before = user_state(user)
    user.totp_enabled = True
    user.updated_at = now
    codes = _new_recovery_codes(session, user.id)
    session.flush()
    record_change(session, f"user:{user.id}", "user.totp_enable", "user", user.id, before,
                  {**user_state(user), "recovery_codes": RECOVERY_CODE_COUNT}, config=False)
    return codes, step


@change
def verify_second_factor(session: Session, user: User, *, totp_code: str | None = None,
                         recovery_code: str | None = None, now: datetime | None = None) -> int | None:
    """Check the user's second factor at sign-in: a TOTP code (returns its time step: the caller
    refuses a step it saw used already) or an unused recovery code (marked used; returns None).

    Refused with ``mfa_required`` when neither is given, ``mfa_failed`` when wrong, and
    ``invalid`` when both are given or the user has no TOTP enabled.
    """
    now = aware_now(now)
    if totp_code is not None and recovery_code is not None:
        raise StoreError("invalid", "give either a TOTP code or a recovery code, not both")
    if not user.totp_enabled or user.totp_secret is None:
        raise StoreError("invalid", f"{user.upn} has no TOTP second factor enabled: sign in without a code")
    if totp_code is None and recovery_code is None:
        raise StoreError("mfa_required", "a TOTP code is required")
    if totp_code is not None:
        step = _totp_match(user.totp_secret, totp_code, now)
        if step is None:
            raise StoreError("mfa_failed", TOTP_WRONG)
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
    record_change(session, f"user:{user.id}", "user.recovery_code_use", "user", user.id, None,
                  {"upn": user.upn, "recovery_codes_left": left}, config=False)
    return None


def recovery_codes_left(session: Session, user_id: str) -> int:
    return session.scalar(select(func.count()).select_from(RecoveryCode)
                          .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))) or 0


@change
def reset_totp(session: Session, actor: str, ref: str) -> User:
    """Remove the user's TOTP secret and recovery codes (admin; e.g. a lost phone). They may enrol again."""
    user = get_user(session, ref)
    if user.totp_secret is None and not user.totp_enabled:
        raise StoreError("conflict", f"{user.upn} has no TOTP set up: nothing to reset")
    before = user_state(user)
    user.totp_secret, user.totp_enabled = None, False
    user.updated_at = utcnow()
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    session.flush()
    record_change(session, actor, "user.totp_reset", "user", user.id, before, user_state(user), config=False)
    return user
