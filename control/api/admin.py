"""The admin routes under ``/v1`` (every one behind an admin key; see ``guards.require_admin``).

Each handler is a thin shell around the store's resource modules: one transaction, the store
call (which validates, writes the audit record with the key's name as actor, and bumps the
configuration version), and the conversion of rows to ``schemas`` Structs. Handlers are
synchronous (SQLAlchemy) and run in Litestar's thread pool.

Resources: applications (+ their segments), connector-groups, connectors (moved between groups
with PATCH), edges,
dns-suffixes, forwarding-profile, registration-tokens, admin-keys, revocations,
client-certificates, audit, config-version.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Router, delete, get, patch, post, put
from litestar.exceptions import ValidationException
from litestar.params import Parameter
from sqlalchemy.orm import Session

from control.store import (
    StoreError,
    admin_keys,
    applications,
    audit,
    certificates,
    config_version,
    connector_groups,
    dns_suffixes,
    forwarding_profile,
    nodes,
    registration_tokens,
)
from control.store.models import (
    AdminKey,
    Connector,
    ConnectorGroup,
    DnsSuffix,
    Edge,
    ForwardingProfile,
    RegistrationToken,
    Revocation,
    utcnow,
)

from dataplane.basics.controltls import ca_pin, token_with_pin

from .guards import Api, admin_routes
from .schemas import (
    AdminKeyCreate,
    AdminKeyCreated,
    AdminKeyOut,
    ApplicationCreate,
    ApplicationOut,
    ApplicationUpdate,
    AuditOut,
    CertificateOut,
    ClientCertificateCreate,
    ConfigVersionOut,
    ConnectorOut,
    ConnectorUpdate,
    DnsSuffixCreate,
    DnsSuffixOut,
    EdgeOut,
    ForwardingProfileOut,
    ForwardingProfileUpdate,
    GroupCreate,
    GroupOut,
    GroupUpdate,
    RevocationCreate,
    RevocationOut,
    SegmentIn,
    SegmentOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
    application_out,
    segment_out,
)

MAX_AUDIT_LIMIT = 1000

# ---------------------------------------------------------------------------- conversions


def _segments_in(segments: list[SegmentIn]) -> list[dict[str, Any]]:
    return [msgspec.structs.asdict(s) for s in segments]


def _group_out(g: ConnectorGroup) -> GroupOut:
    return GroupOut(id=g.id, name=g.name, region=g.region, is_default=g.is_default, created_at=g.created_at,
                    allowed_addresses=connector_groups.allowed_addresses(g),
                    denied_addresses=connector_groups.denied_addresses(g))


def _connector_out(c: Connector, api: Api, now: datetime, revoked: set[str]) -> ConnectorOut:
    return ConnectorOut(id=c.id, name=c.name, group=c.group.name, status=c.status(now, api.heartbeat_interval),
                        last_seen=c.last_seen, version=c.version, external_addr=c.external_addr,
                        internal_addr=c.internal_addr, created_at=c.created_at, cert_serial=c.cert_serial,
                        cert_not_after=c.cert_not_after, revoked=c.cert_serial in revoked, tunnels=c.tunnels,
                        active_flows=c.active_flows, config_version=c.config_version)


def _edge_out(e: Edge, api: Api, now: datetime, revoked: set[str]) -> EdgeOut:
    return EdgeOut(id=e.id, name=e.name, address=e.address, status=e.status(now, api.heartbeat_interval),
                   last_seen=e.last_seen, version=e.version, created_at=e.created_at, cert_serial=e.cert_serial,
                   cert_not_after=e.cert_not_after, revoked=e.cert_serial in revoked, external_addr=e.external_addr,
                   internal_addr=e.internal_addr, tunnels=e.tunnels, active_flows=e.active_flows,
                   config_version=e.config_version, records_dropped=e.records_dropped or 0,
                   records_dropped_at=e.records_dropped_at)


def _dns_suffix_out(d: DnsSuffix) -> DnsSuffixOut:
    return DnsSuffixOut(id=d.id, suffix=d.suffix, created_at=d.created_at)


def _profile_out(row: ForwardingProfile) -> ForwardingProfileOut:
    return ForwardingProfileOut(fail_mode=row.fail_mode, updated_at=row.updated_at)


def _admin_key_out(k: AdminKey) -> AdminKeyOut:
    return AdminKeyOut(id=k.id, name=k.name, created_at=k.created_at, created_by=k.created_by,
                       last_used_at=k.last_used_at, revoked_at=k.revoked_at)


def _token_out(t: RegistrationToken, now: datetime) -> TokenOut:
    state = "used" if t.used_at is not None else "expired" if now >= t.expires_at else "unused"
    return TokenOut(id=t.id, role=t.role, group=t.group.name if t.group else None, created_at=t.created_at,
                    created_by=t.created_by, expires_at=t.expires_at, used_at=t.used_at, used_by=t.used_by,
                    state=state)


def _revocation_out(session: Session, rows: list[Revocation]) -> list[RevocationOut]:
    owners = certificates.node_owners(session, [r.serial for r in rows])
    out = []
    for r in rows:
        node_type, node_id, node_name = owners.get(r.serial, (None, None, None))
        out.append(RevocationOut(serial=r.serial, at=r.at, reason=r.reason, node_type=node_type,  # type: ignore[arg-type]
                                 node_id=node_id, node_name=node_name))
    return out


# ---------------------------------------------------------------------------- applications and segments


@get("/applications", sync_to_thread=True, tags=["applications"])
def list_applications(api: Api) -> list[ApplicationOut]:
    with api.store.read() as session:
        return [application_out(a) for a in applications.list_applications(session)]


@get("/applications/{name:str}", sync_to_thread=True, tags=["applications"])
def get_application(api: Api, name: str) -> ApplicationOut:
    with api.store.read() as session:
        return application_out(applications.get_application(session, name))


@post("/applications", sync_to_thread=True, tags=["applications"])
def create_application(api: Api, actor: str, data: ApplicationCreate) -> ApplicationOut:
    """A new application; its per-app segments must not overlap another per-app application's (409)."""
    with api.store.begin() as session:
        app = applications.create_application(session, actor, data.name, kind=data.kind,
                                              connector_group=data.connector_group,
                                              segments=_segments_in(data.segments))
        return application_out(app)


@patch("/applications/{name:str}", sync_to_thread=True, tags=["applications"])
def update_application(api: Api, actor: str, name: str, data: ApplicationUpdate) -> ApplicationOut:
    """Rename, move to another connector group, and/or replace all segments."""
    with api.store.begin() as session:
        app = applications.update_application(session, actor, name, new_name=data.name,
                                              connector_group=data.connector_group,
                                              segments=None if data.segments is None else _segments_in(data.segments))
        return application_out(app)


@delete("/applications/{name:str}", sync_to_thread=True, tags=["applications"])
def delete_application(api: Api, actor: str, name: str) -> None:
    with api.store.begin() as session:
        applications.delete_application(session, actor, name)


@post("/applications/{name:str}/segments", sync_to_thread=True, tags=["applications"])
def add_segment(api: Api, actor: str, name: str, data: SegmentIn) -> SegmentOut:
    with api.store.begin() as session:
        return segment_out(applications.add_segment(session, actor, name, msgspec.structs.asdict(data)))


@delete("/applications/{name:str}/segments/{segment_id:int}", sync_to_thread=True, tags=["applications"])
def remove_segment(api: Api, actor: str, name: str, segment_id: int) -> None:
    with api.store.begin() as session:
        applications.remove_segment(session, actor, name, segment_id)


# ---------------------------------------------------------------------------- connector groups, connectors, edges


@get("/connector-groups", sync_to_thread=True, tags=["connectors"])
def list_groups(api: Api) -> list[GroupOut]:
    with api.store.read() as session:
        return [_group_out(g) for g in connector_groups.list_groups(session)]


@get("/connector-groups/{name:str}", sync_to_thread=True, tags=["connectors"])
def get_group(api: Api, name: str) -> GroupOut:
    with api.store.read() as session:
        return _group_out(connector_groups.get_group(session, name))


@post("/connector-groups", sync_to_thread=True, tags=["connectors"])
def create_group(api: Api, actor: str, data: GroupCreate) -> GroupOut:
    """A new connector group, with the networks its connectors may and may not dial (422 naming a bad entry)."""
    with api.store.begin() as session:
        return _group_out(connector_groups.create_group(session, actor, data.name, data.region,
                                                        allowed=data.allowed_addresses,
                                                        denied=data.denied_addresses))


@patch("/connector-groups/{name:str}", sync_to_thread=True, tags=["connectors"])
def update_group(api: Api, actor: str, name: str, data: GroupUpdate) -> GroupOut:
    """Change the region and/or replace a dial list; the group's connectors apply it with the next
    configuration version (within seconds), to every address they dial from then on."""
    with api.store.begin() as session:
        return _group_out(connector_groups.update_group(session, actor, name, region=data.region,
                                                        allowed=data.allowed_addresses,
                                                        denied=data.denied_addresses))


@get("/connectors", sync_to_thread=True, tags=["connectors"])
def list_connectors(api: Api) -> list[ConnectorOut]:
    """Every registered connector; ``status`` is ``inactive`` after 3 missed heartbeats."""
    now = utcnow()
    with api.store.read() as session:
        revoked = certificates.revoked_serials(session)
        return [_connector_out(c, api, now, revoked) for c in nodes.list_connectors(session)]


@get("/connectors/{connector_id:str}", sync_to_thread=True, tags=["connectors"])
def get_connector(api: Api, connector_id: str) -> ConnectorOut:
    with api.store.read() as session:
        return _connector_out(nodes.get_connector(session, connector_id), api, utcnow(),
                              certificates.revoked_serials(session))


@patch("/connectors/{connector_id:str}", sync_to_thread=True, tags=["connectors"])
def update_connector(api: Api, actor: str, connector_id: str, data: ConnectorUpdate) -> ConnectorOut:
    """Move a connector to another connector group (it serves that group's applications from the
    next configuration version)."""
    with api.store.begin() as session:
        connector = nodes.move_connector(session, actor, connector_id, data.group)
        return _connector_out(connector, api, utcnow(), certificates.revoked_serials(session))


@get("/edges", sync_to_thread=True, tags=["edges"])
def list_edges(api: Api) -> list[EdgeOut]:
    now = utcnow()
    with api.store.read() as session:
        revoked = certificates.revoked_serials(session)
        return [_edge_out(e, api, now, revoked) for e in nodes.list_edges(session)]


@get("/edges/{edge_id:str}", sync_to_thread=True, tags=["edges"])
def get_edge(api: Api, edge_id: str) -> EdgeOut:
    with api.store.read() as session:
        return _edge_out(nodes.get_edge(session, edge_id), api, utcnow(), certificates.revoked_serials(session))


# ---------------------------------------------------------------------------- private DNS suffixes


@get("/dns-suffixes", sync_to_thread=True, tags=["dns"])
def list_dns_suffixes(api: Api) -> list[DnsSuffixOut]:
    with api.store.read() as session:
        return [_dns_suffix_out(d) for d in dns_suffixes.list_dns_suffixes(session)]


@post("/dns-suffixes", sync_to_thread=True, tags=["dns"])
def add_dns_suffix(api: Api, actor: str, data: DnsSuffixCreate) -> DnsSuffixOut:
    with api.store.begin() as session:
        return _dns_suffix_out(dns_suffixes.add_dns_suffix(session, actor, data.suffix))


@delete("/dns-suffixes/{suffix:str}", sync_to_thread=True, tags=["dns"])
def remove_dns_suffix(api: Api, actor: str, suffix: str) -> None:
    with api.store.begin() as session:
        dns_suffixes.remove_dns_suffix(session, actor, suffix)


# ---------------------------------------------------------------------------- forwarding profile


@get("/forwarding-profile", sync_to_thread=True, tags=["clients"])
def get_forwarding_profile(api: Api) -> ForwardingProfileOut:
    with api.store.read() as session:
        return _profile_out(forwarding_profile.forwarding_profile(session))


@put("/forwarding-profile", sync_to_thread=True, tags=["clients"])
def set_forwarding_profile(api: Api, actor: str, data: ForwardingProfileUpdate) -> ForwardingProfileOut:
    """Change the fail mode client agents follow (it reaches them with the next configuration version)."""
    with api.store.begin() as session:
        return _profile_out(forwarding_profile.set_fail_mode(session, actor, data.fail_mode))


# ---------------------------------------------------------------------------- registration tokens


@get("/registration-tokens", sync_to_thread=True, tags=["registration"])
def list_tokens(api: Api) -> list[TokenOut]:
    """Every registration token issued (never the token itself), newest first."""
    now = utcnow()
    with api.store.read() as session:
        return [_token_out(t, now) for t in registration_tokens.list_registration_tokens(session)]


@post("/registration-tokens", sync_to_thread=True, tags=["registration"])
def create_token(api: Api, actor: str, data: TokenCreate) -> TokenCreated:
    """A one-time token for ``POST /v1/register``; the plain text is in this response only. It carries
    the CA's hash (``fmr_<secret>.<hash hex>``): the registering node pins the control plane's CA with it."""
    with api.store.begin() as session:
        token, plaintext = registration_tokens.create_registration_token(session, actor, data.role, group=data.group,
                                                                         ttl=timedelta(seconds=data.ttl_seconds))
        return TokenCreated(id=token.id, token=token_with_pin(plaintext, ca_pin(api.ca.certificate)), role=token.role,
                            group=token.group.name if token.group else None, expires_at=token.expires_at)


# ---------------------------------------------------------------------------- admin keys


@get("/admin-keys", sync_to_thread=True, tags=["admin"])
def list_admin_keys(api: Api) -> list[AdminKeyOut]:
    with api.store.read() as session:
        return [_admin_key_out(k) for k in admin_keys.list_admin_keys(session)]


@post("/admin-keys", sync_to_thread=True, tags=["admin"])
def create_admin_key(api: Api, actor: str, data: AdminKeyCreate) -> AdminKeyCreated:
    """A new admin key; the plain text is in this response only."""
    with api.store.begin() as session:
        key, plaintext = admin_keys.create_admin_key(session, actor, data.name)
        return AdminKeyCreated(id=key.id, name=key.name, key=plaintext, created_at=key.created_at,
                               created_by=key.created_by)


@post("/admin-keys/{name:str}/revoke", status_code=200, sync_to_thread=True, tags=["admin"])
def revoke_admin_key(api: Api, actor: str, name: str) -> AdminKeyOut:
    """Revoke an admin key (it stops working at once). The last live key cannot be revoked."""
    with api.store.begin() as session:
        live = admin_keys.live_admin_keys(session)
        target = admin_keys.find_admin_key(session, name)
        if target is not None and target.revoked_at is None and live == 1:
            raise StoreError("conflict", f"admin key {name!r} is the last live admin key: create another one "
                                         f"before revoking it, or nobody could administer the control plane")
        return _admin_key_out(admin_keys.revoke_admin_key(session, actor, name))


# ---------------------------------------------------------------------------- revocations


@get("/revocations", sync_to_thread=True, tags=["revocations"])
def list_revocations(api: Api) -> list[RevocationOut]:
    with api.store.read() as session:
        return _revocation_out(session, certificates.list_revocations(session))


@post("/revocations", sync_to_thread=True, tags=["revocations"])
def revoke_node(api: Api, actor: str, data: RevocationCreate) -> list[RevocationOut]:
    """Revoke every certificate of a connector or an edge (its current one and those it renewed from).

    Edges refuse the node and cut its tunnels as soon as they hold the next configuration
    version (within seconds).
    """
    by_node = data.node_type is not None or data.node_id is not None
    if by_node == (data.serial is not None) or (by_node and (data.node_type is None or data.node_id is None)):
        raise ValidationException("give either node_type and node_id, or serial")
    with api.store.begin() as session:
        if data.serial is not None:
            return _revocation_out(session, [certificates.revoke_certificate(session, actor, int(data.serial, 16),
                                                                             data.reason)])
        node = nodes.get_node(session, data.node_type, data.node_id)  # type: ignore[arg-type]
        if node.cert_serial is None:
            raise StoreError("invalid", f"{data.node_type} {node.id!r} ({node.name}) has no certificate to revoke")
        rows = nodes.revoke_node(session, actor, data.node_type, node.id, data.reason)  # type: ignore[arg-type]
        return _revocation_out(session, rows)


# ---------------------------------------------------------------------------- client certificates


@post("/client-certificates", sync_to_thread=True, tags=["certificates"])
def issue_client_certificate(api: Api, actor: str, data: ClientCertificateCreate) -> CertificateOut:
    """Sign a client (device) certificate for the CSR's key, named ``name``; audited, revocable by serial."""
    issued = api.ca.sign_csr(data.csr_pem.encode(), role="client", name=data.name.strip(),
                             lifetime_days=data.lifetime_days or api.cert_lifetime_days)
    with api.store.begin() as session:
        certificates.record_client_certificate(session, actor, data.name.strip(), issued.serial, issued.not_after)
    return CertificateOut(certificate_pem=issued.cert_pem.decode(), ca_pem=api.ca.bundle().decode(),
                          serial=format(issued.serial, "x"), not_after=issued.not_after)


# ---------------------------------------------------------------------------- audit, configuration version


@get("/audit", sync_to_thread=True, tags=["audit"])
def list_audit(
    api: Api,
    # Not named ``actor`` in Python: that name is the dependency holding the caller's key name.
    filter_actor: Annotated[str | None, Parameter(query="actor")] = None,
    object_type: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_AUDIT_LIMIT)] = 100,
) -> list[AuditOut]:
    """Audit records, newest first; ``since`` is an RFC 3339 time with a zone (records at or after it)."""
    if since is not None and since.tzinfo is None:
        raise ValidationException("invalid request: since must carry a time zone (e.g. 2024-05-01T12:00:00Z)",
                                  extra=[{"key": "since", "source": "query",
                                          "message": "must carry a time zone, e.g. 2024-05-01T12:00:00Z"}])
    with api.store.read() as session:
        return [AuditOut(id=r.id, at=r.at, actor=r.actor, action=r.action, object_type=r.object_type,
                         object_id=r.object_id, before=r.before, after=r.after)
                for r in audit.list_audit(session, limit, object_type, actor=filter_actor, since=since)]


@get("/config-version", sync_to_thread=True, tags=["config"])
def get_config_version(api: Api) -> ConfigVersionOut:
    """Bumped by every change to what nodes are configured from."""
    with api.store.read() as session:
        row = config_version.version_row(session)
        return ConfigVersionOut(version=row.version, changed_at=row.changed_at)


ADMIN_HANDLERS = [
    list_applications, get_application, create_application, update_application, delete_application,
    add_segment, remove_segment, list_groups, create_group, list_connectors, get_connector, update_connector,
    list_edges, get_edge,
    get_group, update_group,
    list_dns_suffixes, add_dns_suffix, remove_dns_suffix, get_forwarding_profile, set_forwarding_profile,
    list_tokens, create_token, list_admin_keys, create_admin_key, revoke_admin_key, list_revocations, revoke_node,
    issue_client_certificate, list_audit, get_config_version,
]


def admin_router() -> Router:
    """The ``/v1`` admin routes, each guarded by an admin key; ``actor`` is that key's name."""
    return admin_routes(ADMIN_HANDLERS)
