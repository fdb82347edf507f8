"""Traffic logs in the store: edges' records written in batches, read back with filters, aged out.

Records arrive from edges (``POST /v1/node/traffic``, ``dataplane.trafficlog.FlowRecord``)
and are inserted as they are, except ``edge``, which is always the name of the edge that
sent them. They are not configuration and not audited.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from .models import TrafficLog

_TEXT_LIMITS = {column.name: column.type.length for column in TrafficLog.__table__.columns  # type: ignore[attr-defined]
                if getattr(column.type, "length", None)}


def _moment(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def insert_records(session: Session, edge: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Store records from ``edge`` (dicts with ``FlowRecord``'s fields); returns how many.

    Over-long text is cut to its column's size (a record is never refused for that).
    """
    rows = []
    for record in records:
        row = dict(record)
        row["edge"] = edge
        row["start"] = _moment(row["start"])
        row["end"] = _moment(row.get("end"))
        for name, limit in _TEXT_LIMITS.items():
            value = row.get(name)
            if isinstance(value, str) and len(value) > limit:
                row[name] = value[:limit]
        rows.append(row)
    if rows:
        session.execute(insert(TrafficLog), rows)
    return len(rows)
