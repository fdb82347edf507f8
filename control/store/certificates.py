"""Certificates the CA signed (for connectors, edges and clients) and the revocation list.

Serials are stored as lower-case hex (``values.serial_text``). A revocation is
configuration: edges refuse the certificate once they hold the next version.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

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


def mark_used(session: Session, serial: int, now: datetime | None = None) -> None:
    """Node certificate ``serial`` was just used to authenticate (a heartbeat): note the first time."""
    row = session.get(IssuedCertificate, serial_text(serial))
    if row is not None and row.first_used_at is None:
        row.first_used_at = aware_now(now)
        session.flush()


def superseded(session: Session, as_of: datetime) -> list[tuple[IssuedCertificate, IssuedCertificate]]:
    """``(old, current)`` for every node certificate that is not its node's current one (the node
    row's ``cert_serial``), neither revoked nor expired at ``as_of``, with the node's current
    certificate. Which certificate is current is the node row's word, never the order of issue
    times (several control-plane processes sign with their own clocks)."""
    revoked = revoked_serials(session)
    current: dict[str, str] = {}
    for table in (Connector, Edge):
        for node_id, serial in session.execute(select(table.id, table.cert_serial)):
            if serial is not None:
                current[node_id] = serial
    rows = {row.serial: row for row in session.scalars(
        select(IssuedCertificate).where(IssuedCertificate.node_id.in_(current)))}
    out = []
    for row in rows.values():
        now_serial = current[row.node_id]
        if row.serial == now_serial or row.serial in revoked or row.not_after <= as_of:
            continue
        if now_serial in rows:
            out.append((row, rows[now_serial]))
    return sorted(out, key=lambda pair: (pair[0].node_id, pair[0].serial))


def retire_superseded(session: Session, grace: timedelta, now: datetime | None = None) -> list[str]:
    """Revoke every node certificate a renewal replaced, once the node has used its current one
    for ``grace`` (its first heartbeat on it was that long ago: its tunnels have had that long to
    move). The serials revoked. A renewal would otherwise leave the old key good for the rest of
    its lifetime: a key copied before the renewal (a backup, a disk) would outlive the rotation
    meant to retire it. A node whose renewal answer was lost, and which so goes on with its old
    certificate, never used the new one: nothing of it is revoked."""
    now = aware_now(now)
    lock_config(session)  # one sweep at a time, with every other control-plane process
    retired = []
    for old, current in superseded(session, now):
        if current.first_used_at is None or current.first_used_at > now - grace:
            continue
        revoke_certificate(session, "control-plane", int(old.serial, 16),
                           f"superseded: its node has used certificate {current.serial} since "
                           f"{current.first_used_at.isoformat(timespec='seconds')}")
        retired.append(old.serial)
    return retired


# ---------------------------------------------------------------------------- revocations


def list_revocations(session: Session) -> list[Revocation]:
    return list(session.scalars(select(Revocation).order_by(Revocation.at, Revocation.serial)))


def revoked_serials(session: Session) -> set[str]:
    """The (hex) serial of every revoked certificate."""
    return set(session.scalars(select(Revocation.serial)))


LISTED_AFTER_EXPIRY = timedelta(days=7)  # how long a revoked node certificate stays listed once it expired


def listed_revocations(session: Session, as_of: datetime) -> list[str]:
    """The revoked serials nodes must be told of at ``as_of``, sorted by value: every revocation
    but those of node certificates revoked while still valid and expired ``LISTED_AFTER_EXPIRY``
    before ``as_of``. Every node following the control plane was told of such a revocation
    while the certificate could still be used (and cut its tunnels then); after it expired TLS
    refuses it; and with renewals retiring certificates the list would otherwise grow with every
    renewal for ever. A certificate revoked only after it expired stays listed (a tunnel made
    before it expired may still be up), and so does a serial of no node certificate recorded
    here (a device's)."""
    gone = set(session.scalars(
        select(Revocation.serial).join(IssuedCertificate, IssuedCertificate.serial == Revocation.serial)
        .where(IssuedCertificate.not_after <= as_of - LISTED_AFTER_EXPIRY, Revocation.at < IssuedCertificate.not_after)))
    return sorted((s for s in session.scalars(select(Revocation.serial)) if s not in gone), key=lambda s: int(s, 16))


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
