"""Connector groups: the connectors an application's flows go through (``default`` made by the first migration),
and the networks those connectors may (``allowed_addresses``) and must never (``denied_addresses``) dial.

The dial lists are checked with ``dataplane.contract.dialrules.parse_networks`` (addresses or
CIDR networks, no host bits, no duplicates, at most 256 each) and stored in canonical form;
the snapshot carries them to the group's connectors, which apply them to every address they
are about to connect to. Every change is configuration and audited.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from dataplane.contract.dialrules import parse_networks

from .audit import change, record_change, row_state
from .config_version import lock_config
from .errors import StoreError
from .models import ConnectorGroup, utcnow
from .values import refuse_taken, valid_name, valid_text

MAX_REGION = 100


def list_groups(session: Session) -> list[ConnectorGroup]:
    return list(session.scalars(select(ConnectorGroup).order_by(ConnectorGroup.name)))


def get_group(session: Session, name: str) -> ConnectorGroup:
    group = session.scalar(select(ConnectorGroup).where(ConnectorGroup.name == name))
    if group is None:
        raise StoreError("not_found", f"connector group {name!r} does not exist")
    return group


def default_group(session: Session) -> ConnectorGroup:
    """The group new connectors join (created by the first migration)."""
    return session.scalars(select(ConnectorGroup).where(ConnectorGroup.is_default)).one()


def group_or_default(session: Session, name: str | None) -> ConnectorGroup:
    """The group named ``name``; the default group for None."""
    return default_group(session) if name is None else get_group(session, name)


def allowed_addresses(group: ConnectorGroup) -> list[str]:
    """The networks the group's connectors may dial (empty: any), in stored (canonical) form and order."""
    return [n for n in group.allowed_addresses.split(",") if n]


def denied_addresses(group: ConnectorGroup) -> list[str]:
    """The networks the group's connectors never dial, in stored (canonical) form and order."""
    return [n for n in group.denied_addresses.split(",") if n]


def _networks(name: str, value: object, what: str) -> str:
    try:
        return ",".join(parse_networks(value, what))
    except ValueError as exc:
        raise StoreError("invalid", f"connector group {name!r}: {exc}") from None


@change
def create_group(session: Session, actor: str, name: str, region: str = "", *,
                 allowed: Sequence[str] = (), denied: Sequence[str] = ()) -> ConnectorGroup:
    lock_config(session)
    name = valid_name(name, "connector group name", 100)
    refuse_taken(session, ConnectorGroup.name, name, "connector group")
    group = ConnectorGroup(name=name, region=valid_text(region, "region", MAX_REGION), is_default=False,
                           created_at=utcnow(), allowed_addresses=_networks(name, allowed, "allowed_addresses"),
                           denied_addresses=_networks(name, denied, "denied_addresses"))
    session.add(group)
    session.flush()
    record_change(session, actor, "connector_group.create", "connector_group", group.id, None, row_state(group),
                  config=True)
    return group


@change
def update_group(session: Session, actor: str, name: str, *, region: str | None = None,
                 allowed: Sequence[str] | None = None, denied: Sequence[str] | None = None) -> ConnectorGroup:
    """Change a group's region and/or replace its dial lists (None: unchanged; an empty list clears one).

    A change that changes nothing is not recorded (no audit record, no new configuration)."""
    lock_config(session)
    group = get_group(session, name)
    before = row_state(group)
    if region is not None:
        group.region = valid_text(region, "region", MAX_REGION)
    if allowed is not None:
        group.allowed_addresses = _networks(group.name, allowed, "allowed_addresses")
    if denied is not None:
        group.denied_addresses = _networks(group.name, denied, "denied_addresses")
    session.flush()
    after = row_state(group)
    if after != before:
        record_change(session, actor, "connector_group.update", "connector_group", group.id, before, after,
                      config=True)
    return group
