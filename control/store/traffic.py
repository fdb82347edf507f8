"""Traffic logs in the store: edges' records written in batches, read back with filters, aged
out, and summarised for application discovery.

Records arrive from edges (``POST /v1/node/traffic``, ``dataplane.contract.flowrecord.FlowRecord``)
and are inserted as they are, except ``edge``, which is always the name of the edge that
sent them. They are not configuration and not audited.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import msgspec
from sqlalchemy import Select, case, delete, distinct, func, insert, or_, select
from sqlalchemy.orm import Session

from .models import TrafficLog, User

_TEXT_LIMITS = {column.name: column.type.length for column in TrafficLog.__table__.columns  # type: ignore[attr-defined]
                if getattr(column.type, "length", None)}
_TEXT_ITEMS = tuple(_TEXT_LIMITS.items())
_INSERT = insert(TrafficLog.__table__)  # type: ignore[arg-type]


def _moment(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


_Compiled = tuple[str, tuple[str, ...], tuple[tuple[int, Any], ...], bool, tuple[tuple[str, Any], ...]]
_COMPILED: dict[tuple[str, tuple[str, ...]], _Compiled] = {}


def _compiled(dialect: Any, keys: tuple[str, ...]) -> _Compiled:
    """The INSERT of ``keys`` for ``dialect``, compiled once: (SQL, bind names in order, (position,
    bind conversion) of the columns that have one, positional, the scalar defaults of the
    columns the statement names that ``keys`` lacks)."""
    cached = _COMPILED.get((dialect.name, keys))
    if cached is None:
        compiled = _INSERT.compile(dialect=dialect, column_keys=list(keys))
        names = tuple(compiled.positiontup) if compiled.positional else tuple(compiled.binds)  # type: ignore[arg-type]
        processors = compiled._bind_processors  # noqa: SLF001 - the column types' own conversions
        convert = tuple((i, processors[n]) for i, n in enumerate(names) if processors.get(n) is not None)
        fill = []
        for name in names:
            if name not in keys:
                default = TrafficLog.__table__.c[name].default  # type: ignore[attr-defined]
                if default is None or not default.is_scalar:
                    raise ValueError(f"traffic record column {name!r} has no value and no plain default")
                fill.append((name, default.arg))
        cached = (str(compiled), names, convert, bool(compiled.positional), tuple(fill))
        if len(_COMPILED) < 64:  # one per record shape (every record of one version has the same)
            _COMPILED[(dialect.name, keys)] = cached
    return cached


def insert_records(session: Session, edge: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Store records from ``edge`` (dicts with ``FlowRecord``'s fields); returns how many. Each
    gets its user's display name as the store has it now.

    Over-long text is cut to its column's size (a record is never refused for that). A web
    app makes one record per HTTP transaction, so this runs for every request an edge serves:
    the INSERT is compiled once per record shape, and the batch goes to the driver's
    executemany with the columns' own bind conversions applied here (only the columns that
    have one), not through SQLAlchemy's per-row parameter processing.
    """
    limits = _TEXT_ITEMS
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    records = list(records)
    user_ids = {r.get("user_id") for r in records if r.get("user_id")}
    display = dict(session.execute(select(User.id, User.display_name).where(User.id.in_(user_ids))).all()
                   ) if user_ids else {}
    for record in records:
        row = dict(record)
        row["display_name"] = display.get(row.get("user_id") or "", "")
        row["edge"] = edge
        row["start"] = _moment(row["start"])
        row["end"] = _moment(row.get("end"))
        for name, limit in limits:
            value = row.get(name)
            if value.__class__ is str and len(value) > limit:
                row[name] = value[:limit]
        groups.setdefault(tuple(row), []).append(row)
    connection = session.connection()
    stored = 0
    for keys, rows in groups.items():
        sql, names, convert, positional, fill = _compiled(connection.dialect, keys)
        pick = itemgetter(*names)
        params: list[Any] = []
        for row in rows:
            for name, value in fill:
                row[name] = value
            values = list(pick(row))
            for i, fn in convert:
                values[i] = fn(values[i])
            params.append(tuple(values) if positional else dict(zip(names, values)))
        connection.exec_driver_sql(sql, params)
        stored += len(rows)
    return stored


# ---------------------------------------------------------------------------- reading


class TrafficFilter(msgspec.Struct, kw_only=True):
    """Which records: a time range on ``start`` and exact matches (``user``: UPN or user id;
    ``connector``: name or id; ``device``: device id; ``reason``: the refusal's reason code)."""

    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    app: str | None = None
    action: str | None = None
    connector: str | None = None
    device: str | None = None
    reason: str | None = None


def _where(query: Select[Any], f: TrafficFilter) -> Select[Any]:
    if f.since is not None:
        query = query.where(TrafficLog.start >= f.since)
    if f.until is not None:
        query = query.where(TrafficLog.start < f.until)
    if f.user:
        query = query.where(or_(TrafficLog.upn == f.user.lower(), TrafficLog.user_id == f.user))
    if f.app:
        query = query.where(TrafficLog.application == f.app)
    if f.action:
        query = query.where(TrafficLog.action == f.action)
    if f.connector:
        query = query.where(or_(TrafficLog.connector_name == f.connector, TrafficLog.connector_id == f.connector))
    if f.device:
        query = query.where(TrafficLog.device_id == f.device)
    if f.reason:
        query = query.where(TrafficLog.reason_code == f.reason)
    return query


def query_records(session: Session, f: TrafficFilter, *, limit: int = 100, before_id: int | None = None
                  ) -> list[TrafficLog]:
    """Matching records, newest first; ``before_id`` continues a previous page."""
    query = _where(select(TrafficLog), f)
    if before_id is not None:
        query = query.where(TrafficLog.id < before_id)
    return list(session.scalars(query.order_by(TrafficLog.id.desc()).limit(limit)))


def records_after(session: Session, f: TrafficFilter, after_id: int, limit: int = 1000) -> list[TrafficLog]:
    """Matching records with an id above ``after_id``, oldest first (pages of an export)."""
    query = _where(select(TrafficLog), f).where(TrafficLog.id > after_id)
    return list(session.scalars(query.order_by(TrafficLog.id).limit(limit)))


def delete_older_than(session: Session, cutoff: datetime) -> int:
    """Retention: remove records that started before ``cutoff``; returns how many."""
    result = session.execute(delete(TrafficLog).where(TrafficLog.start < cutoff))
    return int(result.rowcount or 0)


# ---------------------------------------------------------------------------- application discovery


class Discovered(msgspec.Struct):
    """A destination reached through quick access, with how much it was used."""

    destination: str
    port: int
    protocol: str
    users: int
    devices: int
    flows: int
    bytes: int
    first_seen: datetime
    last_seen: datetime


def discovery(session: Session, since: datetime | None = None, limit: int = 500) -> list[Discovered]:
    """Destinations used through the quick access application (allowed or report-only flows),
    busiest first: the candidates for per-app applications."""
    destination = case((TrafficLog.destination_fqdn != "", TrafficLog.destination_fqdn),
                       else_=TrafficLog.destination_ip)
    query = (select(destination, TrafficLog.destination_port, TrafficLog.transport,
                    func.count(distinct(TrafficLog.user_id)), func.count(distinct(TrafficLog.device_id)),
                    func.count(), func.sum(TrafficLog.bytes_sent + TrafficLog.bytes_received),
                    func.min(TrafficLog.start), func.max(TrafficLog.start))
             .where(TrafficLog.application_kind == "quick_access", TrafficLog.action.in_(("allow", "report")))
             .group_by(destination, TrafficLog.destination_port, TrafficLog.transport)
             .order_by(func.count().desc(), destination, TrafficLog.destination_port).limit(limit))
    if since is not None:
        query = query.where(TrafficLog.start >= since)
    return [Discovered(destination=d, port=p, protocol=t, users=u, devices=dv, flows=n, bytes=int(b or 0),
                       first_seen=first, last_seen=last)
            for d, p, t, u, dv, n, b, first, last in session.execute(query)]
