"""The TOTP second factor (RFC 6238) and recovery codes.

TOTP: 6 digits, 30 s, one step of clock drift either way; a base32 secret per user. The
control plane must compute codes, so the secret is kept sealed (AES-256-GCM under the
secrets key, bound to the user's id: ``control.store.secretbox``), never in the clear and
never in audit records; every function that reads or writes it takes the ``SecretBox``.

Recovery codes: 10 of 12 hex digits (48 bits), shown once, each usable once, stored salted
and slow: argon2id (the password parameters, ``users.PASSWORD_HASHER``) of the code's
SHA-256. The SHA-256 step lets migration 0006 re-hash the unsalted SHA-256 values earlier
versions kept without knowing the codes, so codes users hold keep working. A used code
keeps no hash. Checking a code means an argon2 verification per unused code of the user
(at most 10, about 50 ms each): ``find_recovery_code`` does it, in a read, before the write
transaction that spends the code.

This module checks codes; refusing a TOTP code already used (replay within its 90 s) is up
to the caller, which gets the code's time step back (``verify_second_factor``,
``confirm_totp``).
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import datetime

import pyotp
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from .audit import change, record_change
from .errors import StoreError
from .models import RecoveryCode, User, utcnow
from .secretbox import SecretBox
from .users import PASSWORD_HASHER, end_console_sessions, get_user, user_state, verify_hash
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


def _context(user_id: str) -> str:
    return f"totp:{user_id}"


def seal_secret(box: SecretBox, user_id: str, secret: str) -> str:
    """What is stored of ``user_id``'s TOTP secret (base32)."""
    return box.seal(secret.encode(), _context(user_id))


def user_secret(box: SecretBox, user: User) -> str | None:
    """The user's TOTP secret (base32) in the clear, or None when there is none."""
    if user.totp_secret is None:
        return None
    return box.unseal(user.totp_secret, _context(user.id)).decode()


def check_secrets_key(session: Session, box: SecretBox) -> None:
    """Refuse (``invalid``) a secrets key that does not open the TOTP secrets this database holds
    (the wrong ``secrets.key`` for it): checked at start, before any user is refused for it."""
    row = session.execute(select(User.id, User.totp_secret).where(User.totp_secret.is_not(None)).limit(1)).first()
    if row is None:
        return
    try:
        box.unseal(row.totp_secret, _context(row.id))
    except ValueError as exc:
        raise StoreError("invalid", f"the TOTP secrets in this database cannot be read: {exc}. Every control-plane "
                                    f"node of one database needs the same secrets.key") from None


def recovery_hash(normal: str) -> str:
    """What is stored of a recovery code (12 lower-case hex digits): argon2id of its SHA-256."""
    return PASSWORD_HASHER.hash(hash_secret(normal))


def _normal_recovery_code(code: object) -> str | None:
    normal = code.strip().lower().replace("-", "").replace(" ", "") if isinstance(code, str) else ""
    return normal if _RECOVERY_RE.fullmatch(normal) else None


def new_recovery_codes() -> list[tuple[str, str]]:
    """``RECOVERY_CODE_COUNT`` new codes as (what the user is shown, what is stored); slow
    (argon2 each), so callers make them before their write transaction."""
    out = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = secrets.token_hex(6)
        out.append((f"{raw[:4]}-{raw[4:8]}-{raw[8:]}", recovery_hash(raw)))
    return out


def find_recovery_code(session: Session, user_id: str, code: object) -> int | None:
    """The id of the user's unused recovery code that ``code`` is (an argon2 verification per
    unused code), or None. A read: nothing is marked used."""
    normal = _normal_recovery_code(code)
    if normal is None:
        return None
    digest = hash_secret(normal)
    for row_id, stored in session.execute(select(RecoveryCode.id, RecoveryCode.code_hash)
                                          .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
                                          .order_by(RecoveryCode.id)):
        if stored and verify_hash(stored, digest):
            return row_id
    return None


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
def start_totp_enrolment(session: Session, user_id: str, box: SecretBox) -> str:
    """A new TOTP secret for the user, not in force until ``confirm_totp``; returns it (base32), stores it sealed.

    Refused (``conflict``) while TOTP is enabled: an admin resets it first (``reset_totp``),
    so a stolen password-only session cannot replace the second factor.
    """
    user = get_user(session, user_id)
    if user.totp_enabled:
        raise StoreError("conflict", f"TOTP is already enabled for {user.upn}: an admin must reset it before a new "
                                     f"enrolment")
    before = user_state(user)
    secret = pyotp.random_base32()
    user.totp_secret = seal_secret(box, user.id, secret)
    user.updated_at = utcnow()
    session.flush()
    record_change(session, f"user:{user.id}", "user.totp_enrol", "user", user.id, before, user_state(user),
                  config=False)
    return secret


def _store_recovery_codes(session: Session, user_id: str, codes: list[tuple[str, str]]) -> list[str]:
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    for _shown, stored in codes:
        session.add(RecoveryCode(user_id=user_id, code_hash=stored, used_at=None))
    return [shown for shown, _stored in codes]


@change
def confirm_totp(session: Session, user_id: str, code: str, box: SecretBox, *, now: datetime | None = None,
                 recovery_codes: list[tuple[str, str]] | None = None) -> tuple[list[str], int]:
    """Enable TOTP once ``code`` matches the pending secret; returns the ``RECOVERY_CODE_COUNT``
    recovery codes (plain text, this once; older ones are replaced) and the code's time step.
    ``recovery_codes``: made beforehand by ``new_recovery_codes`` (else made here, slowly)."""
    now = aware_now(now)
    user = get_user(session, user_id)
    if user.totp_enabled:
        raise StoreError("conflict", f"TOTP is already enabled for {user.upn}")
    secret = user_secret(box, user)
    if secret is None:
        raise StoreError("conflict", f"no TOTP enrolment is in progress for {user.upn}: start one first")
    step = _totp_match(secret, code, now)
    if step is None:
        raise StoreError("mfa_failed", TOTP_WRONG)
    before = user_state(user)
    user.totp_enabled = True
    user.updated_at = now
    codes = _store_recovery_codes(session, user.id, recovery_codes or new_recovery_codes())
    session.flush()
    record_change(session, f"user:{user.id}", "user.totp_enable", "user", user.id, before,
                  {**user_state(user), "recovery_codes": RECOVERY_CODE_COUNT}, config=False)
    return codes, step


_UNMATCHED = -1


@change
def verify_second_factor(session: Session, user: User, box: SecretBox, *, totp_code: str | None = None,
                         recovery_code: str | None = None, recovery_code_id: int | None = _UNMATCHED,
                         now: datetime | None = None) -> int | None:
    """Check the user's second factor at sign-in: a TOTP code (returns its time step: the caller
    refuses a step it saw used already) or an unused recovery code (marked used; returns None).
    ``recovery_code_id``: what ``find_recovery_code`` answered for ``recovery_code`` in a read
    before this transaction (left out: it is looked up here); spending it is atomic (a code
    used meanwhile is refused).

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
        step = _totp_match(user_secret(box, user) or "", totp_code, now)
        if step is None:
            raise StoreError("mfa_failed", TOTP_WRONG)
        return step
    if recovery_code_id == _UNMATCHED:
        recovery_code_id = find_recovery_code(session, user.id, recovery_code)
    spent = 0
    if recovery_code_id is not None:
        spent = session.execute(update(RecoveryCode)
                                .where(RecoveryCode.id == recovery_code_id, RecoveryCode.user_id == user.id,
                                       RecoveryCode.used_at.is_(None))
                                .values(used_at=now, code_hash="")).rowcount
    if spent != 1:
        raise StoreError("mfa_failed", "recovery code is wrong or was already used")
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
    end_console_sessions(session, user.id)
    session.flush()
    record_change(session, actor, "user.totp_reset", "user", user.id, before, user_state(user), config=False)
    return user
