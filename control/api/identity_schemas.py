"""Request and response bodies of the sign-in routes (``auth.py``) and the identity admin routes
(``identity.py``): users, user groups, devices, sessions. msgspec Structs, as in ``schemas.py``:
request bodies refuse unknown fields, every string has a length limit, times are RFC 3339 UTC.

Secrets appear in a response once: refresh tokens (at sign-in and each refresh), the TOTP
secret (at enrolment) and recovery codes (at confirmation). Passwords are never returned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from .schemas import _Request

RiskLevel = Literal["none", "low", "medium", "high"]
SessionStatus = Literal["active", "revoked", "expired"]
MAX_CSR = 16384
_Upn = Annotated[str, msgspec.Meta(max_length=255)]
_Password = Annotated[str, msgspec.Meta(max_length=1024)]
_Name = Annotated[str, msgspec.Meta(max_length=200)]
_OsField = Annotated[str, msgspec.Meta(max_length=64)]
_Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]  # an id, or a UPN / group name
_Reason = Annotated[str, msgspec.Meta(max_length=200)]


# ---------------------------------------------------------------------------- sign-in (public)


class DeviceIn(_Request):
    """A device to register at sign-in: the CSR (PEM) of the key the client agent made, and what it runs."""

    csr_pem: Annotated[str, msgspec.Meta(max_length=MAX_CSR)]
    name: _Name = ""
    os: _OsField = ""
    os_version: _OsField = ""


class SignInRequest(_Request):
    """Password sign-in; ``totp_code`` or ``recovery_code`` when the user has TOTP enabled;
    ``device`` registers a new device, ``device_id`` binds the session to one registered before."""

    upn: _Upn
    password: _Password
    totp_code: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    recovery_code: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    device: DeviceIn | None = None
    device_id: Annotated[str, msgspec.Meta(max_length=36)] | None = None


class RefreshRequest(_Request):
    refresh_token: Annotated[str, msgspec.Meta(max_length=256)]


class TotpConfirmRequest(_Request):
    code: Annotated[str, msgspec.Meta(max_length=16)]


class SignedInUser(msgspec.Struct):
    id: str
    upn: str
    display_name: str
    groups: list[str]  # group ids, as in the access token


class DeviceCertificate(msgspec.Struct):
    """The device registered at this sign-in: its client certificate (CN = ``id``) and the CA bundle."""

    id: str
    certificate_pem: str
    ca_pem: str
    serial: str
    not_after: datetime


class TokenResponse(msgspec.Struct, kw_only=True):
    """``refresh_token`` replaces the one the client held (each works once)."""

    access_token: str
    token_type: str  # always "Bearer"
    expires_in: int  # seconds
    refresh_token: str
    session_id: str


class SignInResponse(TokenResponse, kw_only=True, omit_defaults=True):
    user: SignedInUser
    device: DeviceCertificate | None = None  # only when the sign-in registered a device


class TotpEnrolResponse(msgspec.Struct):
    """The new TOTP secret (base32) and its ``otpauth://`` URI (for a QR code); not in force
    until confirmed with a code."""

    secret: str
    otpauth_uri: str


class TotpConfirmResponse(msgspec.Struct):
    """One-time recovery codes, shown this once (each replaces a TOTP code once)."""

    recovery_codes: list[str]


class Jwk(msgspec.Struct):
    kty: str
    crv: str
    x: str
    kid: str
    use: str
    alg: str


class KeysResponse(msgspec.Struct):
    """The keys access tokens are signed with, and the ``iss`` they carry."""

    keys: list[Jwk]
    issuer: str


# ---------------------------------------------------------------------------- users (admin)


class UserCreate(_Request):
    upn: _Upn
    display_name: _Name = ""
    password: _Password | None = None  # none: no password sign-in until one is set


class UserUpdate(_Request):
    """Fields left out (or null) stay as they are."""

    upn: _Upn | None = None
    display_name: _Name | None = None
    password: _Password | None = None
    disabled: bool | None = None
    risk_level: RiskLevel | None = None
    # The user's account at the control plane's OIDC provider (its ``sub``); "" unlinks.
    oidc_subject: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    # The web console role: "admin", "reader", or "none" (no console access).
    console_role: Literal["admin", "reader", "none"] | None = None


class UserOut(msgspec.Struct):
    id: str
    upn: str
    display_name: str
    disabled: bool
    risk_level: str
    has_password: bool
    totp_enabled: bool
    groups: list[str]  # group ids
    created_at: datetime
    updated_at: datetime
    oidc_issuer: str | None = None  # the OIDC account the user signs in with (``iss``, ``sub``), once linked
    oidc_subject: str | None = None
    console_role: str | None = None  # "admin" or "reader" in the web console; None: no console access


# ---------------------------------------------------------------------------- user groups (admin)


class UserGroupCreate(_Request):
    name: _Name


class UserGroupUpdate(_Request):
    name: _Name


class UserGroupOut(msgspec.Struct):
    id: str
    name: str
    members: int
    created_at: datetime


class MemberAdd(_Request):
    user: _Ref  # user id or UPN


class MemberOut(msgspec.Struct):
    group_id: str
    group: str
    user_id: str
    upn: str


# ---------------------------------------------------------------------------- devices (admin, MDM)


class DeviceUpdate(_Request):
    """What an admin or an MDM reports; fields left out (or null) stay as they are."""

    compliant: bool | None = None
    os: _OsField | None = None
    os_version: _OsField | None = None
    name: _Name | None = None


class RevokeRequest(_Request):
    reason: _Reason = ""


class DeviceOut(msgspec.Struct):
    id: str
    user_id: str
    upn: str
    name: str
    os: str
    os_version: str
    compliant: bool
    cert_serial: str | None
    cert_not_after: datetime | None
    created_at: datetime
    last_seen: datetime | None
    revoked_at: datetime | None


# ---------------------------------------------------------------------------- sessions (admin)


class SessionOut(msgspec.Struct):
    id: str
    user_id: str
    device_id: str | None
    amr: list[str]
    auth_time: datetime
    created_at: datetime
    expires_at: datetime
    last_refresh_at: datetime | None
    revoked_at: datetime | None
    status: SessionStatus
