"""What every sign-in ends with, however the user proved who they are (password and TOTP:
``auth.py``; an OIDC provider: ``oidc.py``): the device registered and certified, a session,
an access token and a refresh token. The refresh route issues access tokens the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from control.store import devices, sessions, users
from control.store.models import Device, SignInSession, User

from .guards import Api
from .identity_schemas import DeviceCertificate, SignedInUser, SignInResponse


def access_token(api: Api, user: User, groups: list[str], row: SignInSession) -> tuple[str, int]:
    """A signed access token for ``user`` in session ``row`` (its ``amr``, ``auth_time``, device and
    expiry) and its lifetime in seconds."""
    return api.token_signer.issue(user_id=user.id, upn=user.upn, groups=groups, amr=row.amr.split(","),
                                  auth_time=row.auth_time, session_id=row.id, device_id=row.device_id,
                                  not_after=row.expires_at)


def certify_device(api: Api, session: Session, actor: str, user_id: str, csr_pem: str, *, name: str, os: str,
                   os_version: str) -> tuple[Device, DeviceCertificate]:
    """Register a new device of ``user_id`` and sign its client certificate (CN = the device id) for the CSR."""
    device = devices.register_device(session, actor, user_id, name=name, os=os, os_version=os_version)
    issued = api.ca.sign_csr(csr_pem.encode(), role="client", name=device.id, lifetime_days=api.cert_lifetime_days)
    devices.record_device_certificate(session, actor, device.id, issued.serial, issued.not_after)
    return device, DeviceCertificate(id=device.id, certificate_pem=issued.cert_pem.decode(),
                                     ca_pem=api.ca.bundle().decode(), serial=format(issued.serial, "x"),
                                     not_after=issued.not_after)


def signed_in(api: Api, session: Session, user: User, amr: Sequence[str], device_id: str | None,
              device: DeviceCertificate | None, *, now: datetime | None = None,
              auth_time: datetime | None = None) -> SignInResponse:
    """A new session of ``user`` (bound to ``device_id``) and the sign-in's answer: access and refresh
    tokens, the user with their groups, and ``device`` (a device certified by this sign-in).
    ``auth_time``: when the user proved who they are, if not now (kept through refreshes)."""
    row, refresh_token = sessions.create_session(session, user.id, device_id=device_id, amr=amr, now=now,
                                                 token_lifetime=timedelta(seconds=api.token_signer.lifetime))
    if auth_time is not None:
        row.auth_time = auth_time
        session.flush()
    groups = users.user_group_ids(session, user.id)
    access, expires_in = access_token(api, user, groups, row)
    return SignInResponse(access_token=access, token_type="Bearer", expires_in=expires_in,
                          refresh_token=refresh_token, session_id=row.id,
                          user=SignedInUser(id=user.id, upn=user.upn, display_name=user.display_name, groups=groups),
                          device=device)
