"""The store's service layer: every read and change the admin API, the CLI and registration make.

Every function works inside the caller's transaction (``Store.begin()``) and never commits,
so a caller can make several changes atomically (``ferryman admin apply``). Every change
takes an ``actor`` (who: ``admin-key:<name>``, ``connector:<id>``, ...) and writes an
``AuditRecord`` with the object's state before and after, in the same transaction. A change
to what nodes are configured from (applications, segments, connector groups, connectors,
edges, DNS suffixes, revocations) also bumps ``ConfigVersion``; those functions first lock
the ``config_version`` row, so configuration changes are serialised on PostgreSQL too and
the overlap check sees every committed segment. Each change runs in a savepoint: when it is
refused (``StoreError``, with a precise message and a ``code``) it leaves nothing behind,
and the caller's transaction stays usable.

Secrets: admin keys and registration tokens are 32 random bytes (``secrets``), handed out
once in plain text and stored as their SHA-256. A slow password hash (argon2) protects
guessable secrets; for 256-bit random tokens a single SHA-256 is as strong and keeps
verifying a key on every API request cheap.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import inspect, select, update
from sqlalchemy.orm import Session

from dataplane.contract import apps

from .errors import StoreError
from .models import (
    APP_KINDS,
    FAIL_MODES,
    TOKEN_ROLES,
    AccessPolicy,
    AdminKey,
    Application,
    AuditRecord,
    ConfigVersion,
    Connector,
    ConnectorGroup,
    DnsSuffix,
    Edge,
    ForwardingProfile,
    IssuedCertificate,
    RegistrationToken,
    Revocation,
    Segment,
    utcnow,
)
from .segments import OverlapIndex, canonical_ports, parse_segments, ports_from_text

ADMIN_KEY_PREFIX = "fmk_"
REGISTRATION_TOKEN_PREFIX = "fmr_"
DEFAULT_TOKEN_TTL = timedelta(hours=24)
# ``AdminKey.last_used_at`` is written at most this often per key (not on every request).
LAST_USED_RESOLUTION = timedelta(minutes=1)
_MAX_NAME = 200
_SECRET_COLUMNS = frozenset({"key_hash", "token_hash"})
_A_ROLE = {"connector": "a connector", "edge": "an edge"}

SegmentInput = Mapping[str, Any]  # {"destination": ..., "ports": ..., "protocol": ...} as in an application file

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _change(fn: Callable[Concatenate[Session, _P], _R]) -> Callable[Concatenate[Session, _P], _R]:
    """Run a change in a savepoint, so that a refused change leaves nothing behind."""

    @functools.wraps(fn)
    def run(session: Session, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with session.begin_nested():
            return fn(session, *args, **kwargs)

    return run


# ---------------------------------------------------------------------------- audit, config version


def config_version(session: Session) -> int:
    """The current configuration version (0 on a new database)."""
    return session.execute(select(ConfigVersion.version).where(ConfigVersion.id == 1)).scalar_one()


def list_audit(session: Session, limit: int = 100, object_type: str | None = None) -> list[AuditRecord]:
    """The latest audit records, newest first."""
    query = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if object_type is not None:
        query = query.where(AuditRecord.object_type == object_type)
    return list(session.scalars(query))


def lock_config(session: Session) -> None:
    """Wait for other configuration changes to finish (see ``_lock_config``); for callers outside this module."""
    _lock_config(session)


def _lock_config(session: Session) -> None:
    """Wait for other configuration changes to finish (PostgreSQL row lock; SQLite writers are serial)."""
    session.execute(select(ConfigVersion.id).where(ConfigVersion.id == 1).with_for_update())


def _record(session: Session, actor: str, action: str, object_type: str, object_id: object,
            before: dict[str, Any] | None, after: dict[str, Any] | None, *, config: bool) -> None:
    """Write the audit record of a change; ``config``: also bump the configuration version."""
    if not isinstance(actor, str) or not actor.strip():
        raise StoreError("invalid", "every change needs an actor (who makes it)")
    now = utcnow()
    session.add(AuditRecord(at=now, actor=actor.strip(), action=action, object_type=object_type,
                            object_id=str(object_id), before=before, after=after))
    if config:
        session.execute(update(ConfigVersion).where(ConfigVersion.id == 1)
                        .values(version=ConfigVersion.version + 1, changed_at=now))
    session.flush()


def _state(obj: object) -> dict[str, Any]:
    """JSON-ready column values of a row (secret hashes left out), for audit records."""
    out: dict[str, Any] = {}
    for attr in inspect(obj).mapper.column_attrs:
        if attr.key in _SECRET_COLUMNS:
            continue
        value = getattr(obj, attr.key)
        out[attr.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


def _app_state(app: Application) -> dict[str, Any]:
    return {**_state(app), "connector_group": app.connector_group.name,
            "segments": [_segment_state(s) for s in app.segments]}


def _segment_state(segment: Segment) -> dict[str, Any]:
    return {"id": segment.id, "destination": segment.destination, "kind": segment.kind, "ports": segment.ports,
            "protocol": segment.protocol}


def _name(value: object, what: str, limit: int = _MAX_NAME) -> str:
    """``value`` stripped; refused unless a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise StoreError("invalid", f"{what} must be a non-empty string")
    name = value.strip()
    if len(name) > limit:
        raise StoreError("invalid", f"{what} {name[:20]!r}... is longer than {limit} characters")
    return name


def _now(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise StoreError("invalid", "times given to the store must be timezone-aware")
    return now


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _serial_text(serial: int) -> str:
    if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
        raise StoreError("invalid", f"certificate serial {serial!r} must be a positive integer")
    return format(serial, "x")


# ---------------------------------------------------------------------------- connector groups


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


@_change
def create_group(session: Session, actor: str, name: str, region: str = "") -> ConnectorGroup:
    _lock_config(session)
    name = _name(name, "connector group name", 100)
    if session.scalar(select(ConnectorGroup.id).where(ConnectorGroup.name == name)) is not None:
        raise StoreError("conflict", f"connector group {name!r} already exists")
    group = ConnectorGroup(name=name, region=region.strip(), is_default=False, created_at=utcnow())
    session.add(group)
    session.flush()
    _record(session, actor, "connector_group.create", "connector_group", group.id, None, _state(group), config=True)
    return group


def _group_or_default(session: Session, name: str | None) -> ConnectorGroup:
    return default_group(session) if name is None else get_group(session, name)


# ---------------------------------------------------------------------------- applications and segments


def list_applications(session: Session) -> list[Application]:
    return list(session.scalars(select(Application).order_by(Application.name)))


def get_application(session: Session, name: str) -> Application:
    app = session.scalar(select(Application).where(Application.name == name))
    if app is None:
        raise StoreError("not_found", f"application {name!r} does not exist")
    return app


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


def _segment_rows(segments: Sequence[apps.Segment]) -> list[Segment]:
    return [Segment(destination=s.destination, kind=s.kind, ports=canonical_ports(s.ports), protocol=s.protocol)
            for s in segments]


@_change
def create_application(session: Session, actor: str, name: str, *, kind: str = "per_app",
                       connector_group: str | None = None, segments: Sequence[SegmentInput] = ()) -> Application:
    """A new application (in the default connector group unless ``connector_group`` names one).

    ``kind`` is ``per_app`` or ``quick_access`` (at most one; its segments may overlap
    per-app ones, which then win at the edge). Segments are as in an application file.
    """
    _lock_config(session)
    name = _name(name, "application name")
    if kind not in APP_KINDS:
        raise StoreError("invalid", f"application kind {kind!r} is not one of {', '.join(APP_KINDS)}")
    if session.scalar(select(Application.id).where(Application.name == name)) is not None:
        raise StoreError("conflict", f"application {name!r} already exists")
    if kind == "quick_access":
        existing = session.scalar(select(Application.name).where(Application.kind == "quick_access"))
        if existing is not None:
            raise StoreError("conflict", f"there is already a quick access application: {existing!r}")
    group = _group_or_default(session, connector_group)
    parsed = parse_segments(name, segments)
    if kind == "per_app":
        _check_overlaps(session, None, parsed)
    now = utcnow()
    app = Application(name=name, kind=kind, connector_group=group, segments=_segment_rows(parsed),
                      created_at=now, updated_at=now)
    session.add(app)
    session.flush()
    _record(session, actor, "application.create", "application", app.id, None, _app_state(app), config=True)
    return app


@_change
def update_application(session: Session, actor: str, name: str, *, new_name: str | None = None,
                       connector_group: str | None = None,
                       segments: Sequence[SegmentInput] | None = None) -> Application:
    """Rename, move to another connector group and/or replace all segments (None: unchanged).

    The kind of an application is fixed when it is created. A change that changes nothing
    is not recorded.
    """
    _lock_config(session)
    app = get_application(session, name)
    before = _app_state(app)
    if new_name is not None:
        new_name = _name(new_name, "application name")
        if new_name != app.name:
            if session.scalar(select(Application.id).where(Application.name == new_name)) is not None:
                raise StoreError("conflict", f"application {new_name!r} already exists")
            app.name = new_name
    if connector_group is not None:
        app.connector_group = get_group(session, connector_group)
    if segments is not None:
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
    _record(session, actor, "application.update", "application", app.id, before, _app_state(app), config=True)
    return app


@_change
def delete_application(session: Session, actor: str, name: str) -> None:
    """Delete an application (its segments and assignments go with it).

    Refused (``conflict``, naming them) while conditional-access policies target it: dropping
    it from a policy's list silently would widen that policy (an empty list means every
    application).
    """
    _lock_config(session)
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
    _record(session, actor, "application.delete", "application", before["id"], before, None, config=True)


@_change
def add_segment(session: Session, actor: str, app_name: str, segment: SegmentInput) -> Segment:
    """Append one segment to an application (checked like a full list: limit, duplicates, overlaps)."""
    _lock_config(session)
    app = get_application(session, app_name)
    existing: list[SegmentInput] = [{"destination": s.destination, "ports": s.ports, "protocol": s.protocol}
                                    for s in app.segments]
    new = parse_segments(app.name, [*existing, segment])[-1]
    if app.kind == "per_app":
        _check_overlaps(session, app, [new])
    (row,) = _segment_rows([new])
    app.segments.append(row)
    app.updated_at = utcnow()
    session.flush()
    _record(session, actor, "segment.create", "segment", row.id, None,
            {"application": app.name, **_segment_state(row)}, config=True)
    return row


@_change
def remove_segment(session: Session, actor: str, app_name: str, segment_id: int) -> None:
    _lock_config(session)
    app = get_application(session, app_name)
    row = next((s for s in app.segments if s.id == segment_id), None)
    if row is None:
        raise StoreError("not_found", f"application {app.name!r} has no segment {segment_id}")
    before = {"application": app.name, **_segment_state(row)}
    app.segments.remove(row)
    app.updated_at = utcnow()
    session.flush()
    _record(session, actor, "segment.delete", "segment", segment_id, before, None, config=True)


# ---------------------------------------------------------------------------- private DNS suffixes


def list_dns_suffixes(session: Session) -> list[DnsSuffix]:
    return list(session.scalars(select(DnsSuffix).order_by(DnsSuffix.suffix)))


def _suffix(value: object) -> str:
    if not isinstance(value, str) or not value.strip().lstrip("."):
        raise StoreError("invalid", f"DNS suffix {value!r} must be a non-empty domain name")
    try:
        (parsed,) = parse_segments("dns", [{"destination": value.strip().lstrip("."), "ports": "53"}])
    except StoreError:
        parsed = None
    if parsed is None or parsed.kind != "hostname":
        raise StoreError("invalid", f"DNS suffix {value!r} is not a domain name")
    return parsed.destination


@_change
def add_dns_suffix(session: Session, actor: str, suffix: str) -> DnsSuffix:
    """A private DNS suffix (``corp.example``; a leading dot or trailing dot is dropped)."""
    _lock_config(session)
    name = _suffix(suffix)
    if session.scalar(select(DnsSuffix.id).where(DnsSuffix.suffix == name)) is not None:
        raise StoreError("conflict", f"DNS suffix {name!r} already exists")
    row = DnsSuffix(suffix=name, created_at=utcnow())
    session.add(row)
    session.flush()
    _record(session, actor, "dns_suffix.create", "dns_suffix", row.id, None, _state(row), config=True)
    return row


@_change
def remove_dns_suffix(session: Session, actor: str, suffix: str) -> None:
    _lock_config(session)
    name = _suffix(suffix)
    row = session.scalar(select(DnsSuffix).where(DnsSuffix.suffix == name))
    if row is None:
        raise StoreError("not_found", f"DNS suffix {name!r} does not exist")
    before = _state(row)
    session.delete(row)
    session.flush()
    _record(session, actor, "dns_suffix.delete", "dns_suffix", before["id"], before, None, config=True)


# ---------------------------------------------------------------------------- forwarding profile


def forwarding_profile(session: Session) -> ForwardingProfile:
    """The one forwarding-profile row (migration 0005 creates it)."""
    row = session.get(ForwardingProfile, 1)
    if row is None:
        raise StoreError("not_found", "the forwarding profile is missing: run the control plane's migrations")
    return row


@_change
def set_fail_mode(session: Session, actor: str, fail_mode: str) -> ForwardingProfile:
    """What client agents do with private destinations while no edge is reachable."""
    if fail_mode not in FAIL_MODES:
        raise StoreError("invalid", f"fail mode {fail_mode!r} must be one of {', '.join(FAIL_MODES)}")
    _lock_config(session)
    row = forwarding_profile(session)
    if row.fail_mode == fail_mode:
        return row
    before = _state(row)
    row.fail_mode = fail_mode
    row.updated_at = utcnow()
    session.flush()
    _record(session, actor, "forwarding_profile.update", "forwarding_profile", row.id, before, _state(row),
            config=True)
    return row


# ---------------------------------------------------------------------------- connectors and edges


def list_connectors(session: Session) -> list[Connector]:
    return list(session.scalars(select(Connector).order_by(Connector.name, Connector.id)))


def get_connector(session: Session, connector_id: str) -> Connector:
    connector = session.get(Connector, connector_id)
    if connector is None:
        raise StoreError("not_found", f"connector {connector_id!r} does not exist")
    return connector


@_change
def add_connector(session: Session, actor: str, name: str, *, group: str | None = None,
                  cert_serial: int | None = None, cert_not_after: datetime | None = None) -> Connector:
    """A newly registered connector (id: a new UUID), in the default group unless ``group`` names one."""
    _lock_config(session)
    connector = Connector(id=str(uuid.uuid4()), name=_name(name, "connector name"),
                          group=_group_or_default(session, group), created_at=utcnow(),
                          cert_serial=None if cert_serial is None else _serial_text(cert_serial),
                          cert_not_after=cert_not_after)
    session.add(connector)
    session.flush()
    if cert_serial is not None and cert_not_after is not None:
        record_certificate(session, "connector", connector.id, cert_serial, cert_not_after)
    _record(session, actor, "connector.create", "connector", connector.id, None,
            {**_state(connector), "group": connector.group.name}, config=True)
    return connector


def edge_addresses(session: Session, public: Iterable[str] = ()) -> list[str]:
    """What nodes dial: ``public`` (configured addresses) first, then the address of every
    registered edge whose current certificate is not revoked, each address once."""
    revoked = set(session.scalars(select(Revocation.serial)))
    registered = [e.address for e in session.scalars(select(Edge).order_by(Edge.created_at, Edge.id))
                  if e.cert_serial not in revoked]
    return list(dict.fromkeys([*(a.strip() for a in public), *registered]))


def list_edges(session: Session) -> list[Edge]:
    return list(session.scalars(select(Edge).order_by(Edge.name, Edge.id)))


def get_edge(session: Session, edge_id: str) -> Edge:
    edge = session.get(Edge, edge_id)
    if edge is None:
        raise StoreError("not_found", f"edge {edge_id!r} does not exist")
    return edge


@_change
def add_edge(session: Session, actor: str, name: str, address: str, *, cert_serial: int | None = None,
             cert_not_after: datetime | None = None) -> Edge:
    """A newly registered edge (id: a new UUID) that nodes reach at ``address`` (HOST:PORT)."""
    _lock_config(session)
    edge = Edge(id=str(uuid.uuid4()), name=_name(name, "edge name"), address=_name(address, "edge address", 255),
                created_at=utcnow(), cert_serial=None if cert_serial is None else _serial_text(cert_serial),
                cert_not_after=cert_not_after)
    session.add(edge)
    session.flush()
    if cert_serial is not None and cert_not_after is not None:
        record_certificate(session, "edge", edge.id, cert_serial, cert_not_after)
    _record(session, actor, "edge.create", "edge", edge.id, None, _state(edge), config=True)
    return edge


_HEARTBEAT_COUNT_MAX = 2**31 - 1  # the columns are 32-bit integers


@_change
def record_heartbeat(session: Session, role: str, node_id: str, *, version: str, external_addr: str = "",
                     internal_addr: str = "", tunnels: int = 0, active_flows: int = 0,
                     config_version: int | None = None, now: datetime | None = None) -> Connector | Edge:
    """A node's heartbeat: what it reports, and ``last_seen`` (not audited, not configuration).

    ``external_addr`` is where the control plane saw the request come from, ``internal_addr``
    the node's own addresses (comma-separated), ``config_version`` the snapshot it runs.
    """
    node = get_connector(session, node_id) if role == "connector" else get_edge(session, node_id)
    for what, count in (("tunnels", tunnels), ("active_flows", active_flows)):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _HEARTBEAT_COUNT_MAX:
            raise StoreError("invalid", f"heartbeat {what} must be an integer from 0 to {_HEARTBEAT_COUNT_MAX}")
    if config_version is not None and (isinstance(config_version, bool) or not isinstance(config_version, int)
                                       or not 0 <= config_version <= _HEARTBEAT_COUNT_MAX):
        raise StoreError("invalid", f"heartbeat config_version must be an integer from 0 to {_HEARTBEAT_COUNT_MAX}")
    for what, text, limit in (("version", version, 64), ("external address", external_addr, 255),
                              ("internal addresses", internal_addr, 255)):
        if len(text) > limit:
            raise StoreError("invalid", f"heartbeat {what} is longer than {limit} characters")
    node.version, node.external_addr, node.internal_addr = version, external_addr, internal_addr
    node.tunnels, node.active_flows, node.config_version = tunnels, active_flows, config_version
    node.last_seen = _now(now)
    session.flush()
    return node


# ---------------------------------------------------------------------------- issued certificates


@_change
def record_certificate(session: Session, role: str, node_id: str, serial: int, not_after: datetime,
                       now: datetime | None = None) -> IssuedCertificate:
    """Note a certificate signed for node ``node_id`` (registration or renewal)."""
    if role not in TOKEN_ROLES:
        raise StoreError("invalid", f"certificate role {role!r} is not one of {', '.join(TOKEN_ROLES)}")
    row = IssuedCertificate(serial=_serial_text(serial), role=role, node_id=node_id, issued_at=_now(now),
                            not_after=not_after)
    session.add(row)
    session.flush()
    return row


@_change
def record_client_certificate(session: Session, actor: str, name: str, serial: int, not_after: datetime) -> None:
    """Audit the signing of a client (device) certificate (clients are not nodes of the store)."""
    text = _serial_text(serial)
    _record(session, actor, "client_certificate.issue", "certificate", text, None,
            {"serial": text, "role": "client", "name": _name(name, "client name"), "not_after": not_after.isoformat()},
            config=False)


def node_for_certificate(session: Session, serial: int) -> Connector | Edge | None:
    """The connector or edge a certificate was issued to (None if the serial is not known here)."""
    row = session.get(IssuedCertificate, _serial_text(serial))
    if row is None:
        return None
    return session.get(Connector if row.role == "connector" else Edge, row.node_id)


def node_certificates(session: Session, node_id: str) -> list[IssuedCertificate]:
    """Every certificate issued to ``node_id``, oldest first."""
    return list(session.scalars(select(IssuedCertificate).where(IssuedCertificate.node_id == node_id)
                                .order_by(IssuedCertificate.issued_at, IssuedCertificate.serial)))


@_change
def renew_certificate(session: Session, node: Connector | Edge, serial: int, not_after: datetime,
                      now: datetime | None = None) -> None:
    """``node`` got a new certificate: record it and make it the node's current one (audited).

    Its older certificates stay valid until they expire (its tunnels made with them keep
    running); revoking the node revokes them all.
    """
    role = "connector" if isinstance(node, Connector) else "edge"
    before = _state(node)
    record_certificate(session, role, node.id, serial, not_after, now)
    node.cert_serial, node.cert_not_after = _serial_text(serial), not_after
    session.flush()
    _record(session, f"{role}:{node.id}", f"{role}.renew_certificate", role, node.id, before, _state(node),
            config=False)


@_change
def revoke_node(session: Session, actor: str, role: str, node_id: str, reason: str = "") -> list[Revocation]:
    """Revoke every certificate issued to a connector or an edge (those not revoked yet).

    Edges refuse the node and cut its tunnels once they hold the new configuration version.
    Refused with ``conflict`` when there is nothing left to revoke.
    """
    node = get_connector(session, node_id) if role == "connector" else get_edge(session, node_id)
    revoked = set(session.scalars(select(Revocation.serial)))
    serials = [c.serial for c in node_certificates(session, node.id) if c.serial not in revoked]
    if node.cert_serial and node.cert_serial not in revoked and node.cert_serial not in serials:
        serials.append(node.cert_serial)
    if not serials:
        raise StoreError("conflict", f"every certificate of {role} {node.name!r} ({node.id}) is already revoked")
    reason = reason.strip() or f"{role} {node.name} revoked"
    return [revoke_certificate(session, actor, int(serial, 16), reason) for serial in serials]


# ---------------------------------------------------------------------------- admin API keys


def list_admin_keys(session: Session) -> list[AdminKey]:
    return list(session.scalars(select(AdminKey).order_by(AdminKey.name)))


@_change
def create_admin_key(session: Session, actor: str, name: str) -> tuple[AdminKey, str]:
    """A new admin key and its plain text (``fmk_...``): shown this once, only its hash is kept."""
    name = _name(name, "admin key name")
    if session.scalar(select(AdminKey.id).where(AdminKey.name == name)) is not None:
        raise StoreError("conflict", f"admin key {name!r} already exists")
    plaintext = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    key = AdminKey(name=name, key_hash=hash_secret(plaintext), created_at=utcnow(), created_by=actor)
    session.add(key)
    session.flush()
    _record(session, actor, "admin_key.create", "admin_key", key.id, None, _state(key), config=False)
    return key, plaintext


def verify_admin_key(session: Session, plaintext: str, now: datetime | None = None) -> AdminKey | None:
    """The live (not revoked) admin key whose plain text this is, else None; notes its last use."""
    key = session.scalar(select(AdminKey).where(AdminKey.key_hash == hash_secret(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    now = _now(now)
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.flush()
    return key


@_change
def revoke_admin_key(session: Session, actor: str, name: str) -> AdminKey:
    key = session.scalar(select(AdminKey).where(AdminKey.name == name))
    if key is None:
        raise StoreError("not_found", f"admin key {name!r} does not exist")
    if key.revoked_at is not None:
        raise StoreError("conflict", f"admin key {name!r} was already revoked at "
                                     f"{key.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    before = _state(key)
    key.revoked_at = utcnow()
    session.flush()
    _record(session, actor, "admin_key.revoke", "admin_key", key.id, before, _state(key), config=False)
    return key


# ---------------------------------------------------------------------------- registration tokens


@_change
def create_registration_token(session: Session, actor: str, role: str, *, group: str | None = None,
                              ttl: timedelta = DEFAULT_TOKEN_TTL,
                              now: datetime | None = None) -> tuple[RegistrationToken, str]:
    """A one-time token for a connector (into ``group``, default: the default group) or an edge.

    Returns the row and the plain text (``fmr_...``), shown this once; only its hash is kept.
    """
    if role not in TOKEN_ROLES:
        raise StoreError("invalid", f"registration token role {role!r} is not one of {', '.join(TOKEN_ROLES)}")
    if ttl <= timedelta(0):
        raise StoreError("invalid", f"registration token lifetime {ttl} must be positive")
    if role == "edge" and group is not None:
        raise StoreError("invalid", "an edge registration token has no connector group")
    target = _group_or_default(session, group) if role == "connector" else None
    now = _now(now)
    plaintext = REGISTRATION_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = RegistrationToken(token_hash=hash_secret(plaintext), role=role, group=target, created_at=now,
                              created_by=actor, expires_at=now + ttl)
    session.add(token)
    session.flush()
    after = {**_state(token), "group": target.name if target else None}
    _record(session, actor, "registration_token.create", "registration_token", token.id, None, after, config=False)
    return token, plaintext


@_change
def consume_registration_token(session: Session, plaintext: str, role: str, *, used_by: str,
                               now: datetime | None = None) -> RegistrationToken:
    """Use a registration token once, for a node of ``role``; ``used_by`` names that node.

    Refused with code ``token_unknown``, ``token_used`` or ``token_expired`` (each its own
    message), or ``invalid`` when the token is for the other role. The row is locked, so two
    concurrent uses cannot both succeed.
    """
    now = _now(now)
    token = session.scalar(select(RegistrationToken).where(RegistrationToken.token_hash == hash_secret(plaintext))
                           .with_for_update(of=RegistrationToken))
    if token is None:
        raise StoreError("token_unknown", "registration token is not known (mistyped, or never issued here)")
    if token.used_at is not None:
        raise StoreError("token_used", f"registration token was already used at "
                                       f"{token.used_at:%Y-%m-%d %H:%M:%S} UTC by {token.used_by}")
    if now >= token.expires_at:
        raise StoreError("token_expired", f"registration token expired at {token.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    if token.role != role:
        raise StoreError("invalid", f"registration token is for {_A_ROLE[token.role]}, not for {_A_ROLE[role]}")
    before = _state(token)
    token.used_at, token.used_by = now, _name(used_by, "registering node name")
    session.flush()
    _record(session, token.used_by, "registration_token.use", "registration_token", token.id, before, _state(token),
            config=False)
    return token


# ---------------------------------------------------------------------------- certificate revocations


def list_revocations(session: Session) -> list[Revocation]:
    return list(session.scalars(select(Revocation).order_by(Revocation.at, Revocation.serial)))


def is_revoked(session: Session, serial: int) -> bool:
    return session.get(Revocation, _serial_text(serial)) is not None


@_change
def revoke_certificate(session: Session, actor: str, serial: int, reason: str = "") -> Revocation:
    """Revoke a certificate by serial number; nodes learn it with the next configuration version."""
    _lock_config(session)
    text = _serial_text(serial)
    if session.get(Revocation, text) is not None:
        raise StoreError("conflict", f"certificate {text} is already revoked")
    if len(reason.strip()) > _MAX_NAME:
        raise StoreError("invalid", f"revocation reason is longer than {_MAX_NAME} characters")
    row = Revocation(serial=text, at=utcnow(), reason=reason.strip())
    session.add(row)
    session.flush()
    _record(session, actor, "certificate.revoke", "certificate", text, None, _state(row), config=True)
    return row
