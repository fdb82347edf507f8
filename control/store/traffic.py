"""Traffic logs in the store: edges' records written in batches, read back with filters, aged
out, and summarised for application discovery.

Records arrive from edges (``POST /v1/node/traffic``, ``dataplane.contract.flowrecord.FlowRecord``)
and are inserted as they are, except ``edge``, which is always the name of the edge that
sent them, and NUL characters, stored as U+FFFD (PostgreSQL text cannot hold NUL, and the
client agent's HELLO or OPEN put text a client chose into a record). They are not
configuration and not audited.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, cast

import msgspec
from sqlalchemy import Select, case, delete, distinct, func, insert, or_, select
from sqlalchemy.orm import Session

from dataplane.contract.flowrecord import FlowRecord

from .models import TrafficLog, User

_INSERT = insert(TrafficLog.__table__)  # type: ignore[arg-type]
_RECORD = cast(msgspec.inspect.StructType, msgspec.inspect.type_info(FlowRecord))
_FIELDS = tuple(field.name for field in _RECORD.fields)
_TIMES = ("start", "end")
_TEXT = (*(field.name for field in _RECORD.fields if isinstance(field.type, msgspec.inspect.StrType)),
         "edge", "display_name")


def _too_long() -> tuple[tuple[str, int], ...]:
    """(field, column size) of the text fields a record may carry longer than their column."""
    out = []
    for field in _RECORD.fields:
        size = getattr(TrafficLog.__table__.c[field.name].type, "length", None)  # type: ignore[attr-defined]
        limit = getattr(field.type, "max_length", None)
        if size is not None and (limit is None or limit > size):
            out.append((field.name, size))
    return tuple(out)


_CUT = _too_long()


class _Plan(msgspec.Struct, frozen=True):
    """How a ``FlowRecord`` becomes one row of the INSERT for one dialect."""

    sql: str
    names: tuple[str, ...]  # the statement's bind names, in order
    positional: bool
    # Positions, in ``astuple(record) + (edge, display_name)``, of each bind's value.
    order: tuple[int, ...]
    cut: tuple[tuple[int, int], ...]  # (bind position, column size) of text that may be too long
    texts: Callable[[list[Any]], tuple[str, ...]]  # every text value of a row (its NUL check)
    text_at: tuple[int, ...]  # their bind positions
    times: tuple[tuple[int, Callable[[float], Any]], ...]  # (bind position, Unix seconds → bind value)


_PLANS: dict[str, _Plan] = {}


_SECONDS_TEXT: dict[int, str] = {}  # "YYYY-MM-DD HH:MM:SS" of recent whole seconds (a batch spans a few)
_SECONDS_TEXT_MAX = 4096


def _time_text(value: float) -> str:
    """SQLite's text form of a UTC time (``datetime.fromtimestamp(value, UTC).isoformat(" ",
    "microseconds")`` without its offset) at 0.6 µs instead of 1.5: the microseconds rounded as
    ``datetime`` rounds them (half to even), the seconds' text kept for the next records."""
    fraction, whole = math.modf(value)
    micro = round(fraction * 1e6)
    seconds = int(whole)
    if micro >= 1_000_000:
        micro -= 1_000_000
        seconds += 1
    elif micro < 0:
        micro += 1_000_000
        seconds -= 1
    prefix = _SECONDS_TEXT.get(seconds)
    if prefix is None:
        if len(_SECONDS_TEXT) >= _SECONDS_TEXT_MAX:
            _SECONDS_TEXT.clear()
        prefix = _SECONDS_TEXT[seconds] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{micro:06d}"


def _time_binder(processor: Callable[[Any], Any] | None) -> Callable[[float], Any]:
    """Unix seconds → the value the driver gets for a time column (its type's own conversion of
    the UTC datetime). Where that conversion is SQLite's text form, the text is made directly
    (``_time_text``, a sixth of the cost), after checking that both agree."""
    if processor is None:
        return lambda value: datetime.fromtimestamp(value, UTC)

    def typed(value: float) -> Any:
        return processor(datetime.fromtimestamp(value, UTC))

    samples = (0.0, 1_765_000_000.0, 1_765_000_000.5, 1_765_000_000.000001, 1_765_000_000.0000005,
               1_765_000_000.9999996, 32503679999.999999)
    return _time_text if all(typed(v) == _time_text(v) for v in samples) else typed


def _plan(dialect: Any) -> _Plan:
    """The INSERT of every column but ``id`` for ``dialect``, compiled once."""
    plan = _PLANS.get(dialect.name)
    if plan is None:
        columns = [c.name for c in TrafficLog.__table__.columns if c.name != "id"]  # type: ignore[attr-defined]
        compiled = _INSERT.compile(dialect=dialect, column_keys=columns)
        names = tuple(compiled.positiontup) if compiled.positional else tuple(compiled.binds)  # type: ignore[arg-type]
        source = {name: i for i, name in enumerate(_FIELDS)}
        source.update(edge=len(_FIELDS), display_name=len(_FIELDS) + 1)
        missing = set(names) - set(source)
        if missing:
            raise ValueError(f"traffic log columns {sorted(missing)} have no field in a flow record")
        processors = compiled._bind_processors  # noqa: SLF001 - the column types' own conversions
        at = {name: i for i, name in enumerate(names)}
        plan = _Plan(sql=str(compiled), names=names, positional=bool(compiled.positional),
                     order=tuple(source[name] for name in names),
                     cut=tuple((at[name], size) for name, size in _CUT),
                     texts=itemgetter(*(at[name] for name in _TEXT if name in at)),
                     text_at=tuple(at[name] for name in _TEXT if name in at),
                     times=tuple((at[name], _time_binder(processors.get(name))) for name in _TIMES))  # type: ignore[arg-type]
        _PLANS[dialect.name] = plan
    return plan


def insert_records(session: Session, edge: str, records: Iterable[FlowRecord]) -> int:
    """Store records from ``edge``; returns how many. ``edge`` replaces what a record says of
    itself, and each record gets its user's display name as the store has it now.

    Over-long text is cut to its column's size (a record is never refused for that). A web
    app makes one record per HTTP transaction, so this runs for every request an edge serves:
    the INSERT is compiled once per dialect, every row is the record's own tuple of values put
    in the statement's order, and the batch goes to the driver's executemany, not through
    SQLAlchemy's per-row parameter processing; only the times get their column type's
    conversion, and only the text fields a record may carry longer than their column are
    checked against it.
    """
    records = list(records)
    if not records:
        return 0
    user_ids = {r.user_id for r in records if r.user_id}
    display = dict(session.execute(select(User.id, User.display_name).where(User.id.in_(user_ids))).all()
                   ) if user_ids else {}
    connection = session.connection()
    plan = _plan(connection.dialect)
    pick = itemgetter(*plan.order)
    astuple = msgspec.structs.astuple
    cut, times, names, texts, text_at = plan.cut, plan.times, plan.names, plan.texts, plan.text_at
    params: list[Any] = []
    for record in records:
        values = list(pick(astuple(record) + (edge, display.get(record.user_id, ""))))
        for i, convert in times:
            value = values[i]
            if value is not None:
                values[i] = convert(value)
        for i, size in cut:
            if len(values[i]) > size:
                values[i] = values[i][:size]
        if "\x00" in "".join(texts(values)):  # rare: one check for the row, not one per field
            for i in text_at:
                values[i] = values[i].replace("\x00", "\ufffd")
        params.append(tuple(values) if plan.positional else dict(zip(names, values)))
    connection.exec_driver_sql(plan.sql, params)
    return len(records)


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
