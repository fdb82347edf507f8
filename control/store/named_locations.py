"""Named locations: a name for source networks (``10.0.0.0/8,2001:db8::/32``), for the ``locations``
condition of conditional-access policies.

Entries are stored in canonical form (``ipaddress.ip_network(strict=False)``: ``10.1.2.3/8``
is ``10.0.0.0/8``). Renaming a location renames it in the policies that use it; deleting one
that a policy uses is refused. Every change is configuration.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import change, record_change
from .config_version import lock_config
from .errors import StoreError
from .models import NamedLocation, utcnow
from .policies import policies_using_location, policy_state
from .values import refuse_taken, valid_name

MAX_LOCATION_ENTRIES = 1000


def location_cidrs(location: NamedLocation) -> list[str]:
    """The location's networks, in their stored (canonical) form and order."""
    return [c for c in location.cidrs.split(",") if c]


def _location_state(location: NamedLocation) -> dict[str, Any]:
    return {"id": location.id, "name": location.name, "cidrs": location_cidrs(location),
            "created_at": location.created_at.isoformat()}


def _cidrs(name: str, value: object) -> str:
    """``value`` (a list of CIDR strings) checked and in canonical comma-separated form."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise StoreError("invalid", f"named location {name!r}: cidrs must be a list of networks such as "
                                    f"['10.0.0.0/8', '2001:db8::/32']")
    if not value:
        raise StoreError("invalid", f"named location {name!r} needs at least one network")
    if len(value) > MAX_LOCATION_ENTRIES:
        raise StoreError("invalid", f"named location {name!r} has {len(value)} networks; at most "
                                    f"{MAX_LOCATION_ENTRIES} are allowed")
    seen: dict[str, int] = {}
    out = []
    for number, entry in enumerate(value, 1):
        if not isinstance(entry, str) or not entry.strip():
            raise StoreError("invalid", f"named location {name!r}: entry {number} ({entry!r}) must be a network "
                                        f"such as 10.0.0.0/8")
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise StoreError("invalid", f"named location {name!r}: entry {number} {entry.strip()!r} is not an IP "
                                        f"network (expected an address or a CIDR such as 10.0.0.0/8 or "
                                        f"2001:db8::/32)") from None
        text = str(network)
        if text in seen:
            raise StoreError("invalid", f"named location {name!r}: entry {number} {entry.strip()!r} is the same "
                                        f"network as entry {seen[text]} ({text})")
        seen[text] = number
        out.append(text)
    return ",".join(out)


def list_locations(session: Session) -> list[NamedLocation]:
    return list(session.scalars(select(NamedLocation).order_by(NamedLocation.name)))


def get_location(session: Session, name: str) -> NamedLocation:
    location = session.scalar(select(NamedLocation).where(NamedLocation.name == name))
    if location is None:
        raise StoreError("not_found", f"named location {name!r} does not exist")
    return location


@change
def create_location(session: Session, actor: str, name: str, cidrs: Sequence[str]) -> NamedLocation:
    """A named location: ``cidrs`` are IP networks (at most 1000), stored in canonical form."""
    lock_config(session)
    name = valid_name(name, "named location name")
    refuse_taken(session, NamedLocation.name, name, "named location")
    location = NamedLocation(name=name, cidrs=_cidrs(name, cidrs), created_at=utcnow())
    session.add(location)
    session.flush()
    record_change(session, actor, "named_location.create", "named_location", location.id, None,
                  _location_state(location), config=True)
    return location


@change
def update_location(session: Session, actor: str, name: str, *, new_name: str | None = None,
                    cidrs: Sequence[str] | None = None) -> NamedLocation:
    """Rename a named location and/or replace its networks (None: unchanged).

    A rename is carried into the conditions of every policy naming the location (each such
    policy gets its own audit record). A change that changes nothing is not recorded.
    """
    lock_config(session)
    location = get_location(session, name)
    before = _location_state(location)
    old_name = location.name
    if new_name is not None:
        new_name = valid_name(new_name, "named location name")
        if new_name != location.name:
            refuse_taken(session, NamedLocation.name, new_name, "named location")
            location.name = new_name
    if cidrs is not None:
        location.cidrs = _cidrs(location.name, cidrs)
    session.flush()
    after = _location_state(location)
    if after == before:
        return location
    record_change(session, actor, "named_location.update", "named_location", location.id, before, after, config=True)
    if location.name != old_name:
        for policy in policies_using_location(session, old_name):
            policy_before = policy_state(session, policy)
            conditions = dict(policy.conditions)
            conditions["locations"] = [location.name if n == old_name else n for n in conditions["locations"]]
            policy.conditions = conditions
            policy.updated_at = utcnow()
            session.flush()
            record_change(session, actor, "access_policy.update", "access_policy", policy.id, policy_before,
                          policy_state(session, policy), config=True)
    return location


@change
def delete_location(session: Session, actor: str, name: str) -> None:
    """Delete a named location; refused (``conflict``, naming them) while policies use it."""
    lock_config(session)
    location = get_location(session, name)
    users = policies_using_location(session, location.name)
    if users:
        names = ", ".join(repr(p.name) for p in users)
        raise StoreError("conflict", f"named location {location.name!r} is used by "
                                     f"polic{'ies' if len(users) > 1 else 'y'} {names}: remove it from "
                                     f"{'their' if len(users) > 1 else 'its'} conditions first")
    before = _location_state(location)
    session.delete(location)
    session.flush()
    record_change(session, actor, "named_location.delete", "named_location", before["id"], before, None, config=True)
