"""The configuration version: one number, bumped by every change to what nodes are configured from.

Edges and connectors follow it (``control.snapshot``): a new version means a new snapshot.
Changes to configuration first take ``lock_config``, so they are serialised on PostgreSQL
too (SQLite writers are serial anyway) and a check such as the segment overlap check sees
every committed row. ``audit.record_change(..., config=True)`` bumps it; on PostgreSQL the bump also notifies
every control-plane node (``notify.announce``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import ConfigVersion
from .notify import announce


def config_version(session: Session) -> int:
    """The current configuration version (0 on a new database)."""
    return session.execute(select(ConfigVersion.version).where(ConfigVersion.id == 1)).scalar_one()


def version_row(session: Session) -> ConfigVersion:
    """The one ``config_version`` row: the version and when it last changed."""
    return session.get_one(ConfigVersion, 1)


def lock_config(session: Session) -> None:
    """Wait for other configuration changes to finish (PostgreSQL row lock; SQLite writers are serial)."""
    session.execute(select(ConfigVersion.id).where(ConfigVersion.id == 1).with_for_update())


def bump(session: Session, now: datetime) -> None:
    """One more configuration version, changed at ``now`` (in the caller's transaction); every
    control-plane node sharing a PostgreSQL database is told once it commits (``notify``)."""
    session.execute(update(ConfigVersion).where(ConfigVersion.id == 1)
                    .values(version=ConfigVersion.version + 1, changed_at=now))
    announce(session)
