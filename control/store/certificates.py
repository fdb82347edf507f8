"""Certificates the CA signed (for connectors, edges and clients) and the revocation list.

Serials are stored as lower-case hex (``values.serial_text``). A revocation is
configuration: edges refuse the certificate once they hold the next version.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .config_version import lock_config
from .errors import StoreError
from .models import TOKEN_ROLES, Connector, Edge, IssuedCertificate, Revocation, utcnow
from .values import MAX_NAME, aware_now, serial_text, valid_name

# ---------------------------------------------------------------------------- issued certificates


@change
def record_certificate(session: Session, role: str, node_id: str, serial: int, not_after: datetime,
                       now: datetime | None = None) -> IssuedCertificate:
    """Note a certificate signed for node ``node_id`` (registration or renewal)."""
    if role not in TOKEN_ROLES:
        raise StoreError("invalid", f"certificate role {role!r} is not one of {', '.join(TOKEN_ROLES)}")
    row = IssuedCertificate(serial=serial_text(serial), role=role, node_id=node_id, issued_at=aware_now(now),
                            not_after=not_after)
    session.add(row)
    session.flush()
    return row


@change
def record_client_certificate(session: Session, actor: str, name: str, serial: int, not_after: datetime) -> None:
    """Audit the signing of a client (device) certificate (clients are not nodes of the store)."""
    text = serial_text(serial)
    record_change(session, actor, "client_certificate.issue", "certificate", text, None,
                  {"serial": text, "role": "client", "name": valid_name(name, "client name"),
                   "not_after": not_after.isoformat()},
                  config=False)


def node_for_certificate(session: Session, serial: int) -> Connector | Edge | None:
    """The connector or edge a certificate was issued to (None if the serial is not known here)."""
    row = session.get(IssuedCertificate, serial_text(serial))
    if row is None:
        return None
    return session.get(Connector if row.role == "connector" else Edge, row.node_id)


def certificates_issued_since(session: Session, node_id: str, since: datetime) -> int:
    """How many certificates node ``node_id`` was issued at ``since`` or later (registration and renewals)."""
    return session.scalar(select(func.count()).select_from(IssuedCertificate).where(
        IssuedCertificate.node_id == node_id, IssuedCertificate.issued_at >= since)) or 0


def node_certificates(session: Session, node_id: str) -> list[IssuedCertificate]:
    """Every certificate issued to ``node_id``, oldest first."""
    return list(session.scalars(select(IssuedCertificate).where(IssuedCertificate.node_id == node_id)
                                .order_by(IssuedCertificate.issued_at, IssuedCertificate.serial)))


def node_owners(session: Session, serials: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """The node each of these (hex) serials was issued to, as ``(role, node id, node name)``; serials
    of no known node (a client certificate, a node deleted since) are left out."""
    owners: dict[str, tuple[str, str, str]] = {}
    issued = dict(session.execute(select(IssuedCertificate.serial, IssuedCertificate.node_id)
                                  .where(IssuedCertificate.serial.in_(serials))).tuples().all())
    for c in session.scalars(select(Connector).where(Connector.id.in_(issued.values()))):
        owners.update({serial: ("connector", c.id, c.name) for serial, node in issued.items() if node == c.id})
    for e in session.scalars(select(Edge).where(Edge.id.in_(issued.values()))):
        owners.update({serial: ("edge", e.id, e.name) for serial, node in issued.items() if node == e.id})
    return owners


def superseded_since(session: Session, as_of: datetime) -> list[tuple[IssuedCertificate, datetime]]:
    """Node certificates that a later one of the same node replaced, with when it did (the later
    one's issue time), not revoked and not expired at ``as_of``, oldest replacement first."""
    revoked = revoked_serials(session)
    rows = session.scalars(select(IssuedCertificate).order_by(IssuedCertificate.node_id, IssuedCertificate.issued_at,
                                                              IssuedCertificate.serial)).all()
    out: list[tuple[IssuedCertificate, datetime]] = []
    for older, newer in zip(rows, rows[1:]):
        if older.node_id == newer.node_id and older.serial not in revoked and _aware(older.not_after) > as_of:
            out.append((older, _aware(newer.issued_at)))
    return sorted(out, key=lambda pair: pair[1])


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def retire_superseded(session: Session, grace: timedelta, now: datetime | None = None) -> list[str]:
    """Revoke every node certificate replaced by a renewal more than ``grace`` ago (its node has
    had that long to move its tunnels to the new one); the serials revoked. A renewal would
    otherwise leave the old key good for the rest of its lifetime: a key copied before the
    renewal (a backup, a disk) would outlive the rotation meant to retire it."""
    now = aware_now(now)
    retired = []
    for cert, replaced_at in superseded_since(session, now):
        if replaced_at > now - grace:
            break
        revoke_certificate(session, "control-plane", int(cert.serial, 16),
                           f"superseded by the renewal at {replaced_at.isoformat(timespec='seconds')}")
        retired.append(cert.serial)
    return retired


# ---------------------------------------------------------------------------- revocations


def list_revocations(session: Session) -> list[Revocation]:
    return list(session.scalars(select(Revocation).order_by(Revocation.at, Revocation.serial)))


def revoked_serials(session: Session) -> set[str]:
    """The (hex) serial of every revoked certificate."""
    return set(session.scalars(select(Revocation.serial)))


def is_revoked(session: Session, serial: int) -> bool:
    return session.get(Revocation, serial_text(serial)) is not None


@change
def revoke_certificate(session: Session, actor: str, serial: int, reason: str = "") -> Revocation:
    """Revoke a certificate by serial number; nodes learn it with the next configuration version."""
    lock_config(session)
    text = serial_text(serial)
    if session.get(Revocation, text) is not None:
        raise StoreError("conflict", f"certificate {text} is already revoked")
    if len(reason.strip()) > MAX_NAME:
        raise StoreError("invalid", f"revocation reason is longer than {MAX_NAME} characters")
    row = Revocation(serial=text, at=utcnow(), reason=reason.strip())
    session.add(row)
    session.flush()
    record_change(session, actor, "certificate.revoke", "certificate", text, None, row_state(row), config=True)
    return row
