"""The control plane's tables as SQLAlchemy 2 typed models (one class per table).

The schema itself is created and changed only by the Alembic migrations in
``control/migrations/versions``; these classes must describe exactly what the migrations
build (``tests/test_store.py`` compares them on SQLite and PostgreSQL). Types are the
portable ones: strings, integers, booleans, JSON and ``UTCDateTime`` (timezone-aware UTC
on both databases). Constraint names are given explicitly so both databases carry the same
names and later migrations can refer to them (``Base.metadata``'s naming convention, and
explicit names for check constraints).

Rules that the schema enforces (the resource modules of ``control.store`` check them first to give
precise errors): unique names, at most one quick-access application, at most one default
connector group, known kinds / roles / protocols, single-row ``config_version``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

APP_KINDS = ("per_app", "quick_access")
FAIL_MODES = ("closed", "open")
SEGMENT_KINDS = ("hostname", "wildcard", "ip", "cidr", "range")
TOKEN_ROLES = ("connector", "edge")
CONSOLE_ROLES = ("admin", "reader")  # admin: everything; reader: sees everything, changes nothing
DEFAULT_GROUP = "default"
# A node is inactive once this many heartbeats in a row did not arrive.
MISSED_HEARTBEATS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    PostgreSQL stores ``timestamp with time zone``; SQLite has no time zones, so the value is
    stored as UTC and marked UTC again when read. Naive datetimes are refused, not guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; the store keeps aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    })
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class ConnectorGroup(Base):
    """Connectors that reach the same private network; an application names one group."""

    __tablename__ = "connector_groups"
    __table_args__ = (
        # At most one default group: the one new connectors join.
        Index("uq_connector_groups_one_default", "is_default", unique=True,
              sqlite_where=text("is_default"), postgresql_where=text("is_default")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    region: Mapped[str] = mapped_column(String(100), default="")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Networks the group's connectors may dial (empty: any) and never dial; comma-separated
    # canonical CIDR text (``dataplane.contract.dialrules``).
    allowed_addresses: Mapped[str] = mapped_column(Text, default="")
    denied_addresses: Mapped[str] = mapped_column(Text, default="")


class Application(Base):
    """A per-app application, or the one catch-all quick-access application."""

    __tablename__ = "applications"
    __table_args__ = (
        CheckConstraint(_one_of("kind", APP_KINDS), name="ck_applications_kind"),
        Index("uq_applications_one_quick_access", "kind", unique=True,
              sqlite_where=text("kind = 'quick_access'"), postgresql_where=text("kind = 'quick_access'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    connector_group_id: Mapped[int] = mapped_column(ForeignKey("connector_groups.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    connector_group: Mapped[ConnectorGroup] = relationship(lazy="joined")
    segments: Mapped[list[Segment]] = relationship(
        back_populates="application", cascade="all, delete-orphan", order_by="Segment.id", lazy="selectin",
    )


WEB_PREAUTH = ("ferryman", "passthrough")
WEB_BACKEND_TIMEOUTS = ("default", "long")


class WebApplication(Base):
    """What makes an application a published web app (``store.webapps``): its application row
    (name, connector group, assignments, policies; never segments) plus these fields.
    ``external_authority`` (``host`` or ``host:port``) is unique: one web app per external host."""

    __tablename__ = "web_apps"
    __table_args__ = (
        CheckConstraint(_one_of("preauth", WEB_PREAUTH), name="ck_web_apps_preauth"),
        CheckConstraint(_one_of("backend_timeout", WEB_BACKEND_TIMEOUTS), name="ck_web_apps_backend_timeout"),
    )

    application_id: Mapped[int] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"),
                                                primary_key=True)
    external_url: Mapped[str] = mapped_column(String(2048))
    external_authority: Mapped[str] = mapped_column(String(300), unique=True)
    internal_url: Mapped[str] = mapped_column(String(2048))
    preauth: Mapped[str] = mapped_column(String(16))
    backend_timeout: Mapped[str] = mapped_column(String(16))
    translate_headers: Mapped[bool] = mapped_column(Boolean)
    translate_body: Mapped[bool] = mapped_column(Boolean)
    cookie_http_only: Mapped[bool] = mapped_column(Boolean)
    cookie_persistent: Mapped[bool] = mapped_column(Boolean)
    websocket: Mapped[bool] = mapped_column(Boolean)
    verify_backend: Mapped[bool] = mapped_column(Boolean)
    cors_preflight_bypass: Mapped[bool] = mapped_column(Boolean)
    header_sso: Mapped[dict[str, Any]] = mapped_column(JSON)
    backend_ca: Mapped[str] = mapped_column(Text)
    # A custom-domain certificate: PEM chain, and its key sealed with the store's secrets key
    # (``secretbox``, context ``web-app-key:<application id>``); both empty: the edges' own.
    certificate: Mapped[str] = mapped_column(Text, default="")
    certificate_key: Mapped[str] = mapped_column(Text, default="")

    application: Mapped[Application] = relationship(lazy="joined")


class Segment(Base):
    """Destination + ports + protocol of an application.

    ``destination`` and ``kind`` are as normalised by ``dataplane.contract.apps``; ``ports`` is the
    canonical text form (sorted, merged ranges: ``"80,443,8000-8100"``).
    """

    __tablename__ = "segments"
    __table_args__ = (
        CheckConstraint(_one_of("kind", SEGMENT_KINDS), name="ck_segments_kind"),
        CheckConstraint(_one_of("protocol", ("tcp", "udp")), name="ck_segments_protocol"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    application_id: Mapped[int] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True,
    )
    destination: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    ports: Mapped[str] = mapped_column(Text)
    protocol: Mapped[str] = mapped_column(String(3))

    application: Mapped[Application] = relationship(back_populates="segments")


def node_status(last_seen: datetime | None, now: datetime, heartbeat_interval: float) -> str:
    """``active`` while fewer than ``MISSED_HEARTBEATS`` heartbeats were missed, else ``inactive``."""
    if last_seen is None or now - last_seen > timedelta(seconds=MISSED_HEARTBEATS * heartbeat_interval):
        return "inactive"
    return "active"


class Connector(Base):
    """A registered connector; ``last_seen`` is its latest heartbeat (see ``node_status``)."""

    __tablename__ = "connectors"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, also the certificate's name
    name: Mapped[str] = mapped_column(String(200))
    group_id: Mapped[int] = mapped_column(ForeignKey("connector_groups.id"), index=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    external_addr: Mapped[str] = mapped_column(String(255), default="")
    internal_addr: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None]
    cert_serial: Mapped[str | None] = mapped_column(String(64))  # lower-case hex
    cert_not_after: Mapped[datetime | None]
    # What the latest heartbeat reported (0 / None before the first one).
    tunnels: Mapped[int] = mapped_column(Integer, default=0)
    active_flows: Mapped[int] = mapped_column(Integer, default=0)
    config_version: Mapped[int | None] = mapped_column(Integer)

    group: Mapped[ConnectorGroup] = relationship(lazy="joined")

    def status(self, now: datetime, heartbeat_interval: float) -> str:
        return node_status(self.last_seen, now, heartbeat_interval)


class Edge(Base):
    """A registered edge; ``last_seen`` is its latest heartbeat (see ``node_status``)."""

    __tablename__ = "edges"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, also the certificate's name
    name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str] = mapped_column(String(255))  # HOST:PORT that connectors and clients dial
    version: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None]
    cert_serial: Mapped[str | None] = mapped_column(String(64))  # lower-case hex
    cert_not_after: Mapped[datetime | None]
    # What the latest heartbeat reported (empty / 0 / None before the first one).
    external_addr: Mapped[str] = mapped_column(String(255), default="")
    internal_addr: Mapped[str] = mapped_column(String(255), default="")
    tunnels: Mapped[int] = mapped_column(Integer, default=0)
    active_flows: Mapped[int] = mapped_column(Integer, default=0)
    config_version: Mapped[int | None] = mapped_column(Integer)
    # Traffic records its queue dropped (control plane unreachable too long), summed over heartbeats,
    # and when the latest heartbeat reporting some came in (the overview's alert).
    records_dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    records_dropped_at: Mapped[datetime | None]
    # The connectors it holds tunnels to, as of its latest heartbeat (``store.presence``; JSON).
    presence: Mapped[str] = mapped_column(Text, default="")

    def status(self, now: datetime, heartbeat_interval: float) -> str:
        return node_status(self.last_seen, now, heartbeat_interval)


class DnsSuffix(Base):
    """A private DNS suffix: names under it are resolved by connectors, not by the client's DNS."""

    __tablename__ = "dns_suffixes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    suffix: Mapped[str] = mapped_column(String(253), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ForwardingProfile(Base):
    """What client agents are told besides the segments (one row): ``fail_mode`` says what they do
    with private destinations while no edge is reachable (``closed``: refuse, ``open``: go direct)."""

    __tablename__ = "forwarding_profile"
    __table_args__ = (CheckConstraint(_one_of("fail_mode", FAIL_MODES), name="ck_forwarding_profile_fail_mode"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fail_mode: Mapped[str] = mapped_column(String(8), default="closed")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdminKey(Base):
    """An admin API key. Only the SHA-256 of the key is stored (see ``admin_keys.create_admin_key``)."""

    __tablename__ = "admin_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditRecord(Base):
    """One change: who (``actor``), what (``action`` on ``object_type`` ``object_id``), before/after."""

    __tablename__ = "audit_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None]
    after: Mapped[dict[str, Any] | None]


class RegistrationToken(Base):
    """A one-time token with which a connector or an edge obtains its certificate."""

    __tablename__ = "registration_tokens"
    __table_args__ = (CheckConstraint(_one_of("role", TOKEN_ROLES), name="ck_registration_tokens_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256
    role: Mapped[str] = mapped_column(String(16))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("connector_groups.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_by: Mapped[str | None] = mapped_column(String(200))

    group: Mapped[ConnectorGroup | None] = relationship(lazy="joined")


class IssuedCertificate(Base):
    """Every certificate the control plane signed for a node (registration and each renewal).

    Node requests are authenticated by certificate: the serial finds the node here. Revoking
    a node revokes every certificate it was ever issued, not only the newest.
    """

    __tablename__ = "issued_certificates"
    __table_args__ = (CheckConstraint("role IN ('connector', 'edge')", name="ck_issued_certificates_role"),)

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)  # lower-case hex
    role: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[str] = mapped_column(String(36), index=True)
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    not_after: Mapped[datetime]
    # When the node first authenticated with it (its first heartbeat on it): the proof that a
    # renewed node holds its new certificate, before the ones it replaced are retired.
    first_used_at: Mapped[datetime | None] = mapped_column(default=None)


class Revocation(Base):
    """A revoked certificate, by serial number (lower-case hex)."""

    __tablename__ = "revocations"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(String(200), default="")


class ConfigVersion(Base):
    """The single row (id 1) counting changes to what nodes are configured from."""

    __tablename__ = "config_version"
    __table_args__ = (CheckConstraint("id = 1", name="ck_config_version_single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime]


class ControlKey(Base):
    """A key every control-plane node sharing the database uses (CA, token signing, ...), sealed
    with the secrets key (``control.store.control_keys``)."""

    __tablename__ = "control_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sealed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GuardMark(Base):
    """One remembered fact of a guard shared by control-plane nodes (``control.store.guard_state``):
    a node-request token id seen, a user's newest TOTP step used; forgotten after ``expires_at``."""

    __tablename__ = "guard_marks"
    __table_args__ = (Index("ix_guard_marks_expires_at", "expires_at"),)

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime]


class SignInAttempt(Base):
    """A sign-in attempt counted by the limits shared by control-plane nodes
    (``control.store.guard_state``): in flight, or failed at ``at``."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (Index("ix_sign_in_attempts_at", "at"),
                      Index("ix_sign_in_attempts_account_source", "account", "source"),
                      CheckConstraint("state IN ('flight', 'failed')", name="ck_sign_in_attempts_state"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    account: Mapped[str] = mapped_column(String(320))
    source: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8))
    at: Mapped[datetime]


# ---------------------------------------------------------------------------- identity (users, devices, sessions)

USER_RISK_LEVELS = ("none", "low", "medium", "high")
POLICY_STATES = ("on", "off", "report_only")
POLICY_GRANTS = ("block", "require_mfa", "require_compliant_device")


class User(Base):
    """A person who signs in. ``upn`` is stored lower-case; ``password_hash`` is argon2 (None:
    no password sign-in); ``totp_secret`` is the base32 secret sealed with the secrets key
    (``control.store.secretbox``), used once ``totp_enabled``; ``oidc_issuer`` and
    ``oidc_subject`` name the OIDC provider's account linked to the user (``iss``, ``sub``),
    at most one user per account."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint("risk_level IN ('none', 'low', 'medium', 'high')",
                                      name="ck_users_risk_level"),
                      Index("uq_users_oidc_account", "oidc_issuer", "oidc_subject", unique=True))

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID
    upn: Mapped[str] = mapped_column(String(255), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str | None] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    risk_level: Mapped[str] = mapped_column(String(10), default="none")
    totp_secret: Mapped[str | None] = mapped_column(String(255))
    totp_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    oidc_issuer: Mapped[str | None] = mapped_column(String(255))
    oidc_subject: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    console_role: Mapped[str | None] = mapped_column(String(16))  # CONSOLE_ROLES; None: no web console


class ConsoleSession(Base):
    """A sign-in to the web console (``control.console``). ``id`` is the SHA-256 (hex) of the
    cookie's token (the token itself is never stored); ``csrf_token`` is what its forms must
    send back; it ends at ``expires_at`` (absolute), after an idle time since ``last_seen_at``,
    or when revoked (sign-out)."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class RecoveryCode(Base):
    """A one-time TOTP recovery code of a user (argon2id of the code's SHA-256; ``used_at`` once
    spent, and then no hash: ``control.store.totp``)."""

    __tablename__ = "recovery_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(255))
    used_at: Mapped[datetime | None]


class UserGroup(Base):
    """A group of users (direct membership only); applications and policies target groups."""

    __tablename__ = "user_groups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[str] = mapped_column(ForeignKey("user_groups.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)


class Device(Base):
    """A user's device: the client agent's key, certified with CN = ``id`` (role client).

    ``compliant`` is set by an admin or an MDM through the API; ``revoked_at`` once revoked
    (its certificate serials are then in ``revocations`` too)."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, the certificate's CN
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    os: Mapped[str] = mapped_column(String(64), default="")
    os_version: Mapped[str] = mapped_column(String(64), default="")
    compliant: Mapped[bool] = mapped_column(Boolean, default=False)
    cert_serial: Mapped[str | None] = mapped_column(String(64))
    cert_not_after: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class SignInSession(Base):
    """One sign-in: what it proved (``amr``: comma-separated ``pwd``, ``mfa``), when, on which
    device, and the hash of its current refresh token (rotated on every refresh)."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, the tokens' ``sid``
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    amr: Mapped[str] = mapped_column(String(32))
    auth_time: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    refresh_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last_refresh_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


# ---------------------------------------------------------------------------- access: assignments, locations, policies


class AppAssignment(Base):
    """An application assigned to one user or one group (exactly one of the two)."""

    __tablename__ = "app_assignments"
    __table_args__ = (
        CheckConstraint("(user_id IS NULL) <> (group_id IS NULL)", name="ck_app_assignments_one_target"),
        Index("uq_app_assignments_target", "application_id", "user_id", "group_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    application_id: Mapped[int] = mapped_column(ForeignKey("applications.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    group_id: Mapped[str | None] = mapped_column(ForeignKey("user_groups.id", ondelete="CASCADE"))


class NamedLocation(Base):
    """Source networks with a name (``cidrs``: comma-separated), for policy conditions."""

    __tablename__ = "named_locations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    cidrs: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AccessPolicy(Base):
    """A conditional-access policy. Targets: ``applications`` (application ids), ``users`` and
    ``groups`` (ids); an empty application list means every application, empty users and
    groups mean every user. ``conditions``: ``locations`` (names), ``device_os`` (list),
    ``user_risk_at_least`` (a risk level), ``signin_older_than`` (seconds); every condition
    given must hold for the policy to apply. ``grant`` is what an applying policy demands."""

    __tablename__ = "access_policies"
    __table_args__ = (
        CheckConstraint("state IN ('on', 'off', 'report_only')", name="ck_access_policies_state"),
        CheckConstraint("grant_control IN ('block', 'require_mfa', 'require_compliant_device')",
                        name="ck_access_policies_grant_control"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    grant_control: Mapped[str] = mapped_column(String(32))
    applications: Mapped[list[Any]] = mapped_column(JSON)
    users: Mapped[list[Any]] = mapped_column(JSON)
    groups: Mapped[list[Any]] = mapped_column(JSON)
    conditions: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------------------- traffic logs


class TrafficLog(Base):
    """One flow (``action`` allow / report) or one refused attempt (``deny``), as an edge recorded it.

    ``connection_id`` names the flow (it is also in the grant the connector checked);
    ``transaction_id`` the client tunnel it came through (every flow of one tunnel shares it).
    Times are the edge's; bytes are counted at the edge (sent: client → application)."""

    __tablename__ = "traffic_logs"
    __table_args__ = (
        Index("ix_traffic_logs_start", "start"),
        Index("ix_traffic_logs_user_id_start", "user_id", "start"),
        Index("ix_traffic_logs_application_start", "application", "start"),
        CheckConstraint("action IN ('allow', 'deny', 'report')", name="ck_traffic_logs_action"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection_id: Mapped[str] = mapped_column(String(64), index=True)
    transaction_id: Mapped[str] = mapped_column(String(64))
    start: Mapped[datetime]
    end: Mapped[datetime | None]
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    user_id: Mapped[str] = mapped_column(String(36), default="")
    upn: Mapped[str] = mapped_column(String(255), default="")
    device_id: Mapped[str] = mapped_column(String(64), default="")
    device_os: Mapped[str] = mapped_column(String(64), default="")
    process: Mapped[str] = mapped_column(String(255), default="")
    source_ip: Mapped[str] = mapped_column(String(64), default="")
    source_port: Mapped[int] = mapped_column(Integer, default=0)
    destination_ip: Mapped[str] = mapped_column(String(64), default="")
    destination_port: Mapped[int] = mapped_column(Integer, default=0)
    destination_fqdn: Mapped[str] = mapped_column(String(255), default="")
    transport: Mapped[str] = mapped_column(String(8), default="tcp")
    network: Mapped[str] = mapped_column(String(8), default="")
    application: Mapped[str] = mapped_column(String(200), default="")
    application_kind: Mapped[str] = mapped_column(String(20), default="")
    segment: Mapped[str] = mapped_column(String(300), default="")
    policy: Mapped[str] = mapped_column(String(200), default="")
    rule: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(8))
    reason_code: Mapped[str] = mapped_column(String(64), default="")
    connector_id: Mapped[str] = mapped_column(String(64), default="")
    connector_name: Mapped[str] = mapped_column(String(200), default="")
    connector_address: Mapped[str] = mapped_column(String(64), default="")
    edge: Mapped[str] = mapped_column(String(200), default="")
    relay_edge: Mapped[str] = mapped_column(String(200), default="")  # the peer edge that carried it to the connector
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    close_reason: Mapped[str] = mapped_column(String(1024), default="")
    # HTTP transactions of web apps (``application_kind`` ``web``): empty / 0 for flows.
    http_method: Mapped[str] = mapped_column(String(16), default="")
    http_host: Mapped[str] = mapped_column(String(300), default="")
    http_path: Mapped[str] = mapped_column(String(1024), default="")
    http_status: Mapped[int] = mapped_column(Integer, default=0)
    http_protocol: Mapped[str] = mapped_column(String(16), default="")
    user_agent: Mapped[str] = mapped_column(String(512), default="")
    # Added later (migration 0009): the user's display name (from the store when the record
    # arrives), the device's OS version, the client agent's version (from the edge).
    display_name: Mapped[str] = mapped_column(String(200), default="")
    device_os_version: Mapped[str] = mapped_column(String(64), default="")
    client_version: Mapped[str] = mapped_column(String(64), default="")
    # Added by migration 0013: the app's address on the user's device, as the client agent said.
    local_source_ip: Mapped[str] = mapped_column(String(64), default="")
    local_source_port: Mapped[int] = mapped_column(Integer, default=0)
