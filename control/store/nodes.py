"""Connectors and edges: the registered nodes, their heartbeats, certificate renewal and revocation.

A node is recorded when it registers (``control.api.register``: one-time token, CSR) with
the serial of its certificate; every certificate it gets is noted in ``certificates``.
Revoking a node revokes every certificate it was issued.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from .audit import change, record_change, row_state
from .certificates import node_certificates, record_certificate, revoke_certificate, revoked_serials
from .config_version import lock_config
from .connector_groups import get_group, group_or_default
from .errors import StoreError
from .models import Connector, Edge, IssuedCertificate, Revocation, utcnow
from .values import aware_now, serial_text, valid_name

_HEARTBEAT_COUNT_MAX = 2**31 - 1  # the columns are 32-bit integers

# ---------------------------------------------------------------------------- connectors


def list_connectors(session: Session) -> list[Connector]:
    return list(session.scalars(select(Connector).order_by(Connector.name, Connector.id)))


def get_connector(session: Session, connector_id: str) -> Connector:
    connector = session.get(Connector, connector_id)
    if connector is None:
        raise StoreError("not_found", f"connector {connector_id!r} does not exist")
    return connector


@change
def add_connector(session: Session, actor: str, name: str, *, group: str | None = None,
                  cert_serial: int | None = None, cert_not_after: datetime | None = None) -> Connector:
    """A newly registered connector (id: a new UUID), in the default group unless ``group`` names one."""
    lock_config(session)
    connector = Connector(id=str(uuid.uuid4()), name=valid_name(name, "connector name"),
                          group=group_or_default(session, group), created_at=utcnow(),
                          cert_serial=None if cert_serial is None else serial_text(cert_serial),
                          cert_not_after=cert_not_after)
    session.add(connector)
    session.flush()
    if cert_serial is not None and cert_not_after is not None:
        record_certificate(session, "connector", connector.id, cert_serial, cert_not_after)
    record_change(session, actor, "connector.create", "connector", connector.id, None,
                  {**row_state(connector), "group": connector.group.name}, config=True)
    return connector


@change
def move_connector(session: Session, actor: str, connector_id: str, group: str) -> Connector:
    """Move a connector to connector group ``group``: from the next configuration version it
    serves that group's applications (and dials by that group's lists)."""
    lock_config(session)
    connector = get_connector(session, connector_id)
    target = get_group(session, group)
    if connector.group_id == target.id:
        return connector
    before = {**row_state(connector), "group": connector.group.name}
    connector.group = target
    session.flush()
    record_change(session, actor, "connector.move", "connector", connector.id, before,
                  {**row_state(connector), "group": target.name}, config=True)
    return connector


def snapshot_connectors(session: Session, as_of: datetime) -> list[tuple[str, str, str, list[str]]]:
    """Every connector with a usable certificate as ``(id, name, group name, serials)``, sorted by
    name then id, for the configuration: the serials (sorted by value) are those of its
    certificates neither revoked nor expired at ``as_of`` (the configuration version's time, so
    one version always lists the same serials). A connector left with none is left out: no
    edge files it under any group."""
    revoked = revoked_serials(session)
    usable: dict[str, list[str]] = {}
    for node_id, serial, not_after in session.execute(
            select(IssuedCertificate.node_id, IssuedCertificate.serial, IssuedCertificate.not_after)
            .where(IssuedCertificate.role == "connector", IssuedCertificate.not_after > as_of)):
        if serial not in revoked:
            usable.setdefault(node_id, []).append(serial)
    out = []
    for connector in list_connectors(session):
        serials = usable.get(connector.id)
        if serials:
            out.append((connector.id, connector.name, connector.group.name, sorted(serials, key=lambda s: int(s, 16))))
    return out


# ---------------------------------------------------------------------------- edges


def edge_addresses(session: Session, public: Iterable[str] = ()) -> list[str]:
    """What nodes dial: ``public`` (configured addresses) first, then the address of every
    registered edge whose current certificate is not revoked, each address once."""
    revoked = revoked_serials(session)
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


@change
def add_edge(session: Session, actor: str, name: str, address: str, *, cert_serial: int | None = None,
             cert_not_after: datetime | None = None) -> Edge:
    """A newly registered edge (id: a new UUID) that nodes reach at ``address`` (HOST:PORT)."""
    lock_config(session)
    edge = Edge(id=str(uuid.uuid4()), name=valid_name(name, "edge name"),
                address=valid_name(address, "edge address", 255),
                created_at=utcnow(), cert_serial=None if cert_serial is None else serial_text(cert_serial),
                cert_not_after=cert_not_after)
    session.add(edge)
    session.flush()
    if cert_serial is not None and cert_not_after is not None:
        record_certificate(session, "edge", edge.id, cert_serial, cert_not_after)
    record_change(session, actor, "edge.create", "edge", edge.id, None, row_state(edge), config=True)
    return edge


# ---------------------------------------------------------------------------- either


def get_node(session: Session, role: str, node_id: str) -> Connector | Edge:
    """The connector (``role`` ``connector``) or else the edge with id ``node_id``."""
    return get_connector(session, node_id) if role == "connector" else get_edge(session, node_id)


def refuse_live_duplicate(session: Session, role: str, name: str) -> None:
    """Refuse (``conflict``) a new node named like a registered node of its role whose certificate is not revoked."""
    model: type[Connector] | type[Edge] = Connector if role == "connector" else Edge
    revoked = revoked_serials(session)
    for node in session.scalars(select(model).where(model.name == name)):
        if node.cert_serial not in revoked:
            raise StoreError("conflict", f"{role} {name!r} is already registered (id {node.id}) and its "
                                         f"certificate is not revoked: revoke it first, or register under "
                                         f"another name")


@change
def record_heartbeat(session: Session, role: str, node_id: str, *, version: str, external_addr: str = "",
                     internal_addr: str = "", tunnels: int = 0, active_flows: int = 0,
                     config_version: int | None = None, records_dropped: int = 0,
                     now: datetime | None = None) -> Connector | Edge:
    """A node's heartbeat: what it reports, and ``last_seen`` (not audited, not configuration).

    ``external_addr`` is where the control plane saw the request come from, ``internal_addr``
    the node's own addresses (comma-separated), ``config_version`` the snapshot it runs,
    ``records_dropped`` (edges) the traffic records its queue dropped since its previous
    heartbeat: added to the edge's total, and the time noted (``records_dropped_at``).
    """
    node = get_node(session, role, node_id)
    for what, count in (("tunnels", tunnels), ("active_flows", active_flows), ("records_dropped", records_dropped)):
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
    if records_dropped and not isinstance(node, Edge):
        raise StoreError("invalid", "only an edge keeps traffic records: a connector cannot report dropping them")
    node.last_seen = aware_now(now)
    if records_dropped:
        node.records_dropped = (node.records_dropped or 0) + records_dropped
        node.records_dropped_at = node.last_seen
    session.flush()
    return node


@change
def renew_certificate(session: Session, node: Connector | Edge, serial: int, not_after: datetime,
                      now: datetime | None = None) -> None:
    """``node`` got a new certificate: record it and make it the node's current one (audited).

    Its older certificates stay valid for the grace the control plane gives (its tunnels made
    with them keep running meanwhile), then ``certificates.retire_superseded`` revokes them;
    revoking the node revokes them all. A connector's renewal is a configuration
    change: edges recognise a connector by its certificates' serials (``snapshot_connectors``)
    and must learn the new one before the connector's next tunnel presents it.
    """
    role = "connector" if isinstance(node, Connector) else "edge"
    before = row_state(node)
    record_certificate(session, role, node.id, serial, not_after, now)
    node.cert_serial, node.cert_not_after = serial_text(serial), not_after
    session.flush()
    record_change(session, f"{role}:{node.id}", f"{role}.renew_certificate", role, node.id, before, row_state(node),
                  config=role == "connector")


@change
def revoke_node(session: Session, actor: str, role: str, node_id: str, reason: str = "") -> list[Revocation]:
    """Revoke every certificate issued to a connector or an edge (those not revoked yet).

    Edges refuse the node and cut its tunnels once they hold the new configuration version.
    Refused with ``conflict`` when there is nothing left to revoke.
    """
    node = get_node(session, role, node_id)
    revoked = revoked_serials(session)
    serials = [c.serial for c in node_certificates(session, node.id) if c.serial not in revoked]
    if node.cert_serial and node.cert_serial not in revoked and node.cert_serial not in serials:
        serials.append(node.cert_serial)
    if not serials:
        raise StoreError("conflict", f"every certificate of {role} {node.name!r} ({node.id}) is already revoked")
    reason = reason.strip() or f"{role} {node.name} revoked"
    return [revoke_certificate(session, actor, int(serial, 16), reason) for serial in serials]
