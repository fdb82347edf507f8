"""The admin API's request and response bodies (msgspec Structs; Litestar validates and documents them),
and how a stored application becomes one (``application_out``).

Request bodies refuse unknown fields (``forbid_unknown_fields``): a mistyped field name is an
error (400 naming it), never silently ignored. Times are RFC 3339 UTC. Secrets (admin keys,
registration tokens) appear in a response once, when they are created; the store keeps only
their hashes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from control.store.models import Application, Segment
from dataplane.contract.flowrecord import MAX_BATCH, FlowRecord
from dataplane.contract.presence import MAX_CONNECTORS as MAX_PRESENCE_CONNECTORS
from dataplane.contract.presence import PresenceConnector

Role = Literal["connector", "edge"]
MAX_TOKEN_TTL = 365 * 86400  # seconds
NodeStatus = Literal["active", "inactive"]
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters


class _Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are refused."""


# ---------------------------------------------------------------------------- errors


class ErrorDetail(msgspec.Struct):
    message: str
    key: str | None = None
    source: str | None = None


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Every error response: ``error`` for people, ``code`` for programs, ``detail`` per field."""

    error: str
    code: str
    detail: list[ErrorDetail] | None = None


# ---------------------------------------------------------------------------- applications


class SegmentIn(_Request):
    """As in an application file: ``ports`` is ``"80,443,8000-8100"``, a port, or a list of ports/ranges."""

    destination: str
    ports: str | int | list[int | str]
    protocol: str = "tcp"


class SegmentOut(msgspec.Struct):
    id: int
    destination: str
    kind: str
    ports: str
    protocol: str


class ApplicationCreate(_Request):
    name: str
    kind: Literal["per_app", "quick_access"] = "per_app"
    connector_group: str | None = None  # default: the default connector group
    segments: list[SegmentIn] = []


class ApplicationUpdate(_Request):
    """Fields left out (or null) stay as they are; ``segments`` replaces every segment."""

    name: str | None = None
    connector_group: str | None = None
    segments: list[SegmentIn] | None = None


class ApplicationOut(msgspec.Struct):
    id: int
    name: str
    kind: str
    connector_group: str
    segments: list[SegmentOut]
    created_at: datetime
    updated_at: datetime


def segment_out(segment: Segment) -> SegmentOut:
    return SegmentOut(id=segment.id, destination=segment.destination, kind=segment.kind, ports=segment.ports,
                      protocol=segment.protocol)


def application_out(app: Application) -> ApplicationOut:
    """A stored application as the API shows it (the admin routes and discovery's promotion)."""
    return ApplicationOut(id=app.id, name=app.name, kind=app.kind, connector_group=app.connector_group.name,
                          segments=[segment_out(s) for s in app.segments], created_at=app.created_at,
                          updated_at=app.updated_at)


# ---------------------------------------------------------------------------- connector groups, nodes


class GroupCreate(_Request):
    """``allowed_addresses``: networks the group's connectors may dial (empty: any);
    ``denied_addresses``: networks they never dial (deny wins). CIDRs or single addresses."""

    name: str
    region: str = ""
    allowed_addresses: list[str] = []
    denied_addresses: list[str] = []


class GroupUpdate(_Request):
    """Fields left out (or null) stay as they are; a list replaces the whole list (``[]`` clears it)."""

    region: str | None = None
    allowed_addresses: list[str] | None = None
    denied_addresses: list[str] | None = None


class GroupOut(msgspec.Struct):
    id: int
    name: str
    region: str
    is_default: bool
    created_at: datetime
    allowed_addresses: list[str]
    denied_addresses: list[str]


class ConnectorUpdate(_Request):
    """Move the connector to another connector group."""

    group: str


class ConnectorOut(msgspec.Struct):
    id: str
    name: str
    group: str
    status: NodeStatus
    last_seen: datetime | None
    version: str
    external_addr: str
    internal_addr: str
    created_at: datetime
    cert_serial: str | None
    cert_not_after: datetime | None
    revoked: bool
    tunnels: int  # as of the last heartbeat
    active_flows: int
    config_version: int | None  # the configuration version the node runs


class EdgeOut(msgspec.Struct):
    id: str
    name: str
    address: str
    status: NodeStatus
    last_seen: datetime | None
    version: str
    created_at: datetime
    cert_serial: str | None
    cert_not_after: datetime | None
    revoked: bool
    external_addr: str  # as of the last heartbeat
    internal_addr: str
    tunnels: int
    active_flows: int
    config_version: int | None
    records_dropped: int = 0  # traffic records its queue dropped, summed over its heartbeats
    records_dropped_at: datetime | None = None  # the latest heartbeat reporting some


# ---------------------------------------------------------------------------- DNS suffixes


class DnsSuffixCreate(_Request):
    suffix: str


class DnsSuffixOut(msgspec.Struct):
    id: int
    suffix: str
    created_at: datetime


# ---------------------------------------------------------------------------- registration tokens


class ForwardingProfileUpdate(_Request):
    fail_mode: Literal["closed", "open"]


class ForwardingProfileOut(msgspec.Struct):
    """``fail_mode``: what client agents do with private destinations while no edge is reachable."""

    fail_mode: str
    updated_at: datetime


class TokenCreate(_Request):
    role: Role
    group: str | None = None  # connectors only; default: the default connector group
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKEN_TTL)] = 86400


class TokenCreated(msgspec.Struct):
    """``token`` is shown this once; only its hash is stored."""

    id: int
    token: str
    role: str
    group: str | None
    expires_at: datetime


class TokenOut(msgspec.Struct):
    id: int
    role: str
    group: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime
    used_at: datetime | None
    used_by: str | None
    state: Literal["unused", "used", "expired"]


# ---------------------------------------------------------------------------- admin keys


class AdminKeyCreate(_Request):
    name: str


class AdminKeyOut(msgspec.Struct):
    id: int
    name: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    revoked_at: datetime | None


class AdminKeyCreated(msgspec.Struct):
    """``key`` is shown this once; only its hash is stored."""

    id: int
    name: str
    key: str
    created_at: datetime
    created_by: str


# ---------------------------------------------------------------------------- revocations, audit, config


class RevocationCreate(_Request):
    """Revoke every certificate issued to connector or edge ``node_id`` (give ``node_type`` and
    ``node_id``), or one certificate by ``serial`` (hex; e.g. a client certificate)."""

    node_type: Role | None = None
    node_id: str | None = None
    serial: Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{1,40}$")] | None = None
    reason: str = ""


class ClientCertificateCreate(_Request):
    """A client (user device) certificate for ``name``'s key, whose CSR (PEM) is given."""

    name: str
    csr_pem: Annotated[str, msgspec.Meta(max_length=16384)]
    lifetime_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = None


class CertificateOut(msgspec.Struct):
    certificate_pem: str
    ca_pem: str
    serial: str
    not_after: datetime


class RevocationOut(msgspec.Struct):
    serial: str
    at: datetime
    reason: str
    node_type: Role | None  # the connector or edge the certificate was issued to, when known
    node_id: str | None
    node_name: str | None


class AuditOut(msgspec.Struct):
    id: int
    at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class ConfigVersionOut(msgspec.Struct):
    version: int
    changed_at: datetime


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    """``GET /ready``: ``ready``, or ``not ready`` with what is missing."""

    status: str
    problems: list[str] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------------------- node registration


class RegisterRequest(_Request):
    """A node's one-time registration. ``addresses``: for an edge, the HOST:PORT addresses
    connectors and clients dial (the first is its address; their hosts go in its certificate);
    for a connector, informational (its internal addresses)."""

    token: str
    csr_pem: str
    name: str
    version: Annotated[str, msgspec.Meta(max_length=64)] = ""
    addresses: Annotated[list[str], msgspec.Meta(max_length=16)] = []
    # The role the node registers as; a token issued for the other role is then refused
    # without being used up. Empty: the token's role.
    role: Literal["", "connector", "edge"] = ""


class RegisterResponse(msgspec.Struct):
    node_id: str
    role: Role
    name: str
    group: str | None
    certificate_pem: str
    ca_pem: str
    serial: str
    not_after: datetime
    edges: list[str]


# ---------------------------------------------------------------------------- nodes


class HeartbeatIn(_Request):
    """What a node reports: its software version, its own addresses, tunnels, active flows,
    the configuration version it runs (None while it has none) and, from an edge, how many
    traffic records its queue dropped since its previous heartbeat that got through."""

    # No control characters (shown to operators as they are; PostgreSQL text cannot hold NUL).
    version: Annotated[str, msgspec.Meta(max_length=64, pattern=_PRINTABLE)] = ""
    addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=255, pattern=_PRINTABLE)]],
                         msgspec.Meta(max_length=16)] = []
    tunnels: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    active_flows: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    config_version: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    records_dropped: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0  # edges: since their last heartbeat
    # An edge: the connectors it holds usable tunnels to (``dataplane.contract.presence``); None: not reported.
    connectors: Annotated[list[PresenceConnector], msgspec.Meta(max_length=MAX_PRESENCE_CONNECTORS)] | None = None


class HeartbeatOut(msgspec.Struct):
    node_id: str
    status: NodeStatus
    heartbeat_interval: float
    config_version: int  # the newest configuration version: a node behind it is catching up


class RenewIn(_Request):
    """A CSR (PEM) for the node's new key."""

    csr_pem: Annotated[str, msgspec.Meta(max_length=16384)]


class RenewOut(msgspec.Struct):
    certificate_pem: str
    ca_pem: str
    serial: str
    not_after: datetime


class TrafficIn(_Request):
    """A batch of an edge's traffic records (``dataplane.contract.flowrecord.FlowRecord``)."""

    records: Annotated[list[FlowRecord], msgspec.Meta(max_length=MAX_BATCH)]


class TrafficOut(msgspec.Struct):
    stored: int
