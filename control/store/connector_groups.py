"""Connector groups: the connectors an application's flows go through (``default`` made by the first migration)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .config_version import lock_config
from .errors import StoreError
from .models import ConnectorGroup, utcnow
from .values import refuse_taken, valid_name


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


@change
def create_group(session: Session, actor: str, name: str, region: str = "") -> ConnectorGroup:
    lock_config(session)
    name = valid_name(name, "connector group name", 100)
    refuse_taken(session, ConnectorGroup.name, name, "connector group")
    group = ConnectorGroup(name=name, region=region.strip(), is_default=False, created_at=utcnow())
    session.add(group)
    session.flush()
    record_change(session, actor, "connector_group.create", "connector_group", group.id, None, row_state(group),
                  config=True)
    return group
