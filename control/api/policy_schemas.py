"""Request and response bodies of the access routes (``policies.py``): application assignments,
named locations and conditional-access policies (msgspec Structs; Litestar validates and
documents them).

Request bodies refuse unknown fields, as in ``schemas.py``. Targets go in as people write
them (application names, user ids or UPNs, group ids or names) and come back with both the
id and the name: ``{"id": ..., "upn": ...}``; a name is null when that user, group or
application was deleted since.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from .schemas import _Request

# Checked by the store (whose refusal lists the choices), documented here.
PolicyState = Annotated[str, msgspec.Meta(description="on, off or report_only (evaluated and logged, never denies)",
                                          examples=["on"])]
PolicyGrant = Annotated[str, msgspec.Meta(description="block, require_mfa or require_compliant_device",
                                          examples=["require_mfa"])]


# ---------------------------------------------------------------------------- references


class UserRef(msgspec.Struct):
    id: str
    upn: str | None


class GroupRef(msgspec.Struct):
    id: str
    name: str | None


class AppRef(msgspec.Struct):
    id: int
    name: str | None


# ---------------------------------------------------------------------------- assignments


class AssignmentIn(_Request):
    """Exactly one of ``user`` (a user id or UPN) and ``group`` (a group id or name)."""

    user: str | None = None
    group: str | None = None


class AssignmentOut(msgspec.Struct):
    """One assignment: ``user`` or ``group`` is set, the other is null."""

    id: int
    application: str
    user: UserRef | None
    group: GroupRef | None


# ---------------------------------------------------------------------------- named locations


class NamedLocationCreate(_Request):
    """``cidrs``: IP networks or addresses (``10.0.0.0/8``, ``2001:db8::/32``, ``198.51.100.7``), at most 1000."""

    name: str
    cidrs: list[str]


class NamedLocationUpdate(_Request):
    """Fields left out (or null) stay as they are; ``cidrs`` replaces every network. A new
    ``name`` is carried into the policies that use the location."""

    name: str | None = None
    cidrs: list[str] | None = None


class NamedLocationOut(msgspec.Struct):
    """``cidrs`` in canonical form; ``policies``: the names of the policies whose conditions use it."""

    id: int
    name: str
    cidrs: list[str]
    policies: list[str]
    created_at: datetime


# ---------------------------------------------------------------------------- policies


class ConditionsIn(_Request):
    """When a policy applies; every condition given must hold. Left out or null: not checked.

    - ``locations``: the flow's source is in one of these named locations;
    - ``device_os``: the device's OS is one of these (case-insensitive);
    - ``user_risk_at_least``: ``low``, ``medium`` or ``high``;
    - ``signin_older_than``: the sign-in is older than this many seconds (0 to 31536000).
    """

    locations: list[str] | None = None
    device_os: list[str] | None = None
    user_risk_at_least: str | None = None
    signin_older_than: int | None = None


class ConditionsOut(msgspec.Struct, omit_defaults=True):
    """The conditions that are set (an empty object: the policy applies unconditionally)."""

    locations: list[str] = []
    device_os: list[str] = []
    user_risk_at_least: str | None = None
    signin_older_than: int | None = None


class PolicyCreate(_Request):
    """A conditional-access policy. ``applications``: names (empty: every application);
    ``users``: ids or UPNs and ``groups``: ids or names (both empty: every user)."""

    name: str
    grant: PolicyGrant
    state: PolicyState = "on"
    applications: list[str] = []
    users: list[str] = []
    groups: list[str] = []
    conditions: ConditionsIn | None = None


class PolicyUpdate(_Request):
    """Fields left out (or null) stay as they are; a list replaces the whole list and
    ``conditions`` replaces every condition (``{}`` clears them)."""

    name: str | None = None
    grant: PolicyGrant | None = None
    state: PolicyState | None = None
    applications: list[str] | None = None
    users: list[str] | None = None
    groups: list[str] | None = None
    conditions: ConditionsIn | None = None


class PolicyOut(msgspec.Struct):
    id: int
    name: str
    state: str
    grant: str
    applications: list[AppRef]
    users: list[UserRef]
    groups: list[GroupRef]
    conditions: ConditionsOut
    created_at: datetime
    updated_at: datetime
