"""The configuration snapshot: everything an edge or a connector needs from the control plane.

The control plane compiles its store into a ``ConfigSnapshot`` (``control.snapshot``) and
pushes it to every node; a node holds the newest one it has seen, keeps it on disk
(``SnapshotCache``) so that it can start and keep forwarding while the control plane is
down, and catches up when the control plane returns. A snapshot carries one number,
``version`` (the store's configuration version): a node only ever moves to a higher one.

Contents: applications (per-app and the catch-all quick access one) with their segments and
assignments, connector groups, the registered connectors (the group each one serves, keyed
by the serials of its certificates: the edge files a connector tunnel under that group, never
under the one its HELLO names), private DNS suffixes, revoked certificate serials (lower-case
hex), the edges nodes dial, and for conditional access: users (groups, disabled, risk),
devices (OS, compliance), named locations, policies, revoked sign-in sessions and the public
keys of access tokens. The encoding is msgspec JSON (``encode`` / ``decode``); a field a node
does not know is ignored, so a newer control plane may add fields without breaking nodes.

That is an edge's snapshot. A connector gets a narrower one of the same type
(``control.snapshot.connector_view``): the version, the edges, the revoked serials, its own
group and its own record, and its group's applications with their segments only (a web
application as one segment: its internal host and port); nothing about users, devices,
policies, locations, sessions, assignments or token keys.

``ClientProfile`` is what a signed-in client agent is told (its forwarding profile), and
``client_profile(snapshot)`` derives it. ``is_revoked(snapshot, serial)`` is a set lookup,
for every TLS handshake. The edge's application table is built from a snapshot by
``access.apptable.app_table``; nodes keep the newest snapshot on disk with
``controllink.snapshot_cache.SnapshotCache``.

A snapshot is treated as immutable once built or decoded (``is_revoked`` caches on it).
No I/O here: the control plane and the nodes both import this module.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

APP_KINDS = ("per_app", "quick_access")

_Name = Annotated[str, msgspec.Meta(min_length=1)]
# A certificate serial number as the store keeps it: hex digits (at most 20 octets by RFC 5280,
# the column allows 64 characters).
_Serial = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{1,64}$")]


class SnapshotError(ValueError):
    """A snapshot cannot be decoded, read, written or used; the message says which and why."""


class SnapSegment(msgspec.Struct):
    """One segment: ``ports`` is the store's canonical text (``"80,443,8000-8100"``)."""

    destination: _Name
    ports: _Name
    protocol: Literal["tcp", "udp"] = "tcp"


class SnapApp(msgspec.Struct):
    """An application; ``users`` and ``groups`` are the ids it is assigned to (a flow is
    allowed only for a user assigned directly or through one of their groups)."""

    name: _Name
    kind: Literal["per_app", "quick_access"]
    connector_group: _Name
    segments: list[SnapSegment] = []
    users: list[str] = []
    groups: list[str] = []


class SnapGroup(msgspec.Struct):
    """A connector group; its connectors dial only addresses outside ``denied_addresses`` and, when
    ``allowed_addresses`` is not empty, inside it (canonical CIDR text: ``contract.dialrules``)."""

    name: _Name
    region: str = ""
    allowed_addresses: list[str] = []
    denied_addresses: list[str] = []


class SnapConnector(msgspec.Struct):
    """A registered connector: its id and name (the name is its certificate's CN), the connector
    group it serves (decided by the control plane at registration), and the serials of its
    certificates that are neither revoked nor expired (lower-case hex): an edge recognises a
    connector tunnel by the serial of the certificate it presented."""

    id: _Name
    name: _Name
    group: _Name
    serials: list[_Serial] = []


class SnapUser(msgspec.Struct):
    """A user as edges need it: id, UPN, the ids of their groups, disabled flag, risk level."""

    id: _Name
    upn: _Name
    groups: list[str] = []
    disabled: bool = False
    risk: Literal["none", "low", "medium", "high"] = "none"


class SnapDevice(msgspec.Struct):
    """A registered device (its client certificate's CN is ``id``)."""

    id: _Name
    user_id: _Name
    os: str = ""
    os_version: str = ""
    compliant: bool = False
    revoked: bool = False


class SnapLocation(msgspec.Struct):
    """A named location: source networks (CIDR text) a policy condition may name."""

    name: _Name
    cidrs: list[str] = []


class SnapConditions(msgspec.Struct, omit_defaults=True):
    """When a policy applies; every condition given must hold (an empty one is not checked).

    - ``locations``: the flow's source address is in one of these named locations;
    - ``device_os``: the device's OS is one of these (case-insensitive);
    - ``user_risk_at_least``: the user's risk level is this or higher;
    - ``signin_older_than``: the sign-in is older than this many seconds.
    """

    locations: list[str] = []
    device_os: list[str] = []
    user_risk_at_least: Literal["", "low", "medium", "high"] = ""
    signin_older_than: Annotated[int, msgspec.Meta(ge=0)] = 0


class SnapPolicy(msgspec.Struct):
    """A conditional-access policy. ``applications`` are names (empty: every application);
    ``users`` / ``groups`` are ids (both empty: every user). ``report_only`` evaluates and
    logs but never denies."""

    id: int
    name: _Name
    state: Literal["on", "off", "report_only"]
    grant: Literal["block", "require_mfa", "require_compliant_device"]
    applications: list[str] = []
    users: list[str] = []
    groups: list[str] = []
    conditions: SnapConditions = msgspec.field(default_factory=SnapConditions)


class SnapWebApp(msgspec.Struct):
    """A published web application (``dataplane.contract.webapps`` checks its fields): reached by
    browsers at ``external_url`` through an edge's HTTPS front door, served by ``internal_url``
    through a connector of ``connector_group``. Its assignments are those of the application of
    the same ``name`` in ``applications`` (kind ``per_app``, no segments): requests are decided
    by the same admission as a private application's flows, and policies name it by ``name``.
    ``header_sso`` maps claim names to request header names. ``certificate`` /
    ``certificate_key``: a custom-domain certificate (PEM chain and key; empty: the edge's own),
    for edges only (a connector's view never carries web apps)."""

    name: _Name
    external_url: _Name
    internal_url: _Name
    connector_group: _Name
    preauth: Literal["ferryman", "passthrough"] = "ferryman"
    backend_timeout: Literal["default", "long"] = "default"
    translate_headers: bool = True
    translate_body: bool = False
    cookie_http_only: bool = True
    cookie_persistent: bool = False
    header_sso: dict[str, str] = {}
    websocket: bool = True
    verify_backend: bool = True
    backend_ca: str = ""
    cors_preflight_bypass: bool = False
    certificate: str = ""
    certificate_key: str = ""


class ConfigSnapshot(msgspec.Struct, dict=True):
    """Version ``version`` of the configuration, as of ``issued_at`` (ISO 8601 UTC).

    ``dict=True`` lets helpers keep derived lookups (the revocation set) on the instance;
    they are never encoded.
    """

    version: Annotated[int, msgspec.Meta(ge=0)]
    issued_at: str
    applications: list[SnapApp] = []
    groups: list[SnapGroup] = []
    dns_suffixes: list[str] = []
    revoked_serials: list[_Serial] = []
    edges: list[str] = []
    # None: made by a control plane that records no connector groups (an older version, or a
    # node's cache from one); edges then take each connector's group from its HELLO.
    connectors: list[SnapConnector] | None = None
    # Identity and conditional access (empty on a control plane without users: edges then
    # enforce nothing beyond applications).
    users: list[SnapUser] = []
    devices: list[SnapDevice] = []
    locations: list[SnapLocation] = []
    policies: list[SnapPolicy] = []
    revoked_sessions: list[str] = []
    # The public keys (JWK dicts, OKP/Ed25519 with "kid") access tokens are signed with, and
    # the issuer they name: edges verify users' tokens offline with these.
    token_keys: list[dict[str, str]] = []
    token_issuer: str = ""
    # The forwarding profile's fail mode: what client agents do with private destinations
    # while no edge is reachable ("closed": refuse them, "open": dial them directly).
    fail_mode: Literal["closed", "open"] = "closed"
    # Published web applications (an edge's HTTPS front door serves them; a connector is sent
    # each one of its group as an application whose one segment is the internal host and port).
    web_apps: list[SnapWebApp] = []


# Seconds an edge accepts an access token past its ``exp`` (clock skew between control plane and
# edges). The control plane keeps a revoked session in ``revoked_sessions`` until the last token
# it issued for that session is past its expiry by this much.
TOKEN_LEEWAY = 60

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ConfigSnapshot)


# ---------------------------------------------------------------------------- encoding


def encode(snapshot: ConfigSnapshot) -> bytes:
    """JSON bytes of ``snapshot`` (equal snapshots give equal bytes)."""
    return _encoder.encode(snapshot)


def decode(data: bytes | bytearray | memoryview | str) -> ConfigSnapshot:
    """The snapshot encoded in ``data``; ``SnapshotError`` saying what is wrong otherwise."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"invalid configuration snapshot: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"configuration snapshot is not valid JSON: {exc}") from None
    except TypeError as exc:
        raise SnapshotError(f"configuration snapshot must be bytes or text: {exc}") from None


# ---------------------------------------------------------------------------- client forwarding profile


class ClientProfile(msgspec.Struct):
    """What a signed-in client agent is told (``GET /v1/client/profile``): the private
    applications' segments (which destinations to tunnel), the private DNS suffixes, the
    fail mode, the edges and the revoked certificate serials (an agent refuses an edge whose
    certificate was revoked, as nodes do; a revocation list is public by nature). Assignments
    stay out of it: the edge decides each flow, and a user who is not assigned gets the edge's
    reason rather than a silent direct dial."""

    version: Annotated[int, msgspec.Meta(ge=0)]
    issued_at: str
    applications: list[SnapApp] = []
    dns_suffixes: list[str] = []
    fail_mode: Literal["closed", "open"] = "closed"
    edges: list[str] = []
    revoked_serials: list[_Serial] = []


def client_profile(snapshot: ConfigSnapshot) -> ClientProfile:
    """The forwarding profile of ``snapshot`` (the same for every user)."""
    return ClientProfile(
        version=snapshot.version, issued_at=snapshot.issued_at,
        applications=[SnapApp(name=a.name, kind=a.kind, connector_group=a.connector_group, segments=a.segments)
                      for a in snapshot.applications if a.segments],
        dns_suffixes=list(snapshot.dns_suffixes), fail_mode=snapshot.fail_mode, edges=list(snapshot.edges),
        revoked_serials=list(snapshot.revoked_serials),
    )


# ---------------------------------------------------------------------------- revocations


def revoked_set(snapshot: ConfigSnapshot) -> frozenset[int]:
    """The revoked serial numbers of ``snapshot`` as integers (computed once per snapshot)."""
    cached = snapshot.__dict__.get("_revoked")
    if cached is None:
        cached = frozenset(int(serial, 16) for serial in snapshot.revoked_serials)
        snapshot.__dict__["_revoked"] = cached
    return cached


def is_revoked(snapshot: ConfigSnapshot, serial: int) -> bool:
    """Whether the certificate with serial number ``serial`` is revoked in ``snapshot``."""
    return serial in revoked_set(snapshot)
