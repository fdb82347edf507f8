"""Applications and their segments: what private destinations exist and which connector group reaches them.

An application is ``per_app`` (its segments must not overlap another per-app application's)
or ``quick_access`` (at most one; its segments may overlap per-app ones, which then win at
the edge). Segments are given as in an application file (``SegmentInput``) and parsed with
the data plane's rules (``segments.parse_segments``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dataplane.contract import apps

from .audit import change, record_change, row_state
from .config_version import lock_config
from .connector_groups import get_group, group_or_default
from .errors import StoreError
from .models import APP_KINDS, AccessPolicy, Application, Segment, WebApplication, utcnow
from .segments import OverlapIndex, canonical_ports, parse_segments, ports_from_text
from .values import names_by_id, refuse_taken, valid_name

SegmentInput = Mapping[str, Any]  # {"destination": ..., "ports": ..., "protocol": ...} as in an application file


def _app_state(app: Application) -> dict[str, Any]:
    return {**row_state(app), "connector_group": app.connector_group.name,
            "segments": [_segment_state(s) for s in app.segments]}


def _segment_state(segment: Segment) -> dict[str, Any]:
    return {"id": segment.id, "destination": segment.destination, "kind": segment.kind, "ports": segment.ports,
            "protocol": segment.protocol}


def list_applications(session: Session) -> list[Application]:
    return list(session.scalars(select(Application).order_by(Application.name)))


def get_application(session: Session, name: str) -> Application:
    app = session.scalar(select(Application).where(Application.name == name))
    if app is None:
        raise StoreError("not_found", f"application {name!r} does not exist")
    return app


def application_names_of(session: Session, ids: Iterable[int]) -> dict[int, str]:
    """The names of the applications with these ids (ids of deleted applications left out)."""
    return names_by_id(session, Application.id, Application.name, ids)


def _stored(app_name: str, segment: Segment) -> apps.Segment:
    return apps.Segment(app=app_name, destination=segment.destination, kind=segment.kind,
                        ports=ports_from_text(segment.ports), protocol=segment.protocol)


def _check_overlaps(session: Session, app: Application | None, segments: Iterable[apps.Segment]) -> None:
    """Refuse segments of a per-app application that overlap another per-app application's."""
    others = (select(Application.name, Segment.destination, Segment.kind, Segment.ports, Segment.protocol)
              .join_from(Segment, Application).where(Application.kind == "per_app"))
    if app is not None:
        others = others.where(Application.id != app.id)
    rows = session.execute(others.order_by(Application.name, Segment.id))
    OverlapIndex(apps.Segment(app=name, destination=destination, kind=kind, ports=ports_from_text(ports),
                              protocol=protocol)
                 for name, destination, kind, ports, protocol in rows).check(segments)


def _refuse_web(session: Session, app: Application) -> None:
    """A web app reaches one backend (its internal URL) and has no segments."""
    if session.get(WebApplication, app.id) is not None:
        raise StoreError("invalid", f"application {app.name!r} is a web app: it has no segments (its backend is "
                                    "its internal URL: `ferryman admin webapps update`)")


def _segment_rows(segments: Sequence[apps.Segment]) -> list[Segment]:
    return [Segment(destination=s.destination, kind=s.kind, ports=canonical_ports(s.ports), protocol=s.protocol)
            for s in segments]


@change
def create_application(session: Session, actor: str, name: str, *, kind: str = "per_app",
                       connector_group: str | None = None, segments: Sequence[SegmentInput] = ()) -> Application:
    """A new application (in the default connector group unless ``connector_group`` names one).

    ``kind`` is ``per_app`` or ``quick_access`` (at most one; its segments may overlap
    per-app ones, which then win at the edge). Segments are as in an application file.
    """
    lock_config(session)
    name = valid_name(name, "application name")
    if kind not in APP_KINDS:
        raise StoreError("invalid", f"application kind {kind!r} is not one of {', '.join(APP_KINDS)}")
    refuse_taken(session, Application.name, name, "application")
    if kind == "quick_access":
        existing = session.scalar(select(Application.name).where(Application.kind == "quick_access"))
        if existing is not None:
            raise StoreError("conflict", f"there is already a quick access application: {existing!r}")
    group = group_or_default(session, connector_group)
    parsed = parse_segments(name, segments)
    if kind == "per_app":
        _check_overlaps(session, None, parsed)
    now = utcnow()
    app = Application(name=name, kind=kind, connector_group=group, segments=_segment_rows(parsed),
                      created_at=now, updated_at=now)
    session.add(app)
    session.flush()
    record_change(session, actor, "application.create", "application", app.id, None, _app_state(app), config=True)
    return app


@change
def update_application(session: Session, actor: str, name: str, *, new_name: str | None = None,
                       connector_group: str | None = None,
                       segments: Sequence[SegmentInput] | None = None) -> Application:
    """Rename, move to another connector group and/or replace all segments (None: unchanged).

    The kind of an application is fixed when it is created. A change that changes nothing
    is not recorded.
    """
    lock_config(session)
    app = get_application(session, name)
    before = _app_state(app)
    if new_name is not None:
        new_name = valid_name(new_name, "application name")
        if new_name != app.name:
            refuse_taken(session, Application.name, new_name, "application")
            app.name = new_name
    if connector_group is not None:
        app.connector_group = get_group(session, connector_group)
    if segments is not None:
        if segments:
            _refuse_web(session, app)
        parsed = parse_segments(app.name, segments)
        current = [_stored(app.name, s) for s in app.segments]
        if list(parsed) != current:
            if app.kind == "per_app":
                _check_overlaps(session, app, parsed)
            app.segments = _segment_rows(parsed)
    session.flush()
    if _app_state(app) == before:
        return app
    app.updated_at = utcnow()
    session.flush()
    record_change(session, actor, "application.update", "application", app.id, before, _app_state(app), config=True)
    return app


@change
def delete_application(session: Session, actor: str, name: str) -> None:
    """Delete an application (its segments and assignments go with it).

    Refused (``conflict``, naming them) while conditional-access policies target it: dropping
    it from a policy's list silently would widen that policy (an empty list means every
    application).
    """
    lock_config(session)
    app = get_application(session, name)
    targeting = [p for p in session.scalars(select(AccessPolicy).order_by(AccessPolicy.name))
                 if app.id in p.applications]
    if targeting:
        names = ", ".join(repr(p.name) for p in targeting)
        which = "those policies" if len(targeting) > 1 else "that policy"
        raise StoreError("conflict", f"application {app.name!r} is targeted by "
                                     f"polic{'ies' if len(targeting) > 1 else 'y'} {names}: remove the application "
                                     f"from {which} (or delete {which}) first")
    before = _app_state(app)
    session.delete(app)
    session.flush()
    record_change(session, actor, "application.delete", "application", before["id"], before, None, config=True)


@change
def add_segment(session: Session, actor: str, app_name: str, segment: SegmentInput) -> Segment:
    """Append one segment to an application (checked like a full list: limit, duplicates, overlaps)."""
    lock_config(session)
    app = get_application(session, app_name)
    _refuse_web(session, app)
    existing: list[SegmentInput] = [{"destination": s.destination, "ports": s.ports, "protocol": s.protocol}
                                    for s in app.segments]
    new = parse_segments(app.name, [*existing, segment])[-1]
    if app.kind == "per_app":
        _check_overlaps(session, app, [new])
    (row,) = _segment_rows([new])
    app.segments.append(row)
    app.updated_at = utcnow()
    session.flush()
    record_change(session, actor, "segment.create", "segment", row.id, None,
                  {"application": app.name, **_segment_state(row)}, config=True)
    return row


@change
def remove_segment(session: Session, actor: str, app_name: str, segment_id: int) -> None:
    lock_config(session)
    app = get_application(session, app_name)
    row = next((s for s in app.segments if s.id == segment_id), None)
    if row is None:
        raise StoreError("not_found", f"application {app.name!r} has no segment {segment_id}")
    before = {"application": app.name, **_segment_state(row)}
    app.segments.remove(row)
    app.updated_at = utcnow()
    session.flush()
    record_change(session, actor, "segment.delete", "segment", segment_id, before, None, config=True)
