"""Users' devices: registered at sign-in (CSR → client certificate, CN = the device id), compliance and OS
set by an admin or an MDM, revocation (its certificate and live sessions).

Registering a device, changing its compliance or OS, and revoking it change the
configuration version (edges decide flows from ``snapshot_devices``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .audit import change, record_change
from .certificates import is_revoked, revoke_certificate
from .config_version import lock_config
from .errors import StoreError
from .models import Device, SignInSession, utcnow
from .users import MAX_DISPLAY_NAME, get_user
from .values import MAX_REASON, aware_now, iso, serial_text, valid_text

MAX_OS_FIELD = 64  # devices.os, devices.os_version
MAX_DEVICES_PER_USER = 50  # devices not revoked


def _device_state(device: Device) -> dict[str, Any]:
    return {"id": device.id, "user_id": device.user_id, "name": device.name, "os": device.os,
            "os_version": device.os_version, "compliant": device.compliant, "cert_serial": device.cert_serial,
            "cert_not_after": iso(device.cert_not_after), "revoked_at": iso(device.revoked_at)}


def list_devices(session: Session, user_id: str | None = None) -> list[Device]:
    """Every device (or ``user_id``'s), oldest first."""
    query = select(Device).order_by(Device.created_at, Device.id)
    if user_id is not None:
        query = query.where(Device.user_id == user_id)
    return list(session.scalars(query))


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id) if isinstance(device_id, str) and device_id else None
    if device is None:
        raise StoreError("not_found", f"device {device_id!r} does not exist")
    return device


def snapshot_devices(session: Session) -> list[tuple[str, str, str, str, bool, bool]]:
    """Every device as ``(id, user id, os, os version, compliant, revoked)``, sorted by id (for the configuration)."""
    rows = session.execute(select(Device.id, Device.user_id, Device.os, Device.os_version, Device.compliant,
                                  Device.revoked_at).order_by(Device.id))
    return [(did, uid, os, version, bool(compliant), revoked is not None)
            for did, uid, os, version, compliant, revoked in rows]


def touch_device(session: Session, device_id: str | None, now: datetime) -> None:
    """Note that device ``device_id`` (if any, and if it still exists) was seen at ``now``."""
    if device_id is not None:
        device = session.get(Device, device_id)
        if device is not None:
            device.last_seen = now


@change
def register_device(session: Session, actor: str, user_id: str, *, name: str = "", os: str = "",
                    os_version: str = "") -> Device:
    """A new device of ``user_id`` (id: a new UUID, the CN of the client certificate it gets; not compliant
    until an admin or an MDM says so)."""
    lock_config(session)
    user = get_user(session, user_id)
    name = valid_text(name, "device name", MAX_DISPLAY_NAME)
    os = valid_text(os, "device os", MAX_OS_FIELD)
    os_version = valid_text(os_version, "device os_version", MAX_OS_FIELD)
    live = session.scalar(select(func.count()).select_from(Device)
                          .where(Device.user_id == user.id, Device.revoked_at.is_(None)))
    if live is not None and live >= MAX_DEVICES_PER_USER:
        raise StoreError("conflict", f"user {user.upn!r} already has {live} devices, the most allowed "
                                     f"({MAX_DEVICES_PER_USER}): revoke one first")
    device = Device(id=str(uuid.uuid4()), user_id=user.id, name=name, os=os, os_version=os_version, compliant=False,
                    created_at=utcnow())
    session.add(device)
    session.flush()
    record_change(session, actor, "device.create", "device", device.id, None, _device_state(device), config=True)
    return device


@change
def record_device_certificate(session: Session, actor: str, device_id: str, serial: int,
                              not_after: datetime) -> Device:
    """The device got a client certificate (CN = its id): it becomes the device's current one."""
    device = get_device(session, device_id)
    if device.revoked_at is not None:
        raise StoreError("conflict", f"device {device.id} is revoked: it gets no new certificate")
    text = serial_text(serial)
    before = _device_state(device)
    device.cert_serial, device.cert_not_after = text, not_after
    session.flush()
    record_change(session, actor, "device.certificate", "device", device.id, before, _device_state(device),
                  config=False)
    return device


@change
def update_device(session: Session, actor: str, device_id: str, *, compliant: bool | None = None,
                  os: str | None = None, os_version: str | None = None, name: str | None = None) -> Device:
    """What an admin or an MDM says about a device (None: unchanged); a change of compliance or OS
    bumps the configuration version, a change that changes nothing is not recorded."""
    lock_config(session)
    device = get_device(session, device_id)
    before = _device_state(device)
    if compliant is not None:
        if not isinstance(compliant, bool):
            raise StoreError("invalid", f"compliant must be true or false, not {compliant!r}")
        device.compliant = compliant
    if os is not None:
        device.os = valid_text(os, "device os", MAX_OS_FIELD)
    if os_version is not None:
        device.os_version = valid_text(os_version, "device os_version", MAX_OS_FIELD)
    if name is not None:
        device.name = valid_text(name, "device name", MAX_DISPLAY_NAME)
    after = _device_state(device)
    if after == before:
        return device
    session.flush()
    config = any(before[field] != after[field] for field in ("compliant", "os", "os_version"))
    record_change(session, actor, "device.update", "device", device.id, before, after, config=config)
    return device


def set_device_compliant(session: Session, actor: str, device_id: str, compliant: bool) -> Device:
    return update_device(session, actor, device_id, compliant=compliant)


@change
def revoke_device(session: Session, actor: str, device_id: str, reason: str = "",
                  now: datetime | None = None) -> Device:
    """Revoke a device: its current certificate (into ``revocations``) and its live sessions;
    edges refuse it once they hold the new configuration version."""
    lock_config(session)
    now = aware_now(now)
    device = get_device(session, device_id)
    if device.revoked_at is not None:
        raise StoreError("conflict", f"device {device.id} was already revoked at "
                                     f"{device.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    reason = valid_text(reason, "revocation reason", MAX_REASON) or f"device {device.id} revoked"
    before = _device_state(device)
    if device.cert_serial and not is_revoked(session, int(device.cert_serial, 16)):
        revoke_certificate(session, actor, int(device.cert_serial, 16), reason)
    ended = []
    for row in session.scalars(select(SignInSession).where(SignInSession.device_id == device.id,
                                                           SignInSession.revoked_at.is_(None),
                                                           SignInSession.expires_at > now)
                               .order_by(SignInSession.id)):
        row.revoked_at = now
        ended.append(row.id)
    device.revoked_at = now
    session.flush()
    record_change(session, actor, "device.revoke", "device", device.id, before,
                  {**_device_state(device), "reason": reason, "sessions_revoked": ended}, config=True)
    return device
